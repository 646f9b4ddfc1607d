"""An exponential-moving-average teacher (timm's ModelEma, BYOL/DINO/iBOT momentum encoders) and its schedules.

The teacher is a deep copy of the student, frozen (requires_grad False, so the engine's optimizer groups and
DDP's gradient sync leave it out) and always in eval mode. It is a submodule of the method, so its weights are
in the method's state_dict and a resumed run continues with exactly the teacher it stopped with. The method
calls `update(student, momentum)` after each optimizer step (in `Method.end_step`), with a momentum from one of
the schedules below, which are pure functions of the training progress in [0, 1] (so a resume sees the same).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn as nn

Student = nn.Module | Mapping[str, nn.Module]


def _as_module(student: Student) -> nn.Module:
    """A mapping of name -> module (the parts of a method that make up the student, e.g. encoder + head) is
    viewed as one ModuleDict; the modules themselves are not copied."""
    return student if isinstance(student, nn.Module) else nn.ModuleDict(dict(student))


class EMATeacher(nn.Module):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers copied.

    `student` is a module or a {name: module} mapping of the method's parts; `update` must be given the same
    structure. Call the teacher like the copied module (`teacher(x)`), or reach its parts via `teacher.module`
    (for a mapping: `teacher.module["encoder"]`).
    """

    def __init__(self, student: Student):
        super().__init__()
        self.module = copy.deepcopy(_as_module(student))
        self.module.requires_grad_(False)
        self.module.eval()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "EMATeacher":
        # the teacher only scores / provides targets: no dropout or drop-path whatever mode the method is in
        self.training = mode
        self.module.eval()
        return self

    def _pairs(self, student: Student):
        own = dict(self.module.named_parameters())
        theirs = dict(_as_module(student).named_parameters())
        if own.keys() != theirs.keys():
            diff = sorted(own.keys() ^ theirs.keys())[:5]
            raise ValueError(f"student and teacher parameters differ: {diff}")
        return [own[k] for k in own], [theirs[k] for k in own]

    @torch.no_grad()
    def update(self, student: Student, momentum: float) -> None:
        """In-place EMA step. momentum 1 keeps the teacher, 0 copies the student (both exactly)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        mine, theirs = self._pairs(student)
        theirs = [p.detach().to(q.dtype) for p, q in zip(theirs, mine)]
        if mine:
            # lerp is exact at both ends (weight 0 returns start, weight 1 returns end)
            torch._foreach_lerp_(mine, theirs, 1.0 - momentum)
        own_buffers = dict(self.module.named_buffers())
        for name, b in _as_module(student).named_buffers():
            if name in own_buffers:
                own_buffers[name].copy_(b)


def _clip(progress: float) -> float:
    return min(max(float(progress), 0.0), 1.0)


def cosine_momentum(progress: float, base: float, final: float = 1.0) -> float:
    """DINO/iBOT: base -> final along a half cosine over the whole run (progress in [0, 1])."""
    return final - (final - base) * (math.cos(math.pi * _clip(progress)) + 1) / 2


def ramp_momentum(progress: float, start: float, end: float, ramp: float) -> float:
    """HPM: linear start -> end over the first `ramp` share of training, then constant at `end`
    (the reference ramps 0.999 -> 0.9999 over the first 100 of 800 epochs: ramp = 0.125)."""
    if ramp <= 0:
        return end
    t = min(_clip(progress) / ramp, 1.0)
    return start + (end - start) * t
