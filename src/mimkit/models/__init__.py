from mimkit.models.decoder import DECODER_PRESETS, MAEDecoder
from mimkit.models.heads import PixelShuffleHead
from mimkit.models.patch import PatchGrid
from mimkit.models.vit import VIT_PRESETS, VisionTransformer, pool

__all__ = ["DECODER_PRESETS", "MAEDecoder", "PatchGrid", "PixelShuffleHead", "VIT_PRESETS", "VisionTransformer", "pool"]
