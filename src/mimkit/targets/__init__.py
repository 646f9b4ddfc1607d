from mimkit.targets.hog import HOG, HOGTarget
from mimkit.targets.pixel import PixelTarget

__all__ = ["HOG", "HOGTarget", "PixelTarget"]
