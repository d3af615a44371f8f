"""``PostHocEMACallback``: a post-hoc EMA on the sample clock in the Trainer (the Lightning adapter)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Optional, Union

import lightning.pytorch as pl
from typing_extensions import override

from lightning_emascale._checks import check_directory, check_name
from lightning_emascale._modes import options_from
from lightning_emascale._power import PowerEMAs
from lightning_emascale.callback import EMAScalingCallback
from lightning_emascale.post_hoc_math import MAX_SIGMA_REL
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
        directory: where the snapshots go (``post_hoc-<samples>.pt``), one directory per run: a directory that
            holds a snapshot of another run (its run id, saved in the checkpoint, differs; or it has none, written
            before run ids) is refused when fit starts, on every rank. A run resumed from its checkpoint writes on
            into its own, over the snapshots an abandoned attempt wrote after that checkpoint.
        base_batch_size: the global batch the optimizer was tuned at (for κ and the rule); ``None``: the first
            step's.
        optimizer_rule: ``"sgd"``, ``"adam"``, ``"none"``/``None`` or an
            :class:`~lightning_emascale.OptimizerRule`, applied for each step only.
        update_every: update the power EMAs every this many optimizer steps.
        name: the log prefix and the checkpoint key.
        total_samples: the run's training samples (global), for ``progress``; ``None`` derives it.
        include: average only these parameters, buffers or submodules.
        exclude: leave these out.
        skip_non_finite: skip an update whose weights are not finite.
        side_stream: on a GPU, run each update on a CUDA side stream.
        resume_from_ema: resume from a checkpoint whose ``state_dict`` another callback filled with its EMA.

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
        resume_from_ema: bool = False,
    ) -> None:
        check_name(name, "name")  # the callback's own arguments first, as its parent checks them
        if sigma_rels is None:  # the one argument this callback cannot do without (None would choose no mode)
            raise ValueError(
                f"`sigma_rels` must be a non-empty sequence of lengths, each in (0, 1/sqrt(12) = {MAX_SIGMA_REL:.6f}]"
                " (EDM2 tracks (0.05, 0.10)): PostHocEMACallback tracks one power EMA per length, got None"
            )
        check_directory(directory, "directory")
        options = options_from({**locals(), "snapshot_dir": directory})
        self._set_up(options, evaluate_with_ema=False, name=name, resume_from_ema=resume_from_ema)

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
        """Build (or resume) the power EMAs, then refuse a ``directory`` that holds another run's snapshots.

        The run is the one resumed from the checkpoint (its state carries its id), the one this callback ran
        before on the same Trainer, or a new one, for which any snapshot there is another run's (also one written
        before run ids). Refused before the first step: the module's weights and the directory are left as they were.
        Rank 0 checks (it writes) and broadcasts the outcome, so that every rank raises, none waits for the others.
        """
        smoke = bool(getattr(trainer, "fast_dev_run", False))  # writes no snapshots, as it saves nothing
        super().on_fit_start(trainer, pl_module)
        self.scaled_ema.snapshots_enabled = not smoke
        averager = self.scaled_ema.averager
        assert isinstance(averager, PowerEMAs)
        averager.directory_argument = "directory"  # this callback's name for it, in every message
        refusal: Optional[Exception] = None
        try:
            averager.check_directory()  # reads the directory on rank 0 only
        except Exception as error:  # any failure: the other ranks must hear of it, not wait in the next collective
            refusal = error
        outcome = None
        if refusal is not None:
            outcome = ("ValueError" if isinstance(refusal, ValueError) else type(refusal).__name__, str(refusal))
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if refusal is not None:
            raise refusal  # rank 0 (the source): its own error, with its cause
        if outcome is not None:
            kind, message = outcome
            if kind == "ValueError":
                raise ValueError(message)
            raise RuntimeError(f"Rank 0 could not check `directory`={self.directory!r}: {kind}: {message}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scaled_ema.save_snapshot()  # the last samples too, so that a reconstruction can end there
