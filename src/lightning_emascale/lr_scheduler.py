"""``SampleClockLR``: a learning-rate scheduler whose clock is samples seen, not optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Protocol

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_emascale._checks import MAX_COUNT, MAX_COUNT_TEXT, as_int, as_real, show


class SampleClock(Protocol):
    """Anything that reports training progress in samples: a :class:`~lightning_emascale.ScaledEMA` or an
    :class:`~lightning_emascale.EMAScalingCallback`."""

    @property
    def progress(self) -> float:
        """Samples seen divided by the total samples of the run, in :math:`[0, 1]`."""
        ...  # pragma: no cover


class SampleClockLR(LRScheduler):
    r"""Set every param group's learning rate to ``initial_lr * schedule(progress)``, progress counted in samples.

    ``progress`` is samples seen / total samples, read from ``clock``. An
    :class:`~lightning_emascale.EMAScalingCallback` in the Trainer attaches itself as the clock of every
    ``SampleClockLR`` that has none when fit starts, so a warm-up and a cosine decay end at the same sample
    counts whatever the batch size, the accumulation or the number of devices, and keep doing so when
    :class:`~lightning_emascale.ProgressiveBatchCallback` changes the batch size mid-run. The optimizer rule
    then multiplies the scheduled value by :math:`\kappa` (SGD) or :math:`\sqrt\kappa` (Adam) for each step:
    :math:`\hat\eta = \kappa\,\eta(s)`, as in Algorithm 1 of *How to Scale Your EMA*.

    Step it after every optimizer step (Lightning: ``"interval": "step"``); each call reads the clock, so the
    learning rate of the next step is :math:`\eta` at the samples seen so far. The schedule itself is not
    saved in ``state_dict``: like :class:`~torch.optim.lr_scheduler.LambdaLR`'s functions, it comes from
    your code when you resume.

    Args:
        optimizer: the wrapped optimizer, a :class:`torch.optim.Optimizer`.
        schedule: the factor as a function of progress in :math:`[0, 1]`, e.g.
            :class:`~lightning_emascale.WarmupCosine`. Must return a finite number ≥ 0 (and the learning rates it
            gives must be finite).
        clock: where to read progress: a :class:`~lightning_emascale.ScaledEMA` in a Fabric or plain loop.
            ``None`` waits for an ``EMAScalingCallback`` to attach itself when fit starts. Its ``progress`` must be
            a number in :math:`[0, 1]` whenever the scheduler steps.
        last_epoch: as in every torch scheduler; leave it at -1.

    Example:
        >>> import torch
        >>> from lightning_emascale import SampleClockLR, WarmupCosine
        >>> class Clock:
        ...     progress = 0.0
        >>> clock = Clock()
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.4)
        >>> scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1), clock=clock)
        >>> clock.progress = 0.05
        >>> optimizer.step()  # a training step, then the scheduler's
        >>> scheduler.step()
        >>> optimizer.param_groups[0]["lr"]
        0.2
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Callable[[float], float],
        clock: Optional[SampleClock] = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):  # before torch's "str is not an Optimizer"
            inner = getattr(optimizer, "optimizer", None)
            hint = f": pass its `.optimizer` ({type(inner).__name__})" if isinstance(inner, Optimizer) else ""
            raise TypeError(
                "`optimizer` must be a torch.optim.Optimizer (the optimizer whose learning rates SampleClockLR sets),"
                f" got {type(optimizer).__name__}: {show(optimizer)}{hint}"
            )
        if not callable(schedule):
            raise TypeError(f"`schedule` must be a callable of progress in [0, 1], got {show(schedule)}")
        epoch = as_int(last_epoch)
        if epoch is None or epoch < -1:
            raise ValueError(f"`last_epoch` must be an integer >= -1 (-1 starts afresh), got {show(last_epoch)}")
        if epoch > MAX_COUNT:
            raise ValueError(f"`last_epoch` must be an integer >= -1 up to {MAX_COUNT_TEXT}, got {show(last_epoch)}")
        lacking = [i for i, group in enumerate(optimizer.param_groups) if "initial_lr" not in group]
        if epoch >= 0 and lacking:
            raise ValueError(
                f"`last_epoch`={epoch} resumes a schedule, which needs `initial_lr` in every param group (param group"
                f" {lacking[0]} has none): load the optimizer's state dict first (it holds them), or pass"
                " `last_epoch=-1` to start afresh"
            )
        self.schedule = schedule
        self.clock = _check_clock(clock, allow_none=True)
        # torch writes `initial_lr` (and the first rates) into the groups before it calls `get_lr`: a schedule or
        # clock refused there must leave the groups as they were, so that a corrected retry starts from them.
        groups = [dict(group) for group in optimizer.param_groups]
        try:
            super().__init__(optimizer, last_epoch)
        except BaseException:
            for group, before in zip(optimizer.param_groups, groups):
                group.clear()
                group.update(before)
            raise

    def attach(self, clock: SampleClock) -> None:
        """Read progress from ``clock`` from now on (``EMAScalingCallback`` calls this at fit start)."""
        self.clock = _check_clock(clock, allow_none=False)

    @property
    def progress(self) -> float:
        """The clock's progress; 0 while the scheduler is being built (before a clock can be attached)."""
        if self.clock is None:
            if self.last_epoch <= 0:
                return 0.0
            raise RuntimeError(
                "SampleClockLR has no clock: add an EMAScalingCallback to the Trainer (it attaches itself when fit"
                " starts) or pass `clock=` an object with a `progress` attribute"
            )
        read = self.clock.progress
        progress = as_real(read)
        if progress is None or not 0.0 <= progress <= 1.0:
            raise ValueError(
                f"`clock` ({type(self.clock).__name__}) reported progress {show(read)}; SampleClockLR needs a number in"
                " [0, 1] (samples seen / total samples)"
            )
        return progress

    def get_lr(self) -> list[float]:  # type: ignore[override]
        progress = self.progress
        try:
            returned = self.schedule(progress)
        except TypeError as error:
            raise TypeError(
                f"`schedule` must be a callable of one argument, progress in [0, 1], that returns the learning-rate"
                f" factor; calling {self.schedule!r}({progress}) raised: {error}"
            ) from error
        factor = as_real(returned)
        if factor is None or not (math.isfinite(factor) and factor >= 0):
            raise ValueError(
                f"`schedule` must return a finite number >= 0, got {show(returned)} at progress {progress}"
            )
        lrs = [float(base) * factor for base in self.base_lrs]
        if not all(math.isfinite(lr) for lr in lrs):
            raise ValueError(
                f"`schedule` returned {factor} at progress {progress}, which times the initial learning rates"
                f" {[float(base) for base in self.base_lrs]} overflows to {lrs}: the factor must keep them finite"
            )
        return lrs

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key not in ("clock", "schedule")}


def _check_clock(clock: Any, allow_none: bool) -> Optional[SampleClock]:
    if clock is None and allow_none:
        return None
    if not hasattr(type(clock), "progress") and not hasattr(clock, "progress"):
        raise TypeError(
            f"`clock` must have a `progress` attribute (a ScaledEMA or an EMAScalingCallback), got {clock!r}"
        )
    return clock
