"""Small helpers shared by the Lightning adapters (the two callbacks)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch


def is_one_of(instance: Any, classes: tuple[type, ...]) -> bool:
    """``isinstance`` by class name too, so the twins from the standalone ``pytorch_lightning`` package count.

    Its Trainer runs these callbacks as they are (lightly's examples use it); only the class objects differ.
    """
    names = {cls.__name__ for cls in classes}
    return isinstance(instance, classes) or any(cls.__name__ in names for cls in type(instance).__mro__)


def derive_total_samples(trainer: Optional[pl.Trainer]) -> tuple[Optional[int], str]:
    """``max_epochs`` × samples per epoch × world size, or ``None`` and the reason it cannot be derived."""
    if trainer is None:
        return None, "fit has not started"
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return None, f"`max_epochs` is not set, the run is bounded by `max_steps`={trainer.max_steps}"
    limited = trainer.limit_train_batches != 1.0 or trainer.overfit_batches  # type: ignore[attr-defined]
    if limited and not trainer.fast_dev_run:  # type: ignore[attr-defined]  # a smoke test needs a clock only
        return None, "`limit_train_batches` or `overfit_batches` is set"
    loader = trainer.train_dataloader
    if loader is None:
        return None, "the train dataloader is not loaded yet"
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None, f"the train dataloader is a {type(loader).__name__}, not a single DataLoader"
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if isinstance(loader.dataset, torch.utils.data.IterableDataset) or not hasattr(sampler, "__len__"):
        return None, "the train dataset has no length (an IterableDataset)"
    return trainer.max_epochs * len(sampler) * trainer.world_size, ""  # type: ignore[arg-type]


class RunLength:
    """The training samples of a Trainer's run, for the sample clock: derived from the Trainer once per epoch.

    Callable: returns the total or raises ``ValueError`` saying why it cannot be derived and what to pass.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner  # the class whose `total_samples=` the error message points to
        self.trainer: Optional[pl.Trainer] = None
        self._this_epoch: Optional[int] = None

    def __call__(self) -> int:
        # It does not depend on the batch size, so it also holds between a ProgressiveBatchCallback's loader
        # reset and the next epoch's rebuild.
        if self._this_epoch is None:
            total, reason = derive_total_samples(self.trainer)
            if total is None:
                raise ValueError(
                    f"Cannot derive `total_samples` from the Trainer ({reason}): pass `total_samples=` to"
                    f" {self.owner}, the number of training samples (global, all devices) the run will see"
                )
            self._this_epoch = total
        return self._this_epoch

    def start_epoch(self, trainer: pl.Trainer, total_samples: Optional[int], check: bool) -> None:
        """Forget the last epoch's value; with ``check``, fail now if the total is unknown or too small."""
        self.trainer, self._this_epoch = trainer, None
        if not check:
            return
        total = total_samples or self()  # raises now, not at the first step, when it cannot be derived
        derived, _ = derive_total_samples(trainer)
        if total_samples is not None and derived is not None and trainer.max_steps == -1 and derived > total:
            assert trainer.max_epochs is not None
            raise ValueError(
                f"`total_samples`={total} is less than the {derived} samples this run trains on (max_epochs"
                f" {trainer.max_epochs} x {derived // trainer.max_epochs} per epoch): raise it, or drop it to derive it"
            )


def swap_ema_into(model_state: dict[str, Any], averages: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Replace the tracked entries of a checkpoint's ``state_dict`` by their EMA (in the entry's dtype).

    Returns the training values that were replaced, by name; tied tensors stay shared, so they are saved once.
    """
    replaced = {}
    for key, average in averages.items():
        if key in model_state:
            replaced[key] = raw[key]
            model_state[key] = average.to(model_state[key].dtype)
    return replaced
