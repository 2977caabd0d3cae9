"""Step-based schedules shared by every task."""

from __future__ import annotations


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
