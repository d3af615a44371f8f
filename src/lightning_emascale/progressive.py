"""``ProgressiveBatchCallback``: grow the batch size (or the gradient accumulation) on an epoch schedule."""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_emascale._checks import MAX_COUNT, as_int, check_choice, check_name, check_saved_state, show
from lightning_emascale._lightning import data_parallel_size, is_one_of
from lightning_emascale.schedules import batch_size_at, check_batch_schedule

_FORMAT = 1


class ProgressiveBatchCallback(Callback):
    r"""Change the batch size at epoch boundaries, following ``schedule`` (progressive scaling).

    Starting at the base batch size and growing it later is what keeps BYOL, DINO and pseudo-labelling stable
    at large batch sizes (*How to Scale Your EMA*, Busbridge et al., NeurIPS 2023, Algorithm 1). Pair it with
    :class:`~lightning_emascale.EMAScalingCallback`, which measures :math:`\kappa` from the batches it sees:
    the EMA momentum and the optimizer follow every transition without any coupling between the two.

    ``mode="batch_size"`` writes the epoch's value to the attribute that holds the batch size, found the way
    Lightning's ``BatchSizeFinder`` finds it (the LightningModule, its ``hparams``, the datamodule and its
    ``hparams``), and rebuilds the train dataloader at the transition; Lightning re-injects the
    ``DistributedSampler``, which keeps shuffling per epoch. ``mode="accumulation"`` keeps the dataloader
    and sets ``Trainer.accumulate_grad_batches`` to ``value // micro-batch``, for batches that do not fit in
    memory. The value is a per-device batch: in ``mode="batch_size"`` the dataloader's batch, a micro-batch (with
    ``Trainer(accumulate_grad_batches=k)`` an optimizer step takes ``k`` of them); in ``mode="accumulation"`` the
    samples per device per optimizer step.

    Epochs before the schedule's first key keep the batch size the run was configured with. The batch size
    takes effect at the start of the epoch; a resumed run, mid-epoch or after a transition, gets the size of
    the epoch it resumes in. Logged as ``progressive/batch_size`` (the global batch per optimizer step, in the
    progress bar), ``progressive/accumulate_grad_batches`` in accumulation mode, and announced at every
    transition.

    Args:
        schedule: epoch (integer ≥ 0) → per-device batch size (integer ≥ 1). Copied, never mutated.
        mode: ``"batch_size"`` or ``"accumulation"``.
        batch_arg_name: the attribute that holds the batch size (``"batch_size"`` mode only).

    Example:
        >>> from lightning_emascale import ProgressiveBatchCallback
        >>> ProgressiveBatchCallback({0: 32, 2: 64, 4: 256}).schedule
        {0: 32, 2: 64, 4: 256}
    """

    def __init__(
        self,
        schedule: dict[int, int],
        mode: Literal["batch_size", "accumulation"] = "batch_size",
        batch_arg_name: str = "batch_size",
    ) -> None:
        self.schedule = check_batch_schedule(schedule)
        self.mode = check_choice(mode, "mode", ("accumulation", "batch_size"))
        self.batch_arg_name = check_name(batch_arg_name, "batch_arg_name")
        self._initial: Optional[int] = None  # the configured size, used before the schedule's first key
        self._epoch: Optional[int] = None  # the epoch whose batch size is in place
        self._announced: Optional[tuple[int, int]] = None  # (per-device batch, accumulation) last announced

    # ------------------------------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning itself refuses two instances: they share a state key.
        if stage != "fit":
            return
        late = [epoch for epoch in self.schedule if trainer.max_epochs is not None and epoch >= trainer.max_epochs > 0]
        if late:
            rank_zero_warn(
                f"ProgressiveBatchCallback: the schedule's epochs {late} are not reached with"
                f" `max_epochs`={trainer.max_epochs} (epochs are counted from 0)"
            )
        if self.mode == "batch_size":
            self._check_batch_size_mode(trainer, pl_module)
        else:
            self._check_accumulation_mode(trainer, pl_module)

    def _check_batch_size_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fit_loop._data_source.is_module():
            raise ValueError(
                "ProgressiveBatchCallback(mode='batch_size') rebuilds the train dataloader from a batch-size"
                " attribute, but the dataloader was passed straight to `trainer.fit(train_dataloaders=...)`."
                " Build it in `train_dataloader()` of your LightningModule or LightningDataModule, reading"
                f" `self.{self.batch_arg_name}`, or use `mode='accumulation'`, which keeps the dataloader."
            )
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise AttributeError(
                f"ProgressiveBatchCallback: `batch_arg_name`={self.batch_arg_name!r} was not found on the"
                " LightningModule, the datamodule, nor their `hparams`. Set `batch_arg_name` to the attribute"
                " your `train_dataloader()` reads the batch size from."
            )
        if self._initial is None:
            value = lightning_getattr(pl_module, self.batch_arg_name)
            size = as_int(value)
            if size is None or size < 1:
                raise ValueError(f"`{self.batch_arg_name}` must hold a positive integer, got {value!r}")
            self._initial = size

    def _check_accumulation_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "ProgressiveBatchCallback(mode='accumulation') sets `accumulate_grad_batches`, which manual"
                " optimization ignores: use `mode='batch_size'` or automatic optimization"
            )
        if any(is_one_of(c, (GradientAccumulationScheduler,)) for c in trainer.callbacks):  # type: ignore[attr-defined]
            raise ValueError(
                "ProgressiveBatchCallback(mode='accumulation') and GradientAccumulationScheduler both set"
                " `accumulate_grad_batches`: remove the GradientAccumulationScheduler"
            )
        if trainer.accumulate_grad_batches != 1 and self._epoch is None:
            raise ValueError(
                f"ProgressiveBatchCallback(mode='accumulation') sets `accumulate_grad_batches` itself, got"
                f" `Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})`: remove that argument"
            )

    # -------------------------------------------------------------------------------------- transitions
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the first train dataloader is built, so that a resumed run (whose dataloader state Lightning
        # restores into that first loader) gets the right size. `on_train_start` checks the guess.
        if self.mode == "batch_size":
            self._apply(trainer, pl_module, self._epoch or 0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "accumulation":
            self._initial = self._micro_batch(trainer)
            for epoch in self.schedule:  # every value now, not at the step where it would start
                self._accumulation(epoch)
        self._apply(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The next epoch's dataloader is built before `on_train_epoch_start`, so change it now.
        following = trainer.current_epoch + 1
        if trainer.max_epochs is None or trainer.max_epochs < 0 or following < trainer.max_epochs:
            self._apply(trainer, pl_module, following)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.mode == "batch_size":
            if self._set_batch_size(pl_module, epoch):
                # Lightning's BatchSizeFinder resets the loader the same way: rebuilt at the next epoch start.
                trainer.fit_loop._combined_loader = None
        else:
            trainer.accumulate_grad_batches = self._accumulation(epoch)
        self._epoch = epoch

    def _set_batch_size(self, pl_module: pl.LightningModule, epoch: int) -> bool:
        assert self._initial is not None
        value = batch_size_at(self.schedule, epoch, default=self._initial)
        if lightning_getattr(pl_module, self.batch_arg_name) == value:
            return False
        lightning_setattr(pl_module, self.batch_arg_name, value)
        return True

    def _accumulation(self, epoch: int) -> int:
        assert self._initial is not None
        value = batch_size_at(self.schedule, epoch, default=self._initial)
        if value % self._initial:
            raise ValueError(
                f"ProgressiveBatchCallback(mode='accumulation'): the batch size {value} of epoch {epoch} is not a"
                f" multiple of the dataloader's per-device batch size {self._initial}"
            )
        return value // self._initial

    def _micro_batch(self, trainer: pl.Trainer) -> int:
        sizes = {_loader_batch_size(loader) for loader in _loaders(trainer.train_dataloader)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "ProgressiveBatchCallback(mode='accumulation') needs one train DataLoader with a known `batch_size`"
                f" to turn batch sizes into accumulation factors, got batch sizes {sorted(map(str, sizes))}"
            )
        return next(iter(sizes))  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ checks and logging
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        micro = self._verified_micro_batch(trainer, pl_module)
        current = (micro, trainer.accumulate_grad_batches)
        if current != self._announced:
            before = self._announced
            self._announced = current
            replicas = data_parallel_size(trainer)  # tensor-parallel ranks share their samples
            global_batch = micro * current[1] * replicas
            change = "" if before is None else f" (was {before[0]} x {before[1]})"
            rank_zero_info(
                f"ProgressiveBatchCallback: epoch {trainer.current_epoch} trains with {micro} per device x"
                f" {current[1]} accumulated x {replicas} devices = {global_batch} samples per"
                f" optimizer step{change}{_kappas(trainer, global_batch)}"
            )
            metrics = {"progressive/batch_size": float(global_batch)}
            if self.mode == "accumulation":
                metrics["progressive/accumulate_grad_batches"] = float(current[1])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _verified_micro_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.mode == "accumulation":
            assert self._initial is not None
            return self._initial
        expected = lightning_getattr(pl_module, self.batch_arg_name)
        # Several loaders (a CombinedLoader: labelled and unlabelled streams of other sizes): one must follow it.
        sizes = [_loader_batch_size(loader) for loader in _loaders(trainer.train_dataloader)]
        if expected in sizes:
            return expected  # type: ignore[return-value]
        built = [size for size in sizes if size is not None]
        if not built:
            rank_zero_warn(
                "ProgressiveBatchCallback cannot read the batch size of the train dataloader (a custom batch"
                f" sampler without `batch_size`) to check that it follows `{self.batch_arg_name}`"
            )
            return expected  # type: ignore[return-value]
        shown = built[0] if len(built) == 1 else f"{built} (one per loader; none follows it)"
        raise RuntimeError(
            f"ProgressiveBatchCallback set `{self.batch_arg_name}`={expected} for epoch"
            f" {trainer.current_epoch}, but the train dataloader was built with batch_size={shown}: make"
            f" `train_dataloader()` read `self.{self.batch_arg_name}` (or `self.hparams.{self.batch_arg_name}`)"
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._announced is None:
            return
        micro, accumulation = self._announced
        pl_module.log(
            "progressive/batch_size",
            float(micro * accumulation * data_parallel_size(trainer)),
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=1,
        )

    # -------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "epoch": self._epoch, "initial": self._initial}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = "The checkpoint's ProgressiveBatchCallback state"
        check_saved_state(state_dict, where, _FORMAT, ("epoch", "initial"))
        for key, lowest in (("epoch", 0), ("initial", 1)):  # both None before the first fit
            value = state_dict[key]
            if value is not None and (as_int(value) is None or not lowest <= value <= MAX_COUNT):
                raise ValueError(
                    f"{where} has {key}={show(value)}; None or an integer >= {lowest} and at most {MAX_COUNT} is"
                    " allowed"
                )
        self._epoch = None if state_dict["epoch"] is None else int(state_dict["epoch"])
        self._initial = None if state_dict["initial"] is None else int(state_dict["initial"])


@runtime_checkable
class _MeasuresKappa(Protocol):
    """A callback that measures kappa against a base batch (an ``EMAScalingCallback``), as this module sees it."""

    name: str
    resolved_base_batch_size: Optional[int]


def _kappas(trainer: pl.Trainer, global_batch: int) -> str:
    """The kappa each EMA callback will measure for a full step, for the transition message."""
    emas = [c for c in trainer.callbacks if isinstance(c, _MeasuresKappa)]  # type: ignore[attr-defined]
    parts = [
        f"kappa {global_batch / c.resolved_base_batch_size:g} for {c.name!r}"
        for c in emas
        if c.resolved_base_batch_size is not None
    ]
    return f", {', '.join(parts)}" if parts else ""


def _loaders(iterables: Any) -> list[Any]:
    if isinstance(iterables, dict):
        return [loader for value in iterables.values() for loader in _loaders(value)]
    if isinstance(iterables, (list, tuple)):
        return [loader for value in iterables for loader in _loaders(value)]
    return [iterables]


def _loader_batch_size(loader: Any) -> Optional[int]:
    if not isinstance(loader, DataLoader):
        return None
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)
