"""Schedules on the sample clock, as plain functions and frozen dataclasses on floats.

Every schedule here is a function of **training progress measured in samples**, ``samples seen / total
samples`` in :math:`[0, 1]`, never of optimizer steps, so it means the same thing at every batch size
(Algorithm 1 of *How to Scale Your EMA*, Busbridge et al., NeurIPS 2023). The batch-size schedule used by
:class:`~lightning_emascale.ProgressiveBatchCallback` is checked here too. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_emascale._checks import (
    MAX_COUNT,
    MAX_COUNT_TEXT,
    as_int,
    check_count,
    check_finite,
    check_fraction,
    check_positive_int,
    check_progress,
    show,
)

__all__ = ["WarmupCosine", "batch_size_at", "check_batch_schedule", "cosine_schedule"]


def cosine_schedule(progress: float, start: float, end: float) -> float:
    r"""Half a cosine from ``start`` at progress 0 to ``end`` at progress 1.

    .. math:: v(p) = w\,\mathrm{start} + (1 - w)\,\mathrm{end}, \qquad w = \frac{1 + \cos(\pi p)}{2}

    A weighted mean of the two ends, so it stays between them (and finite) whatever their size.

    BYOL's teacher momentum is this schedule from :math:`\tau_\mathrm{base}` to 1. Evaluate it at progress in
    samples and raise the result to :math:`\kappa` (:func:`~lightning_emascale.scale_ema_momentum`).

    Args:
        progress: samples seen divided by the total samples of the run, in :math:`[0, 1]`.
        start: the value at progress 0, a finite number.
        end: the value at progress 1, a finite number.

    Example:
        >>> cosine_schedule(0.0, start=0.996, end=1.0)
        0.996
        >>> round(cosine_schedule(0.5, start=0.996, end=1.0), 6)
        0.998
        >>> cosine_schedule(1.0, start=0.996, end=1.0)
        1.0
        >>> cosine_schedule(0.5, start=1e308, end=-1e308)  # end - start would overflow to -inf
        0.0
    """
    progress = check_progress(progress)
    start, end = check_finite(start, "start"), check_finite(end, "end")
    if progress == 1.0:
        return end  # cos(pi) is -1 up to rounding; hit the end value exactly
    weight = (1.0 + math.cos(math.pi * progress)) / 2.0
    value = weight * start + (1.0 - weight) * end
    if not math.isfinite(value):  # rounding past the largest float, with both ends within an ulp of it
        raise ValueError(
            f"cosine_schedule({progress}, start={start}, end={end}) overflows a float: `start` and `end` must stay"
            " below the largest float (1.8e308) by more than rounding"
        )
    return value


@dataclass(frozen=True)
class WarmupCosine:
    r"""A learning-rate factor: linear warm-up, then a cosine decay, on progress measured in samples.

    .. math::
        f(p) = \begin{cases}
            s + (1 - s)\,p / w & p < w \\
            \mathrm{cosine}\big((p - w) / (1 - w);\ 1 \to f_\mathrm{final}\big) & p \ge w
        \end{cases}

    Use it with :class:`~lightning_emascale.SampleClockLR`: the warm-up and the decay then end at the same
    sample counts whatever the batch size. Frozen and picklable, so it works under ``ddp_spawn`` and from
    LightningCLI.

    Args:
        warmup: the fraction :math:`w \in [0, 1)` of the training samples spent warming up.
        final: the factor :math:`f_\mathrm{final} \in [0, 1]` reached at the end of training.
        warmup_start: the factor :math:`s \in [0, 1]` the warm-up starts from.

    Example:
        >>> schedule = WarmupCosine(warmup=0.1, final=0.0)
        >>> [round(schedule(p), 6) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    warmup: float = 0.0
    final: float = 0.0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        for name in ("warmup", "final", "warmup_start"):  # stored as plain floats (a numpy scalar is fine)
            object.__setattr__(self, name, check_fraction(getattr(self, name), name))
        if self.warmup == 1.0:
            raise ValueError("`warmup` must be in [0, 1): a warm-up over the whole run leaves nothing to decay, got 1")

    def __call__(self, progress: float) -> float:
        progress = check_progress(progress)
        if progress < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * progress / self.warmup
        return cosine_schedule((progress - self.warmup) / (1.0 - self.warmup), start=1.0, end=self.final)


def check_batch_schedule(schedule: Any, name: str = "schedule") -> dict[int, int]:
    """Validate an epoch → batch size schedule and return a sorted copy (the argument is never mutated).

    Keys are epochs (integers ≥ 0), values are batch sizes (integers ≥ 1), both up to
    :data:`~lightning_emascale._checks.MAX_COUNT` (2**53).

    Example:
        >>> check_batch_schedule({4: 256, 0: 32, 2: 64})
        {0: 32, 2: 64, 4: 256}
        >>> check_batch_schedule({0: 32, -1: 64})
        Traceback (most recent call last):
        ...
        ValueError: `schedule` keys must be epochs (integers >= 0), got -1
    """
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError(f"`{name}` must be a non-empty dict of epoch -> batch size, got {show(schedule)}")
    checked: dict[int, int] = {}
    for key, value in schedule.items():
        epoch, size = as_int(key), as_int(value)
        if epoch is None or epoch < 0:
            raise ValueError(f"`{name}` keys must be epochs (integers >= 0), got {show(key)}")
        if size is None or size < 1:
            raise ValueError(
                f"`{name}` values must be batch sizes (integers >= 1), got {show(value)} at epoch {show(key)}"
            )
        if epoch > MAX_COUNT:
            raise ValueError(f"`{name}` keys must be epochs (integers >= 0) up to {MAX_COUNT_TEXT}, got {show(key)}")
        if size > MAX_COUNT:
            raise ValueError(
                f"`{name}` values must be batch sizes (integers >= 1) up to {MAX_COUNT_TEXT}, got {show(value)}"
                f" at epoch {epoch}"
            )
        checked[epoch] = size
    return dict(sorted(checked.items()))


def batch_size_at(schedule: Mapping[int, int], epoch: int, default: int) -> int:
    """The batch size of ``epoch``: the value of the latest key ≤ ``epoch``, or ``default`` before the first key.

    Example:
        >>> schedule = {2: 64, 4: 256}
        >>> [batch_size_at(schedule, epoch, default=32) for epoch in range(6)]
        [32, 32, 64, 64, 256, 256]
    """
    schedule = check_batch_schedule(schedule)
    epoch = check_count(epoch, "epoch")
    size = check_positive_int(default, "default")
    for start, value in schedule.items():
        if start > epoch:
            break
        size = value
    return size
