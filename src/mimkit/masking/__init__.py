from mimkit.masking.base import Mask
from mimkit.masking.block import BlockMasking
from mimkit.masking.build import MaskKind, SwappableMaskSettings, build_masking
from mimkit.masking.coarse import CoarseMasking
from mimkit.masking.random import RandomMasking, mask_from_noise

__all__ = ["BlockMasking", "CoarseMasking", "Mask", "MaskKind", "RandomMasking", "SwappableMaskSettings", "build_masking", "mask_from_noise"]
