"""N-JEPA: I-JEPA with diffusion noise on the masked tokens' position embeddings ("Improving Joint Embedding
Predictive Architecture with Diffusion Noise", Qiu, Zhu, Chen; arXiv 2507.15216; no code released).

The abstract is all that could be checked: noise enters "by the position embedding of masked tokens" and "the
multi-level noise schedule is a series of feature augmentations". Our reading (models/predictor.py,
DiffusionQueries): every target block of every image draws a level t uniformly from 1..L; its queries are
    mask_token + sqrt(1 - sigma_t^2) * pos + sigma_t * s * eps,   sigma_t = sigma_max * t / L,
a variance-preserving diffusion step on the position embedding (s = RMS of its entries, eps ~ N(0, I) in the
predictor width). Eval mode uses t = 0 (the I-JEPA query). Everything else is I-JEPA (methods/ijepa.py).
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from mimkit.methods.ijepa import IJEPA, IJEPAConfig
from mimkit.models.predictor import DiffusionQueries


class NJEPAConfig(IJEPAConfig):
    name: Literal["njepa"] = "njepa"
    noise_levels: int = Field(4, ge=1, description="L: noise levels of the schedule; each target block draws "
                              "one uniformly [unverified reading of the paper]")
    sigma_max: float = Field(0.5, ge=0.0, le=1.0, description="noise std at the top level, relative to the "
                             "position embedding's RMS; sigma_t = sigma_max * t / L [unverified]")


class NJEPA(IJEPA):
    config_class = NJEPAConfig

    @classmethod
    def make_queries(cls, method: NJEPAConfig, dim: int, pos_scale: float) -> nn.Module:
        return DiffusionQueries(dim, method.noise_levels, method.sigma_max, pos_scale)
