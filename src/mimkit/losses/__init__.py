"""Losses, one module per family: `masked` (errors averaged where a mask says so), `frequency` (A2MIM's focal
frequency loss), `latent` (LatentMIM's patch InfoNCE and its regulariser). The masked ones are re-exported here
(`from mimkit.losses import masked_mse`)."""

from mimkit.losses.masked import masked_l1, masked_mse

__all__ = ["masked_l1", "masked_mse"]
