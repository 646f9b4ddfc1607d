"""Moved to `mimkit.backends` (one module per backend, below frozen teachers, tokenizers and evaluation alike);
these names stay importable from here for code written against `mimkit.eval.encoders`."""

from mimkit.backends import (CLIP_MEAN, CLIP_STD, EXTERNAL_PREFIXES, IMAGENET_MEAN, IMAGENET_STD, PROJ_SUFFIX,
                             HFEncoder, HFVisionTowerEncoder, LoadedEncoder, MimkitEncoder, OpenClipEncoder,
                             OpenClipTower, TimmEncoder, is_external_spec, load_encoder, norm_for, wrap_mimkit)

__all__ = ["CLIP_MEAN", "CLIP_STD", "EXTERNAL_PREFIXES", "IMAGENET_MEAN", "IMAGENET_STD", "PROJ_SUFFIX", "HFEncoder",
           "HFVisionTowerEncoder", "LoadedEncoder", "MimkitEncoder", "OpenClipEncoder", "OpenClipTower", "TimmEncoder",
           "is_external_spec", "load_encoder", "norm_for", "wrap_mimkit"]
