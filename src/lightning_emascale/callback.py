"""``EMAScalingCallback``: the Lightning adapter of :class:`~lightning_emascale.ScaledEMA`."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_emascale._batch import measure_batch_size
from lightning_emascale._checks import check_bool, check_evaluate_with_ema, check_name
from lightning_emascale._lightning import (
    RunLength,
    SpawnedFitFile,
    WeightsOnlyCheckpointHook,
    check_first_batch,
    data_parallel_size,
    fingerprint,
    is_one_of,
    is_sharded_module,
    optimizer_steps_taken,
    spawned_workers,
    uses_deepspeed,
)
from lightning_emascale._modes import options_from
from lightning_emascale._options import EMAOptions, MomentumSchedule, OptionsView
from lightning_emascale._resume import (
    MODEL_ENTRIES,
    check_callback_state,
    check_resumed_state,
    ema_put_into_model,
    ema_states_of_others,
    model_entries_hold_ema,
    refuse_resume_from_ema,
)
from lightning_emascale._sharded import is_fsdp1
from lightning_emascale._sharded_checkpoint import load_ema, put_ema, put_sharded_ema
from lightning_emascale._teacher import Frozen, freeze_teachers
from lightning_emascale._zero import is_deepspeed_engine
from lightning_emascale.batchnorm import update_bn
from lightning_emascale.core import ScaledEMA
from lightning_emascale.lr_scheduler import SampleClockLR
from lightning_emascale.presets import split_preset_arguments
from lightning_emascale.rules import OptimizerRule

_BEFORE_FIT = "before fit"  # the "format" of the state of a callback whose fit has not started


def _from_core(name: str, before_fit: Any) -> property:
    """A property of the ScaledEMA, or ``before_fit`` while fit has not built it; after a ``ddp_spawn`` fit, whose
    EMA stayed in the workers, it raises what :attr:`EMAScalingCallback.scaled_ema` raises rather than answer
    ``before_fit``."""

    def get(self: EMAScalingCallback) -> Any:
        if self._ema is not None:
            return getattr(self._ema, name)
        if self._spawn_file.exists():
            return self.scaled_ema  # raises: the values are the workers'
        return before_fit

    return property(get, doc=getattr(ScaledEMA, name).__doc__)


class EMAScalingCallback(OptionsView, Callback):
    r"""Keep a model EMA whose horizon, counted in samples, does not depend on the batch size.

    The Lightning adapter of :class:`~lightning_emascale.ScaledEMA` (the rule, the sample clock and the EMA:
    see its docstring), built when fit starts (:attr:`scaled_ema`). Each micro-batch counts
    :meth:`batch_size_of` × the data-parallel size (the world size; fewer under tensor parallelism, whose ranks
    share their samples); the total samples come from ``max_epochs``; every
    :class:`~lightning_emascale.SampleClockLR` without a clock gets this one; evaluation runs on the EMA; the
    keys of :meth:`ScaledEMA.metrics` are logged (``<name>/kappa`` and ``/half_life`` in the progress bar).

    Args:
        momentum: :math:`\rho \in [0, 1)` tuned at ``base_batch_size`` (the cosine schedule's start); ``None``:
            0.999.
        base_batch_size: the global batch (all devices, all micro-batches of a step) ``momentum`` and the optimizer
            were tuned at; ``None``: the first step's.
        optimizer_rule: ``"sgd"`` (LR × κ), ``"adam"`` (LR × √κ, betas, eps), ``"none"``/``None`` or an
            :class:`~lightning_emascale.OptimizerRule`, applied for each step only.
        evaluate_with_ema: validate, test and predict on the EMA (the training weights restored exactly after),
            and save it as the checkpoint's ``state_dict`` for ``load_from_checkpoint``; ``fit(ckpt_path=...)``
            still resumes the training weights. ``None``: True, or False in teacher mode.
        update_every: update every this many optimizer steps, with the product of their :math:`\hat\rho`.
        warmup: ``True`` or ``"ratio"``: :math:`\rho_t = \min(\rho, (1 + t)/(10 + t))`; ``"inverse-power"``:
            :math:`\min(\rho, 1 - (1 + t/\gamma)^{-p})`; :math:`t` = samples since the start / base batch size.
        warmup_gamma: :math:`\gamma` of the inverse-power warm-up (``None``: 1).
        warmup_power: :math:`p` of the inverse-power warm-up (``None``: 2/3).
        min_momentum: a floor under the momentum after the warm-up (the peers' ``min_decay``/``min_value``).
        start_after_samples: a delayed start: every step that starts at most this many samples into training has
            momentum 0 (an update sets the EMA to the weights); averaging starts with the next step (the peers'
            ``update_after_step`` × base batch).
        debias: a zero-initialised EMA divided by its total weight (bias correction); the first update copies.
        switch_every_samples: "switch EMA": after the update of the first step that starts at or past each multiple
            of this many samples, write the EMA into the model's weights.
        switch_momentum: the share of the training weights a switch keeps (0 copies the EMA).
        ema_precision: ``"fp32"`` keeps the EMA of float16/bfloat16 tensors in float32; ``"model"`` their dtype.
        name: the log prefix (``"<name>/kappa"``, ...) and the checkpoint key. Give several instances
            different names.
        momentum_schedule: ``"constant"``, ``"cosine"`` (to ``final_momentum``) or a callable of progress that
            returns the momentum (picklable under ``ddp_spawn``: a module-level function or a frozen dataclass,
            not a lambda).
        final_momentum: where the cosine schedule ends, in :math:`[0, 1]` (BYOL: 1.0).
        total_samples: the run's training samples (global), for :attr:`progress`. ``None`` derives
            ``max_epochs`` × samples per epoch; pass it where that cannot be derived (an ``IterableDataset``,
            ``max_steps`` that stops the run first, ``limit_train_batches``).
        teachers: teacher mode: online → teacher submodule paths, e.g. ``{"backbone": "backbone_momentum"}``;
            nothing is swapped for evaluation.
        momentum_attributes: attribute path → its momentum at ``base_batch_size`` (DINO's
            ``{"criterion.center_momentum": 0.9}``), set to :math:`\rho^{b/B}` for every micro-batch and restored
            when fit ends.
        center_momenta: path → the momentum at ``base_batch_size`` of a centre updated once per optimizer step with
            the mean over its micro-batches (lightly's ``DINOLoss`` or ``Center``: ``{"criterion": 0.9}``), exact
            under gradient accumulation.
        include: average only these parameters, buffers or submodules (names or paths).
        exclude: leave these out (e.g. ``["discriminator"]``).
        skip_non_finite: skip an update whose weights are not finite (decided on the device, no host sync).
        freeze_teachers: teacher mode: ``requires_grad_(False)`` on the teachers (in ``setup``, before DDP wraps
            the module) instead of refusing them.
        flat_parameters: deprecated (no whole step was faster): move the module's tensors into one buffer laid
            out as the EMA.
        offload: keep the EMA in CPU memory, updated in a background thread.
        side_stream: on a GPU, run each update on a CUDA side stream, beside the next forward and backward.
        copy_on_swap: evaluation copies the averages into the module instead of pointing it at them.
        resume_from_ema: let ``fit(ckpt_path=...)`` continue training from the EMA where the checkpoint's
            ``state_dict`` holds an EMA whose training weights this callback cannot restore (its state lacks them,
            or they belong to a callback of another class or ``name``). False: such a resume is refused.
        copy_at_end: when training ends, write the EMA into the model's weights for good (as Lightning's
            ``EMAWeightAveraging`` does); a checkpoint saved afterwards holds it as the training weights too.
        update_bn_at_end: when training ends, recompute the BatchNorm statistics of the EMA weights over one pass of
            the training loader (:func:`~lightning_emascale.update_bn`; the module's ``forward`` on the first element
            of each batch, moved and cast as in training), before ``copy_at_end``. Under DDP each rank runs its
            shard of the data and the ranks' statistics are then averaged, so every rank holds the same EMA.

    Every ``trainer.fit`` that does not resume (no checkpoint state, ``global_step`` 0) starts afresh: a callback
    built once for a K-fold loop restarts its clock and its EMA with each fold. With ``evaluate_with_ema``, a
    weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``) holds the EMA too.

    Example:
        >>> from lightning_emascale import EMAScalingCallback
        >>> ema = EMAScalingCallback(momentum=0.999, base_batch_size=256, optimizer_rule="sgd")
        >>> ema.state_key
        "EMAScalingCallback{'name': 'ema'}"
    """

    copy_at_end = False  # the constructor's; a subclass that builds through `_set_up` keeps these
    update_bn_at_end = False

    def __init__(
        self,
        momentum: Optional[float] = None,
        base_batch_size: Optional[int] = None,
        optimizer_rule: Union[Literal["sgd", "adam", "none"], OptimizerRule, None] = None,
        evaluate_with_ema: Optional[bool] = None,
        update_every: int = 1,
        warmup: Union[bool, Literal["ratio", "inverse-power"]] = False,
        warmup_gamma: Optional[float] = None,
        warmup_power: Optional[float] = None,
        min_momentum: Optional[float] = None,
        start_after_samples: Optional[int] = None,
        debias: bool = False,
        switch_every_samples: Optional[int] = None,
        switch_momentum: float = 0.0,
        ema_precision: Literal["fp32", "model"] = "fp32",
        name: str = "ema",
        momentum_schedule: MomentumSchedule = "constant",
        final_momentum: Optional[float] = None,
        total_samples: Optional[int] = None,
        teachers: Optional[dict[str, str]] = None,
        momentum_attributes: Optional[dict[str, float]] = None,
        center_momenta: Optional[dict[str, float]] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        skip_non_finite: bool = False,
        freeze_teachers: bool = False,
        flat_parameters: bool = False,
        offload: bool = False,
        side_stream: bool = True,
        copy_on_swap: bool = False,
        resume_from_ema: bool = False,
        copy_at_end: bool = False,
        update_bn_at_end: bool = False,
    ) -> None:
        self._set_up(options_from(locals()), evaluate_with_ema, name, resume_from_ema)
        self.copy_at_end = check_bool(copy_at_end, "copy_at_end")
        self.update_bn_at_end = check_bool(update_bn_at_end, "update_bn_at_end")
        if (copy_at_end or update_bn_at_end) and self._options.mode != "polyak":
            raise ValueError(
                "`copy_at_end` and `update_bn_at_end` act on the one averaged copy of a Polyak EMA, and teacher mode"
                " keeps none: drop them"
            )

    @classmethod
    def from_preset(
        cls, tool: str, *, base_batch_size: int, total_samples: Optional[int] = None, **arguments: Any
    ) -> EMAScalingCallback:
        """A callback configured as ``tool``'s EMA, from the tool's own constructor arguments (its names and
        defaults), beside any of this class's other arguments: equal to the tool's EMA at ``base_batch_size``, the
        tool's horizon in samples at any other. See :func:`~lightning_emascale.presets.preset_options`.

        Args:
            tool: ``"timm"``, ``"ema_pytorch"``, ``"diffusers"``, ``"lightning"``, ``"lightly"`` or ``"composer"``.
            base_batch_size: the global batch the tool's configuration was tuned at.
            total_samples: as in the constructor.
            **arguments: the tool's arguments (``decay=0.999``) and this class's others (``optimizer_rule="sgd"``).

        Example:
            >>> callback = EMAScalingCallback.from_preset("lightning", base_batch_size=128, decay=0.999)
            >>> callback.momentum, callback.start_after_samples
            (0.999, 0)
        """
        return cls(**split_preset_arguments(tool, base_batch_size, total_samples, arguments))

    def _set_up(
        self, options: EMAOptions, evaluate_with_ema: Optional[bool], name: str, resume_from_ema: bool = False
    ) -> None:
        """What every constructor of this class and its subclasses does with its checked options."""
        self._options = options
        self.evaluate_with_ema = check_evaluate_with_ema(evaluate_with_ema, teacher_mode=bool(options.teachers))
        self.name = check_name(name, "name")
        self.resume_from_ema = check_bool(resume_from_ema, "resume_from_ema")
        if hasattr(self, "momentum_at"):  # 0.1's hook, superseded: fail rather than ignore an override
            raise TypeError(
                f"{type(self).__name__} overrides `momentum_at`, which no longer shapes the schedule: pass the"
                " shape as `momentum_schedule=`, a callable of progress in [0, 1] that returns the momentum"
            )
        self._ema: Optional[ScaledEMA] = None
        self._state_to_load: Optional[dict[str, Any]] = None  # loaded before fit start built the ScaledEMA
        self._module_loaded_from_ema = False  # evaluation after load_from_checkpoint-style loading
        self._run_length = RunLength(type(self).__name__)  # the total samples, derived from the Trainer
        self._step_at_batch_start = 0
        self._replicas = 1  # the processes that train on different samples (tensor-parallel ranks share theirs)
        self._resuming = False  # this fit loaded a checkpoint's state for this callback
        self._fit_starting = False  # between setup("fit") and on_fit_start: states are stashed, not applied
        self._evaluating = False  # between setup and teardown of validate/test/predict
        self._stale: list[str] = []  # tracked tensors the user changed since fit, found when evaluation sets up
        self._first_batch_checked = False
        self._warned_no_update = False
        self._skipped_reported = 0
        self._checkpoint_hook: Optional[WeightsOnlyCheckpointHook] = None
        self._spawn_file = SpawnedFitFile()  # carries the EMA from ddp_spawn's fit workers to later evaluations
        self._frozen: Optional[Frozen] = None  # teachers frozen by this fit's setup, until the fit starts

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ----------------------------------------------------------------------------------------------- public
    @property
    def scaled_ema(self) -> ScaledEMA:
        """The :class:`~lightning_emascale.ScaledEMA` this callback drives (built when fit starts)."""
        if self._ema is None and self._spawn_file.exists():
            raise RuntimeError(
                "The EMA and its clock (samples seen, kappa, ...) stayed in the worker processes of the"
                " `strategy='ddp_spawn'` fit: this process never held them. Evaluate with"
                " `trainer.validate/test/predict`, which get the EMA back, or load the checkpoint, whose `state_dict`"
                " is the EMA (and its callback state the clock)."
            )
        if self._ema is None:
            raise RuntimeError(
                "The EMA does not exist yet: it is created when `trainer.fit` starts. Call this inside or after fit."
                " (Under `strategy='ddp_spawn'` fit runs in worker processes and the EMA stays there: evaluate with"
                " `trainer.validate/test/predict`, which get it back, or load the checkpoint, whose `state_dict` is"
                " the EMA.)"
            )
        return self._ema

    samples_seen = _from_core("samples_seen", 0)
    optimizer_steps = _from_core("optimizer_steps", 0)
    kappa = _from_core("kappa", math.nan)
    ema_momentum = _from_core("ema_momentum", math.nan)
    momentum_per_update = _from_core("momentum_per_update", math.nan)
    progress = _from_core("progress", 0.0)
    ema_updates = _from_core("ema_updates", 0)
    global_batch_size = _from_core("global_batch_size", 0)

    @property
    def resolved_base_batch_size(self) -> Optional[int]:
        """``base_batch_size``, or the first step's global batch once it is known."""
        return self._ema.resolved_base_batch_size if self._ema else self._options.base_batch_size

    @property
    def resolved_total_samples(self) -> int:
        """``total_samples``, or ``max_epochs`` × samples per epoch (global) derived from the Trainer."""
        return self._options.total_samples or self._run_length()

    def batch_size_of(self, batch: Any) -> int:
        """Samples in one micro-batch on this device: the first dimension every tensor of the batch shares.

        Raises when its tensors disagree (a 1-element metadata tensor, a list counted by a feature dimension) or
        when the first batch disagrees with the train dataloader's ``batch_size``. Override it for such batches.
        """
        return measure_batch_size(batch)

    def momentum_attribute_values(self) -> dict[str, float]:
        """The current value of every momentum attribute, by path (``{}`` before fit)."""
        return {} if self._ema is None else self._ema.momentum_attribute_values()

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA of every tracked parameter and buffer, by the module's names (EMA dtype, live tensors)."""
        return self.scaled_ema.ema_state_dict()

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Hold the EMA weights in the module inside the block (e.g. to export them); restore exactly after."""
        with self.scaled_ema.swapped():
            yield

    def functional_call(self, module: torch.nn.Module, args: Any, kwargs: Optional[dict[str, Any]] = None) -> Any:
        """Run ``module`` on the EMA weights without touching its own, e.g. to log raw and EMA metrics in one step."""
        return self.scaled_ema.functional_call(module, args, kwargs)

    # ------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        fsdp1_flat = is_one_of(strategy, (FSDPStrategy,)) and not getattr(strategy, "kwargs", {}).get("use_orig_params")
        if fsdp1_flat:
            raise RuntimeError(
                "EMAScalingCallback supports single-device, DDP, ModelParallelStrategy (FSDP2 `fully_shard` and"
                " tensor parallelism), DeepSpeedStrategy (ZeRO 1, 2 and 3) and FSDPStrategy with"
                " use_orig_params=True (its default), each rank averaging its own shards; got FSDPStrategy with"
                " use_orig_params=False. Keep FSDPStrategy's `use_orig_params=True`, or shard with `fully_shard` in"
                " `configure_model` and use `ModelParallelStrategy`."
            )
        # Lightning itself rejects two instances with the same `name` (their state keys collide).
        swapping = [c.name for c in trainer.callbacks if isinstance(c, EMAScalingCallback) and c.evaluate_with_ema]  # type: ignore[attr-defined]
        if len(swapping) > 1:
            raise ValueError(
                f"Only one EMAScalingCallback may set `evaluate_with_ema=True`, got {swapping}: set it to False"
                " on the others and evaluate them with `functional_call` or `ema_weights()`"
            )
        self._run_length.trainer = trainer
        self._module_loaded_from_ema = False
        if stage == "fit":
            self._resuming, self._fit_starting = False, True
            self._state_to_load = None  # an evaluation's checkpoint is no state to resume
            if spawned_workers(trainer):
                self._spawn_file.clear(trainer)
            if self._options.freeze_teachers and self._options.teachers:
                self._frozen = freeze_teachers(pl_module, self._options.teachers)  # before DDP wraps the module
            return
        # Before the strategy's setup, which re-broadcasts every tensor under DDP: what differs now from what
        # the EMA last saw was changed by the user since fit (weights loaded by hand).
        self._evaluating = True
        spawned = self._ema_from_spawned_fit(trainer, pl_module)
        ema = self._ema
        stale = ema.changed_since_seen() if ema is not None and ema.module is pl_module else []
        self._stale = spawned if spawned is not None else stale

    def _ema_from_spawned_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[list[str]]:
        """In a ddp_spawn worker that evaluates after fit: rebuild the EMA that fit's workers left behind, and
        return the names of the tensors changed since (``None`` when there is nothing to rebuild)."""
        # also in the main process after a ddp_spawn fit, evaluating on a single device
        saved = None if self._ema is not None else self._spawn_file.read(pl_module.device)
        if saved is None:
            return None
        with warnings.catch_warnings():  # the user was warned when the callback was built
            warnings.simplefilter("ignore", FutureWarning)
            options = dataclasses.replace(  # evaluation only: no optimizer; the options are checked again
                self._options, optimizer_rule=None, momentum_attributes=self._options.momentum_attributes or None
            )
        self._ema = ScaledEMA.from_options(pl_module, None, options, auto_end_step=False)
        self._ema.load_state_dict(saved["state"])
        now = fingerprint(self._ema.raw_state_dict())
        return [name for name, digest in now.items() if saved["fingerprint"].get(name) != digest]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._replicas = data_parallel_size(trainer)
        continuing = self._resuming or trainer.global_step > 0  # a resume, or fit again on the same Trainer
        wrapped = trainer.strategy.model
        # A fit on the same Trainer under DeepSpeed builds a new engine, whose ZeRO-3 partitions and fp32 masters
        # are new tensors: the EMA is built again on them, and keeps its averages and clock.
        carried = None
        ema = self._ema
        if continuing and ema is not None and uses_deepspeed(trainer) and ema.deepspeed_engine is not wrapped:
            carried = ema.state_dict()
        if self._ema is None or self._ema.module is not pl_module or not continuing or carried is not None:
            # A new run (also a K-fold loop reusing this callback): a new EMA of the module's current tensors. Under
            # FSDP1 the root wrapper is given: its checkpoints and reshards go through it; under DeepSpeed the
            # engine, which drops the gathered copies of ZeRO-3 parameters.
            keep_wrapper = wrapped is not None and (is_fsdp1(wrapped) or is_deepspeed_engine(wrapped))
            module = wrapped if wrapped is not None and keep_wrapper else pl_module
            if self._ema is not None:
                self._ema.detach()
            self._ema = ScaledEMA.from_options(
                module, trainer.optimizers, self._options, auto_end_step=False, total_samples_from=self._run_length
            )
            if carried is not None:
                self._ema.load_state_dict(carried)
        else:
            self._ema.attach(trainer.optimizers)
        # Automatic optimization runs forward and backward inside `optimizer.step()`: wait for the side stream
        # after them (`on_before_optimizer_step`), not in the pre-step hook, so that the update overlaps them.
        # Manual optimization, or an overridden `optimizer_step`, may step the raw optimizer, which Lightning does
        # not see: there the pre-step hook waits.
        self._ema.wait_before_step = not pl_module.automatic_optimization or is_overridden(
            "optimizer_step", pl_module, pl.LightningModule
        )
        if self._state_to_load is not None:
            self._ema.load_state_dict(self._state_to_load)
            self._state_to_load = None
        self._check_end_of_fit_options(self._ema, pl_module)
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, SampleClockLR) and config.scheduler.clock is None:
                config.scheduler.attach(self)
        self._first_batch_checked = False
        self._warned_no_update = False
        self._skipped_reported = self._ema.skipped_updates if self._options.skip_non_finite else 0
        if self.evaluate_with_ema and self._ema.swappable and not uses_deepspeed(trainer):
            self._checkpoint_hook = WeightsOnlyCheckpointHook.install(pl_module, self._put_ema_into)
        self._fit_starting = False
        self._frozen = None  # the fit has started: the teachers stay frozen

    def _check_end_of_fit_options(self, ema: ScaledEMA, pl_module: pl.LightningModule) -> None:
        """``copy_at_end`` and ``update_bn_at_end`` act when training ends: refuse what they cannot do now."""
        if self.copy_at_end:
            ema.refuse_writes_under_deepspeed("`copy_at_end=True`")
        if not self.update_bn_at_end:
            return
        if ema.is_sharded:
            raise NotImplementedError(
                "`update_bn_at_end=True` is not supported for a sharded module (each rank holds only its shards of"
                " the EMA): recompute the statistics on one process with `update_bn` after loading the EMA from a"
                " full checkpoint"
            )
        if not is_overridden("forward", pl_module, pl.LightningModule):
            raise ValueError(
                f"`update_bn_at_end=True` runs {type(pl_module).__name__}.forward on the first element of each"
                " training batch, and it defines no `forward`: define one, or call"
                " `update_bn(loader, callback, forward=...)` yourself when fit ends"
            )

    def _update_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ema: ScaledEMA) -> None:
        """``update_bn_at_end``: one pass of the training loader, each batch moved and cast as the Trainer's own
        (device, precision plugin), then under DDP the mean of the ranks' statistics, so the ranks agree."""
        precision = trainer.precision_plugin

        def forward(batch: Any) -> None:
            batch = precision.convert_input(trainer.strategy.batch_to_device(batch))
            with precision.forward_context():
                pl_module(*_inputs(batch))

        update_bn(trainer.train_dataloader or [], ema, forward=forward)  # none: update_bn says the loader was empty
        if trainer.world_size > 1:
            averages = ema.ema_state_dict()
            for name, module in pl_module.named_modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                    for key in (f"{name}.running_mean", f"{name}.running_var"):
                        if key in averages:
                            averages[key].copy_(trainer.strategy.reduce(averages[key].clone(), reduce_op="mean"))

    def _put_ema_into(self, checkpoint: dict[str, Any]) -> None:
        """A weights-only checkpoint (Lightning calls no callback hook for it): its ``state_dict`` is the EMA."""
        ema = self._ema
        if ema is not None and ema.ema_updates > 0:
            self._put(ema, checkpoint, None)

    def _put(self, ema: ScaledEMA, checkpoint: dict[str, Any], state: Optional[dict[str, Any]]) -> None:
        """The EMA into a checkpoint being written (``state``: this callback's entry, ``None`` if weights only)."""
        if not ema.is_sharded:
            put_ema(ema, checkpoint, state)
            return
        trainer = self._run_length.trainer
        assert trainer is not None  # set in setup
        swap = self.evaluate_with_ema and ema.ema_updates > 0 and ema.swappable
        put_sharded_ema(
            ema, trainer.strategy, checkpoint, state, f"_emascale.{self.name}.", swap, trainer.is_global_zero
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = trainer.estimated_stepping_batches
        if self._options.update_every > steps:
            self._warned_no_update = True
            rank_zero_warn(
                f"{self.state_key}: `update_every`={self._options.update_every} is more than the"
                f" {int(steps)} optimizer steps of this run, so the EMA is never updated: validation and"
                " checkpoints hold the training weights. Lower `update_every`."
            )
        if self._options.total_samples is not None and not self._progress_needed(trainer):
            rank_zero_warn(
                f"{self.state_key}: `total_samples`={self._options.total_samples} is read by nothing here: the"
                " momentum schedule is constant and no SampleClockLR follows this clock. Drop it (unless your code"
                " reads `progress`), or use `momentum_schedule='cosine'`/a callable, or a SampleClockLR."
            )

    def _progress_needed(self, trainer: pl.Trainer) -> bool:
        clocked = any(getattr(c.scheduler, "clock", None) in (self, self._ema) for c in trainer.lr_scheduler_configs)
        return self._options.schedule_uses_progress or clocked

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train dataloader of the epoch exists now (a ProgressiveBatchCallback may have rebuilt it).
        needed = self._progress_needed(trainer)
        self._run_length.start_epoch(trainer, self._options.total_samples, check=needed)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._options.skip_non_finite or self._ema is None:
            return
        skipped = self._ema.skipped_updates  # one host sync per epoch
        if skipped > self._skipped_reported:
            rank_zero_warn(
                f"{self.state_key}: {skipped - self._skipped_reported} EMA update(s) skipped this epoch because the"
                f" weights were not finite ({skipped} in all, logged as `{self.name}/skipped_updates`); the EMA"
                " kept its last finite value"
            )
            self._skipped_reported = skipped

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._ema
        if ema is not None:
            ema.wait()  # before Lightning moves the module off the GPU
        # Not after a smoke test or a stop a callback asked for (early stopping): the schedule was cut on purpose.
        cut = trainer.interrupted or trainer.should_stop or getattr(trainer, "fast_dev_run", False)
        if ema is not None and self._progress_needed(trainer) and not cut:
            total = ema.resolved_total_samples
            if ema.samples_seen < total:
                given = self._options.total_samples is not None
                rank_zero_warn(
                    f"{self.state_key}: the momentum schedule stopped at progress {ema.samples_seen / total:.3g}: the"
                    f" run trained on {ema.samples_seen} samples"
                    + (f" of `total_samples`={total}" if given else f" of the {total} derived from `max_epochs`")
                    + ", so the schedule (and a SampleClockLR on this clock) never reached its end. Set"
                    " `total_samples` to the samples (global) this run trains on"
                )
        if ema is not None and not trainer.interrupted and not getattr(trainer, "fast_dev_run", False):
            if self.update_bn_at_end:
                self._update_bn(trainer, pl_module, ema)
            if self.copy_at_end:
                ema.copy_to()
        if ema is not None and ema.ema_updates == 0 and not self._warned_no_update and not self._options.teachers:
            rank_zero_warn(
                f"{self.state_key}: the run ended after {ema.optimizer_steps} optimizer step(s) without one EMA update"
                f" (`update_every`={self._options.update_every}): validation and checkpoints hold the training"
                " weights"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_checkpoint_hook()
        self._evaluating = self._fit_starting = False
        ema = self._ema
        if ema is None:
            return
        ema.detach()
        if stage == "fit" and ema.swappable:
            ema.mark_seen()  # an evaluation later checks that the module was not changed since
            if spawned_workers(trainer):  # the workers exit now, with the EMA
                self._spawn_file.write(trainer, ema.state_dict(), ema.raw_state_dict())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out(trainer, pl_module)
        if self._frozen is not None:  # the fit failed before it started: the teachers as they were
            self._frozen.undo()
            self._frozen = None
        self._remove_checkpoint_hook()  # Lightning calls no `teardown` after an exception
        self._evaluating = self._fit_starting = False
        if self._ema is not None:
            self._ema.detach()

    def _remove_checkpoint_hook(self) -> None:
        if self._checkpoint_hook is not None:
            self._checkpoint_hook.remove()
            self._checkpoint_hook = None

    # ---------------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = optimizer_steps_taken(trainer)
        size = self.batch_size_of(batch)
        if not self._first_batch_checked:
            self._first_batch_checked = True
            if type(self).batch_size_of is EMAScalingCallback.batch_size_of and batch_idx == 0:
                check_first_batch(trainer.train_dataloader, size)
        self.scaled_ema.count_samples(size * self._replicas)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._ema is not None:
            self._ema.wait()  # after the closure's forward and backward, before the step writes the weights

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if optimizer_steps_taken(trainer) == self._step_at_batch_start:
            return  # a micro-batch accumulated into a later step
        ema = self.scaled_ema
        ema.end_step()
        if not (trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False)):
            return
        metrics = ema.metrics(prefix=self.name)
        shown = {key: metrics.pop(key) for key in (f"{self.name}/kappa", f"{self.name}/half_life")}
        pl_module.log_dict(shown, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # -------------------------------------------------------------------------------------- evaluation
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._ema
        if not (self.evaluate_with_ema and ema and ema.ema_updates > 0) or self._module_loaded_from_ema:
            return
        if ema.is_swapped:
            return
        if ema.module is not pl_module:
            return  # another module (e.g. `Model.load_from_checkpoint`, already the EMA): its own weights
        evaluating = trainer.state.fn != TrainerFn.FITTING
        if evaluating and trainer.ckpt_path:
            return  # `validate(ckpt_path=...)`: the checkpoint's weights are what is asked for
        if evaluating and not self._stale:
            ema.mark_seen()  # DDP's re-broadcast since setup is no change
        if evaluating and self._stale:
            rank_zero_warn(
                f"{self.state_key}: the module's weights were changed since the EMA last saw them (e.g."
                f" {self._stale[:3]}; loaded by hand?), so the EMA is stale: evaluating the module's own weights."
                " Call `callback.scaled_ema.reset()` to restart the EMA from them, or fit again."
            )
            return
        ema.swap_in()

    def _swap_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._ema
        if ema is not None and ema.is_swapped:
            ema.swap_out()

    on_validation_start = on_test_start = on_predict_start = override(_swap_in)
    on_validation_end = on_test_end = on_predict_end = override(_swap_out)

    # -------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._ema is None or self._fit_starting:
            # Before fit starts (a tuner's temporary checkpoint): this callback is there, with no state of this
            # run yet (an EMA left from an earlier run is not this run's).
            return dict(self._state_to_load) if self._state_to_load is not None else {"format": _BEFORE_FIT}
        return self._ema.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"The {self.state_key} state must be a dict, got {type(state_dict).__name__}")
        if not state_dict or state_dict.get("format") == _BEFORE_FIT:
            return
        if self._evaluating:
            return  # `validate(ckpt_path=...)` evaluates the checkpoint's weights; this run's EMA stays as it is
        ScaledEMA.check_state_dict(state_dict, f"The checkpoint's {self.state_key} state")
        self._resuming = True
        if self._ema is not None and not self._fit_starting:
            self._ema.load_state_dict(state_dict)
        else:  # applied at fit start, to the EMA of the module this fit trains
            self._state_to_load = state_dict

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        ema, state = self._ema, checkpoint.get("callbacks", {}).get(self.state_key)
        if uses_deepspeed(trainer):
            pass  # DeepSpeed keeps no "state_dict": the EMA stays in this state (`consolidate_deepspeed_checkpoint`)
        elif ema is not None and ema.is_sharded and not self._fit_starting:
            self._put(ema, checkpoint, state)
        elif self.evaluate_with_ema and ema is not None and ema.ema_updates > 0 and ema.swappable:
            put_ema(ema, checkpoint, state)  # `Model.load_from_checkpoint` reads the EMA from "state_dict"
        if state is not None and ema is not None and not self._fit_starting:
            state[MODEL_ENTRIES] = "ema" if ema_put_into_model(state) else "training"  # read when a fit resumes

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        state = states.get(self.state_key)
        where = f"The checkpoint's {self.state_key} state"
        fitting = trainer.state.fn == TrainerFn.FITTING
        if state is None and self.state_key in states:
            check_callback_state(state, where)  # None under this callback's key: edited, not missing
        if state is None:
            present = {callback.state_key for callback in trainer.callbacks}  # type: ignore[attr-defined]
            others = ema_states_of_others(checkpoint, present) if fitting else []
            if others and not self.resume_from_ema:
                refuse_resume_from_ema(self.state_key, others[0], own_state_lacks_weights=False)
            rank_zero_warn(
                f"The checkpoint has no {self.state_key} state (it was saved without this callback, or with"
                " another `name`): the EMA starts again from the loaded weights"
                + (f", which are the EMA of {others[0]!r} (`resume_from_ema=True`)." if others else ".")
            )
            return
        check_callback_state(state, where)
        if not fitting:
            # validate/test/predict(ckpt_path=...): the module holds the checkpoint's model entries, the EMA where
            # this callback put it there; this run's own EMA stays as it is
            if ema_put_into_model(state):
                self._module_loaded_from_ema = True
            return
        if not state or state.get("format") == _BEFORE_FIT:
            return
        if uses_deepspeed(trainer) and state.get("raw_state_dict") is not None:
            raise ValueError(
                f"{where} holds training weights beside an EMA put into the checkpoint's state_dict (a file"
                " written by `consolidate_deepspeed_checkpoint` with `ema_as_weights=True`, or by a fit without"
                " DeepSpeed): DeepSpeed would resume from the EMA. Consolidate with `ema_as_weights=False` (the"
                " training weights in state_dict, the whole EMA in this state) and resume from that file"
            )
        # Every check before the training weights are written into the module.
        ema = self._ema
        sharded = (ema.is_sharded if ema is not None else False) or is_sharded_module(trainer, pl_module)
        check_resumed_state(state, pl_module, self._options, sharded, where)
        lacks_weights = state.get("raw_state_dict") is None and not state.get("sharded_ema_in_state_dict")
        if (
            lacks_weights
            and not self.resume_from_ema
            and model_entries_hold_ema(state, checkpoint.get("state_dict", {}))
        ):
            refuse_resume_from_ema(self.state_key, self.state_key, own_state_lacks_weights=True)
        load_ema(ema, pl_module, state, trainer.ckpt_path)


def _inputs(batch: Any) -> tuple[Any, ...]:
    """What ``update_bn_at_end`` gives the module: the first element of a list or tuple batch, or the batch."""
    return (batch[0],) if isinstance(batch, (list, tuple)) else (batch,)
