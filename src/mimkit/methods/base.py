"""The contract between a method and the engine, evaluation and visualisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from mimkit.config import MethodSection
from mimkit.models.ema import EMATeacher, Student


@dataclass
class Reconstruction:
    """Images for the visualisation grid, all [B, C, H, W] in the input's (normalised) space."""

    original: torch.Tensor
    masked: torch.Tensor         # hidden patches blanked
    prediction: torch.Tensor     # the model's output everywhere
    pasted: torch.Tensor         # prediction on hidden patches, original visible patches

    @classmethod
    def from_mask(cls, images: torch.Tensor, prediction: torch.Tensor, hidden: torch.Tensor,
                  masked: torch.Tensor | None = None) -> "Reconstruction":
        """The usual picture: `hidden` (Bool[B, 1, H, W], e.g. PatchGrid.expand_mask) pixels blanked in the masked
        column (or `masked`, what the encoder really saw) and taken from `prediction` in the pasted one."""
        prediction = prediction.float()
        return cls(
            original=images, masked=images.masked_fill(hidden, 0.0) if masked is None else masked,
            prediction=prediction, pasted=torch.where(hidden, prediction, images.float()),
        )


class Method(nn.Module):
    """A MIM method: an `encoder` (what evaluation and export use) plus whatever it trains beside it.

    `forward(batch)` takes {"image": Float[B,C,H,W], "seed": Long[B], ...} and returns a dict with a scalar
    "loss" and any other scalar metrics to log. Randomness that concerns an image must derive from its seed.

    `config_class` is the method's settings (a MethodSection subclass whose `name` is the method's name) and
    `from_config(method_cfg, model_cfg, img_size, in_chans, data=data_cfg)` builds the method from them;
    `data` is the run's resolved DataConfig (its `mean`/`std` filled in), which methods that feed the images
    to a frozen teacher need to convert them to the teacher's normalisation (others ignore it).

    `prepare(dataset, seed)` runs once before a fresh run's first step (not on resume: what it makes must
    be in the state_dict), for methods fitted to the data before training (CCViT's k-means tokenizer).

    The engine calls `begin_step(step, total_steps)` before each optimizer step's forward passes and
    `end_step(step, total_steps)` after the optimizer step (0-based `step`), on every process. Methods with
    schedules (curricula, EMA momentum) read `self.progress` = step / total_steps, which is a pure function
    of the step, so a resumed run sees the same schedule; EMA teachers update in `end_step`.
    """

    config_class: ClassVar[type[MethodSection]]
    encoder: nn.Module
    progress: float = 0.0

    @classmethod
    def from_config(cls, method, model, img_size, in_chans: int, data=None) -> "Method":
        raise NotImplementedError(f"{cls.__name__} must define from_config")

    @staticmethod
    def lr_scale(cfg) -> float:
        """Factor on the base-lr rule (lr = base_lr * batch / 256 * factor) for methods whose papers scale it
        (DMJD: pred_ratio / mask_ratio); `cfg` is the PretrainConfig. An explicit optim.lr is used unscaled."""
        return 1.0

    @classmethod
    def view_specs(cls, cfg) -> list | None:
        """Augmented views the method compares (a list of data.views.ViewSpec, from its MethodSection `cfg`);
        the trainer then adds batch["views"]. None (the default): one view, batch["image"]."""
        return None

    def prepare(self, dataset, seed: int) -> None:
        """Fit data-dependent state (buffers) from the training split `dataset` (items as the loader gives:
        {"image", "seed", ...}); deterministic given `seed`, so every rank of a distributed run agrees."""

    def begin_step(self, step: int, total_steps: int) -> None:
        self.progress = step / max(1, total_steps)

    def end_step(self, step: int, total_steps: int) -> None:
        """Called after the optimizer step: update EMA teachers and the like."""

    def reconstruct(self, batch: dict) -> Reconstruction | None:
        """Pixel reconstructions for the picture; None where the method predicts no pixels."""
        return None


class EMATeacherMixin:
    """For a Method whose `teacher` is an EMATeacher (models.ema) of its `student()` parts, stepped after every
    optimizer step: `init_teacher(schedule)` copies the student (call it once the student's modules exist) and
    `end_step` moves the teacher with momentum `momentum(progress)` = `schedule(progress)` (an EMASchedule, or
    any function of the training progress in [0, 1]). `student()` defaults to the encoder alone.

    Put it before the Method base: `class IBOT(EMATeacherMixin, Method)`."""

    teacher: EMATeacher

    def init_teacher(self, schedule: Callable[[float], float]) -> None:
        self.ema_schedule = schedule
        self.teacher = EMATeacher(self.student())

    def student(self) -> Student:
        """The parts the teacher follows (registered in the method, not again in the teacher's copy)."""
        return self.encoder

    def momentum(self, progress: float) -> float:
        return self.ema_schedule(progress)

    def end_step(self, step: int, total_steps: int) -> None:
        super().end_step(step, total_steps)
        self.teacher.update(self.student(), self.momentum(step / max(1, total_steps)))
