"""StoP / FlexPredict: stochastic positional embeddings (Bar et al., ICML 2024; amirbar/StoP): I-JEPA whose
predictor queries sit at noisy positions.

Each query is pos_j + A n_j with n_j ~ N(0, sigma^2 I) in the encoder width and A = the predictor's own
context projection (`predictor_embed`, bias included, as the reference calls it on the noise). Sharing A means
the predictor cannot learn the noise away without also shrinking its view of the context. No mask token is
added. Everything else is I-JEPA (methods/ijepa.py); at sigma 0 StoP is I-JEPA with the mask token tied to
predictor_embed's bias. No noise in eval mode.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from mimkit.methods.ijepa import IJEPA, IJEPAConfig
from mimkit.models.predictor import StoPQueries


class StoPConfig(IJEPAConfig):
    name: Literal["stop"] = "stop"
    sigma: float = Field(0.25, ge=0.0, description="std of the position noise n (encoder width) before A; "
                         "reference 0.25 (its `noise_var` is used as the std); 0 = I-JEPA up to the mask token")


class StoP(IJEPA):
    config_class = StoPConfig

    @classmethod
    def make_queries(cls, method: StoPConfig, dim: int, pos_scale: float) -> nn.Module:
        return StoPQueries(method.sigma)
