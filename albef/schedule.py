"""Step-based schedules shared by every task."""

from __future__ import annotations

import math
from dataclasses import dataclass


def alpha_ramp(step: int, steps_per_epoch: int, alpha: float, ramp_epochs: float = 1.0) -> float:
    """Distillation weight at a global ``step``: linear from 0 to ``alpha`` over ``ramp_epochs`` epochs.

    With ``ramp_epochs=1`` this is the official ``alpha * min(1, i / len(loader))`` in epoch 0 and ``alpha``
    afterwards. Expressed in global steps so resuming mid-epoch gives the same value.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, step / (steps_per_epoch * ramp_epochs))


@dataclass(frozen=True)
class LRSchedule:
    """The official learning-rate schedule (ALBEF-SPEC §3.2), as a function of the global step.

    The official scripts drive timm's ``CosineLRScheduler`` (``warmup_prefix=True``) by hand: during epoch 0
    they call ``step(i // 100)`` every 100 iterations while ``i <= warmup_epochs * 100``, so "warm-up epochs"
    are really 100-iteration stairs from ``warmup_lr`` to ``lr``; from epoch 1 on the learning rate is the
    cosine of the epoch, ``min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2``, constant within it.
    A warm-up longer than epoch 0 is cut short there, as in the official code.
    """

    lr: float
    epochs: int
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    step_size: int = 100  # iterations per warm-up stair

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.step_size <= 0 or self.warmup_epochs < 0:
            raise ValueError(f"invalid schedule: {self}")

    def _at(self, t: int) -> float:
        """timm's CosineLRScheduler value at scheduler step ``t`` (warm-up prefix, no cycles)."""
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (self.lr - self.warmup_lr) / self.warmup_epochs
        t -= self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))

    def __call__(self, step: int, steps_per_epoch: int) -> float:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        epoch, i = divmod(step, steps_per_epoch)
        if epoch == 0:
            return self._at(min(i // self.step_size, self.warmup_epochs))
        return self._at(epoch + self.warmup_epochs)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
