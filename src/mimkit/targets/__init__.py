from mimkit.targets.pixel import PixelTarget

__all__ = ["PixelTarget"]
