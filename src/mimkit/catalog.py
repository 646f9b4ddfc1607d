"""Methods by name: the one table that lists them, at the bottom of the package so that config (which validates
a `method:` section by the method's own settings class) finds a method without importing methods/ (whose files
import config). Entries are "module:Class", so naming a method imports only its own file.
"""

from __future__ import annotations

import difflib
import importlib

METHODS: dict[str, str] = {
    "mae": "mimkit.methods.mae:MAE",
    "simmim": "mimkit.methods.simmim:SimMIM",
    "maskfeat": "mimkit.methods.maskfeat:MaskFeat",
    "hpm": "mimkit.methods.hpm:HPM",
    "localmim": "mimkit.methods.localmim:LocalMIM",
    "mff": "mimkit.methods.mff:MFF",
    "dmjd": "mimkit.methods.dmjd:DMJD",
    "ropim": "mimkit.methods.ropim:ROPIM",
    "a2mim": "mimkit.methods.a2mim:A2MIM",
    "selective_mae": "mimkit.methods.selective_mae:SelectiveMAE",
    "hi_end_mae": "mimkit.methods.hi_end_mae:HiEndMAE",
    "ibot": "mimkit.methods.ibot:IBOT",
    "attmask": "mimkit.methods.attmask:AttMask",
    "cae": "mimkit.methods.cae:CAE",
    "latent_mim": "mimkit.methods.latent_mim:LatentMIM",
    "lut": "mimkit.methods.lut:LUT",
    "ijepa": "mimkit.methods.ijepa:IJEPA",
    "stop": "mimkit.methods.stop:StoP",
    "njepa": "mimkit.methods.njepa:NJEPA",
    "ccvit": "mimkit.methods.ccvit:CCViT",
    "vqkd": "mimkit.methods.vqkd:VQKD",
    "beit_v2": "mimkit.methods.beit_v2:BEiTv2",
    "maskalign": "mimkit.methods.maskalign:MaskAlign",
    "dtm": "mimkit.methods.dtm:DTM",
    "hybrid_distill": "mimkit.methods.hybrid_distill:HybridDistill",
    "sup_mim": "mimkit.methods.sup_mim:SupMIM",
    "cl_mim": "mimkit.methods.cl_mim:CLMIM",
}


def method_class(name: str) -> type:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_config_class(name: str) -> type:
    """The settings class (a config.MethodSection subclass) of method `name`; a ValueError with the closest name
    for an unknown one."""
    if not isinstance(name, str) or name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(METHODS)}")
    return method_class(name).config_class


def build_method(cfg, img_size, in_chans: int):
    """A method from a PretrainConfig's `method` and `model` sections for images of this size and channels."""
    return method_class(cfg.method.name).from_config(cfg.method, cfg.model, img_size, in_chans, data=cfg.data)
