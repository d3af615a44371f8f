"""``PostHocEMACallback``: a post-hoc EMA on the sample clock in the Trainer (the Lightning adapter)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Optional, Union

import lightning.pytorch as pl
from typing_extensions import override

from lightning_emascale._checks import check_name
from lightning_emascale._modes import options_from
from lightning_emascale.callback import EMAScalingCallback
from lightning_emascale.rules import OptimizerRule


class PostHocEMACallback(EMAScalingCallback):
    r"""Track power-function EMAs and snapshot them on the sample clock, to choose the EMA length after training.

    The post-hoc EMA of Karras et al. (EDM2, 2024), counted in samples rather than steps, so it is batch-size
    invariant by construction and fine under progressive batch growth: one fp32 copy per ``sigma_rel``, moved after
    every optimizer step (``update_every``) with :math:`\beta = (s / (s + b))^{\gamma + 1}`; a snapshot every
    ``snapshot_every_samples`` samples and at the end of training, written by rank 0 to ``directory``. Then::

        from lightning_emascale import reconstruct_post_hoc
        state = reconstruct_post_hoc("post_hoc", sigma_rel=0.08)            # or half_life_samples=50_000
        model.load_state_dict(state); print(state.residual)               # how close the snapshots get

    It is a :class:`~lightning_emascale.EMAScalingCallback` in post-hoc mode: κ, the optimizer rule, the
    logging (``<name>/kappa``; ``<name>/momentum`` is the β of the first ``sigma_rel``), the checkpointed state
    and an exact resume come from there. Nothing is swapped in for evaluation: the EMA is chosen afterwards.

    Args:
        sigma_rels: the lengths of the power EMAs tracked (the profile's standard deviation relative to the
            samples seen), each in :math:`(0, 1/\sqrt{12}]` (0.288675). EDM2 tracks 0.05 and 0.10; a length
            between or near them reconstructs well.
        snapshot_every_samples: samples seen (global) between snapshots. More snapshots fit a target better;
            each costs one file of ``len(sigma_rels)`` fp32 copies of the model.
        directory: where the snapshots go (``post_hoc-<samples>.pt``).
        base_batch_size, optimizer_rule, update_every, name, total_samples, include, exclude, skip_non_finite,
            side_stream: as in ``EMAScalingCallback``.

    Example:
        >>> from lightning_emascale import PostHocEMACallback
        >>> PostHocEMACallback(snapshot_every_samples=50_000, directory="post_hoc").sigma_rels
        (0.05, 0.1)
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every_samples: int = 100_000,
        directory: Union[str, os.PathLike] = "post_hoc",
        base_batch_size: Optional[int] = None,
        optimizer_rule: Union[Literal["sgd", "adam", "none"], OptimizerRule, None] = None,
        update_every: int = 1,
        name: str = "post_hoc",
        total_samples: Optional[int] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        skip_non_finite: bool = False,
        side_stream: bool = True,
    ) -> None:
        check_name(name, "name")  # the callback's own arguments first, as its parent checks them
        if not isinstance(directory, (str, os.PathLike)) or not str(directory) or os.path.isfile(directory):
            raise ValueError(f"`directory` must be a directory path (not an existing file), got {directory!r}")
        options = options_from({**locals(), "snapshot_dir": directory})
        self._set_up(options, evaluate_with_ema=False, name=name)

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The lengths of the power EMAs tracked."""
        return tuple(self._options.sigma_rels or ())

    @property
    def snapshot_every_samples(self) -> int:
        """Samples seen between snapshots."""
        return int(self._options.snapshot_every_samples or 0)

    @property
    def directory(self) -> str:
        """Where the snapshots are written."""
        return os.fspath(self._options.snapshot_dir or "")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        smoke = bool(getattr(trainer, "fast_dev_run", False))  # writes no snapshots, as it saves nothing
        if not (smoke or self._resuming or trainer.global_step > 0) and os.path.isdir(self.directory):
            earlier = sorted(name for name in os.listdir(self.directory) if name.startswith("post_hoc-"))
            if earlier:  # a new run would overwrite some and mix with the others
                raise ValueError(
                    f"`directory`={self.directory!r} already holds {len(earlier)} post-hoc snapshots of another run"
                    f" ({earlier[0]}, ...): give each run its own directory (or resume that run from its checkpoint)"
                )
        super().on_fit_start(trainer, pl_module)
        self.scaled_ema.snapshots_enabled = not smoke

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scaled_ema.save_snapshot()  # the last samples too, so that a reconstruction can end there
