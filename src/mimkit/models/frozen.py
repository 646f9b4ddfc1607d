"""Holding a frozen module that is not part of the holder's module tree (a frozen teacher's encoder, a BEiT v2
tokenizer).

Such a module's weights come from elsewhere (a teacher spec, a tokenizer run), so they must stay out of the
holder's parameters (nothing for the optimizer, DDP or FSDP to see) and its state_dict (a checkpoint keeps the
student's size and rebuilds the frozen part from its path). It still has to follow the holder to a device or
dtype and stay in eval mode whatever mode the holder is put in.
"""

from __future__ import annotations

import torch.nn as nn


class HoldsFrozen(nn.Module):
    """Base (or mixin before another nn.Module base) for a module holding frozen modules outside its tree.

    `self.hold_frozen("_tokenizer", module)` freezes `module` (eval mode, no gradients) and stores it as a plain
    attribute; `.to()` / `.half()` / `.cuda()` reach it and `.train()` leaves it in eval mode."""

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        module = module.eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module's registration: no parameters, no state_dict entries
        object.__setattr__(self, name, module)
        names = self.__dict__.setdefault("_frozen_names", [])
        if name not in names:
            names.append(name)
        return module

    def _frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.__dict__.get("_frozen_names", ())]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for module in self._frozen_modules():
            module._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self
