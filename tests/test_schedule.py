"""The official learning-rate schedule, checked against the values ALBEF-SPEC §3.2 computes."""

from __future__ import annotations

import pytest

from albef.schedule import LRSchedule


def test_pretraining_schedule():
    sched = LRSchedule(lr=1e-4, epochs=30, warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=20)
    per_epoch = 5000
    assert sched(0, per_epoch) == pytest.approx(1e-5)
    assert sched(99, per_epoch) == pytest.approx(1e-5)  # stairs of 100 iterations
    assert sched(100, per_epoch) == pytest.approx(1e-5 + 9e-5 / 20)
    assert sched(1999, per_epoch) == pytest.approx(1e-5 + 19 * 9e-5 / 20)
    assert sched(2000, per_epoch) == pytest.approx(1e-4)  # warm-up done after 2,000 iterations
    assert sched(4999, per_epoch) == pytest.approx(1e-4)
    assert sched(per_epoch, per_epoch) == pytest.approx(9.98e-5, abs=5e-8)  # epoch 1
    assert sched(15 * per_epoch + 7, per_epoch) == pytest.approx(5.50e-5, abs=5e-8)
    assert sched(29 * per_epoch, per_epoch) == pytest.approx(1.02e-5, abs=5e-8)


@pytest.mark.parametrize(
    ("name", "sched", "epoch0", "later"),
    [
        (
            "vqa",
            LRSchedule(lr=2e-5, epochs=8, warmup_epochs=4),
            2e-5,
            [1.93e-5, 1.72e-5, 1.41e-5, 1.05e-5, 6.86e-6, 3.78e-6, 1.72e-6],
        ),
        (
            "nlvr",
            LRSchedule(lr=2e-5, epochs=10, warmup_epochs=1),
            2e-5,
            [1.95e-5, 1.82e-5, 1.61e-5, 1.34e-5, 1.05e-5, 7.56e-6, 4.92e-6, 2.81e-6, 1.46e-6],
        ),
        ("ve", LRSchedule(lr=2e-5, epochs=5, warmup_epochs=1), 2e-5, [1.82e-5, 1.34e-5, 7.56e-6, 2.81e-6]),
        ("coco", LRSchedule(lr=1e-5, epochs=5, warmup_epochs=1), 1e-5, [9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6]),
    ],
)
def test_finetuning_schedules(name, sched, epoch0, later):
    per_epoch = 1000
    assert sched(0, per_epoch) == pytest.approx(sched.warmup_lr)
    assert sched(per_epoch - 1, per_epoch) == pytest.approx(epoch0)
    for epoch, expected in enumerate(later, start=1):
        assert sched(epoch * per_epoch + 3, per_epoch) == pytest.approx(expected, rel=4e-3), (
            name,
            epoch,
        )  # spec: 3 digits


def test_a_warmup_longer_than_epoch_zero_is_cut_short():
    sched = LRSchedule(lr=1e-4, epochs=30, warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=20)
    assert sched(999, 1000) == pytest.approx(1e-5 + 9 * 9e-5 / 20)  # still on the stairs
    assert sched(1000, 1000) == pytest.approx(9.98e-5, abs=5e-8)  # epoch 1: cosine, as the official code


def test_invalid_schedules():
    with pytest.raises(ValueError):
        LRSchedule(lr=1e-4, epochs=0)
    with pytest.raises(ValueError):
        LRSchedule(lr=1e-4, epochs=3)(0, 0)
