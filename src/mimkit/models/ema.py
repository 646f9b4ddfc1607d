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
from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator

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


def linear_momentum(progress: float, start: float, end: float = 1.0) -> float:
    """I-JEPA / StoP: start -> end linearly over the whole run."""
    return start + (end - start) * _clip(progress)


def staged_momentum(progress: float, stages: list[tuple[float, float]], start: float) -> float:
    """Piecewise constant: `start` until the first stage's fraction, then each stage's momentum from its
    fraction on (stages sorted by fraction), e.g. [(0.5, 0.999)] switches to 0.999 halfway through."""
    value = start
    for at, momentum in stages:
        if _clip(progress) >= at:
            value = momentum
    return value


class EMASchedule(BaseModel):
    """A teacher's momentum as a function of training progress (step / total steps, so a resumed run sees the
    same values and a schedule written for 800 epochs means the same at 20).

    kind:
      cosine   start -> end along a half cosine (DINO, iBOT, LUT, LatentMIM)
      linear   start -> end linearly (I-JEPA, StoP)
      ramp     start -> end linearly over the first `ramp` share, then end (HPM)
      staged   start, then each (fraction, momentum) of `stages` from its fraction on
      constant start throughout; start = 0 copies the student every step (CAE's alignment encoder)
    Used as a field of a method's config: `method.teacher.kind=linear method.teacher.start=0.996`.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cosine", "linear", "ramp", "staged", "constant"] = "cosine"
    start: float = Field(0.996, ge=0.0, le=1.0, description="momentum at step 0")
    end: float = Field(1.0, ge=0.0, le=1.0, description="momentum at the end (cosine, linear, ramp)")
    ramp: float = Field(0.125, ge=0.0, le=1.0, description="share of training the `ramp` kind takes")
    stages: list[tuple[float, float]] = Field(
        default_factory=list, description="staged: (fraction of training, momentum) pairs, e.g. [[0.5, 0.999]]")

    @model_validator(mode="after")
    def _check_stages(self) -> "EMASchedule":
        for at, m in self.stages:
            if not (0.0 <= at <= 1.0 and 0.0 <= m <= 1.0):
                raise ValueError(f"stages: fraction and momentum must be in [0, 1], got ({at}, {m})")
        if [a for a, _ in self.stages] != sorted(a for a, _ in self.stages):
            raise ValueError("stages must be sorted by fraction")
        return self

    def __call__(self, progress: float) -> float:
        if self.kind == "cosine":
            return cosine_momentum(progress, self.start, self.end)
        if self.kind == "linear":
            return linear_momentum(progress, self.start, self.end)
        if self.kind == "ramp":
            return ramp_momentum(progress, self.start, self.end, self.ramp)
        if self.kind == "staged":
            return staged_momentum(progress, [tuple(s) for s in self.stages], self.start)
        return self.start


def schedule_field(kind: str = "cosine", start: float = 0.996, end: float = 1.0, **kw):
    """A pydantic Field holding an EMASchedule with these defaults (one per method config)."""
    return Field(default_factory=lambda: EMASchedule(kind=kind, start=start, end=end, **kw),
                 description=f"teacher momentum schedule (default {kind} {start} -> {end})")
