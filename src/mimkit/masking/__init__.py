from mimkit.masking.base import Mask
from mimkit.masking.coarse import CoarseMasking
from mimkit.masking.random import RandomMasking, mask_from_noise

__all__ = ["CoarseMasking", "Mask", "RandomMasking", "mask_from_noise"]
