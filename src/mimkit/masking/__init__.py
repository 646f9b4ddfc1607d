from mimkit.masking.base import Mask
from mimkit.masking.random import RandomMasking, mask_from_noise

__all__ = ["Mask", "RandomMasking", "mask_from_noise"]
