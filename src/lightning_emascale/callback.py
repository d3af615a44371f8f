"""``EMAScalingCallback``: a batch-size-invariant model EMA for any Lightning training run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_emascale._ema import EMAPrecision, EMAState, TeacherState
from lightning_emascale.functional import _check_momentum, scale_ema_momentum, warmup_momentum
from lightning_emascale.lr_scheduler import SampleClockLR
from lightning_emascale.rules import NoScalingRule, OptimizerRule, resolve_rule
from lightning_emascale.schedules import cosine_schedule

_FORMAT = 1
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def _is_one_of(instance: Any, classes: tuple[type, ...]) -> bool:
    """``isinstance`` by class name too, so the twins from the standalone ``pytorch_lightning`` package count.

    Its Trainer runs these callbacks as they are (lightly's examples use it); only the class objects differ.
    """
    names = {cls.__name__ for cls in classes}
    return isinstance(instance, classes) or any(cls.__name__ in names for cls in type(instance).__mro__)


class EMAScalingCallback(Callback):
    r"""Keep a model EMA whose horizon, counted in samples, does not depend on the batch size.

    After every optimizer step the EMA moves towards the weights, :math:`\zeta \leftarrow \hat\rho\,\zeta +
    (1 - \hat\rho)\,\theta`, with :math:`\hat\rho = \rho^\kappa` (the EMA Scaling Rule of Busbridge et al.,
    NeurIPS 2023). :math:`\kappa` is measured for every step from the batches actually seen: the samples in
    the micro-batches accumulated into the step, times the data-parallel world size, divided by
    ``base_batch_size``. While each optimizer step runs, its hyperparameters follow ``optimizer_rule``
    (SGD: :math:`\eta \to \kappa\eta`; Adam: :math:`\eta \to \sqrt\kappa\eta`, :math:`1-\beta \to
    \kappa(1-\beta)`, :math:`\epsilon \to \epsilon/\sqrt\kappa`); schedulers and loggers keep seeing the
    unscaled values.

    Every schedule runs on the **sample clock** (Algorithm 1 of the paper): the momentum schedule is
    evaluated at :attr:`progress`, samples seen / total samples, *before* it is raised to :math:`\kappa`,
    and :class:`~lightning_emascale.SampleClockLR` schedulers in the Trainer read the same clock. So ρ̂ and the
    learning rate plotted against samples seen are the same at any batch size, up to the ^κ and the optimizer
    rule, also when :class:`~lightning_emascale.ProgressiveBatchCallback` changes the batch size mid-run.

    Args:
        momentum: :math:`\rho \in [0, 1)`, the EMA momentum tuned at ``base_batch_size`` (with a cosine
            ``momentum_schedule``, its value at the start of training).
        base_batch_size: the global batch size ``momentum`` (and the optimizer's hyperparameters) were tuned
            at. ``None`` takes the first optimizer step's global batch.
        optimizer_rule: ``"sgd"``, ``"adam"``, ``"none"``/``None`` or an
            :class:`~lightning_emascale.OptimizerRule` instance.
        evaluate_with_ema: run validation, test and predict on the EMA weights (restoring the training weights
            exactly afterwards), and save the EMA as the checkpoint's ``state_dict`` so that
            ``Model.load_from_checkpoint`` returns it. ``trainer.fit(ckpt_path=...)`` still resumes from the
            training weights. ``None`` (default) means True, or False in teacher mode (``teachers``).
        update_every: update the EMA every this many optimizer steps, with the momentum accumulated over the
            window (the product of the steps' :math:`\hat\rho`).
        warmup: use :math:`\rho_t = \min(\rho, (1 + t)/(10 + t))` with :math:`t` = samples seen / base batch
            size (Morales-Brotons et al., 2024), so the warm-up spans the same samples at any batch size.
        ema_precision: ``"fp32"`` keeps the EMA of float16/bfloat16 tensors in float32; ``"model"`` keeps
            the model's dtype (half the memory, but updates smaller than the format's resolution are lost).
        name: the log prefix (``"<name>/kappa"``, ...) and the checkpoint key. Give several instances
            different names.
        momentum_schedule: ``"constant"``, or ``"cosine"`` from ``momentum`` to ``final_momentum`` over the
            training samples (BYOL's teacher schedule, there counted in steps). For another shape, override
            :meth:`momentum_at`.
        final_momentum: the momentum in :math:`[0, 1]` that the cosine schedule ends at (BYOL: 1.0). Only
            with ``momentum_schedule="cosine"``.
        total_samples: the training samples (global, all devices) the run will see, the denominator of
            :attr:`progress`. ``None`` derives it as ``max_epochs`` × samples per epoch when progress is
            needed; pass it when that cannot be derived (an ``IterableDataset``, a run bounded by
            ``max_steps``, ``limit_train_batches``).
        teachers: **teacher mode**: online → teacher submodule paths of the LightningModule, e.g.
            ``{"backbone": "backbone_momentum", "projection_head": "projection_head_momentum"}`` (lightly's
            BYOL). After each optimizer step every teacher parameter moves toward its online twin with
            :math:`\hat\rho`; there is no separate EMA copy and nothing is swapped for evaluation (the default
            ``evaluate_with_ema=None`` means False here, True otherwise). Teachers must not require grad. Like
            lightly's ``update_momentum``, only parameters are averaged: a teacher's buffers (BatchNorm
            statistics) come from its own forward passes. The teacher keeps its own dtype (``ema_precision``
            applies to the Polyak copy only).
        momentum_attributes: other momenta to keep batch-size invariant: attribute path → its value at
            ``base_batch_size``, e.g. ``{"criterion.center_momentum": 0.9}`` for DINO's loss center. The
            attribute is updated on every forward, so before every micro-batch it is set to
            :math:`\rho^{b/B}` for that micro-batch's global size :math:`b`, and restored when fit ends.
            Needs ``base_batch_size``.

    Example:
        >>> from lightning_emascale import EMAScalingCallback
        >>> ema = EMAScalingCallback(momentum=0.999, base_batch_size=256, optimizer_rule="sgd")
        >>> ema.state_key
        "EMAScalingCallback{'name': 'ema'}"
    """

    def __init__(
        self,
        momentum: float = 0.999,
        base_batch_size: Optional[int] = None,
        optimizer_rule: Union[Literal["sgd", "adam", "none"], OptimizerRule, None] = None,
        evaluate_with_ema: Optional[bool] = None,
        update_every: int = 1,
        warmup: bool = False,
        ema_precision: Literal["fp32", "model"] = "fp32",
        name: str = "ema",
        momentum_schedule: Literal["constant", "cosine"] = "constant",
        final_momentum: Optional[float] = None,
        total_samples: Optional[int] = None,
        teachers: Optional[dict[str, str]] = None,
        momentum_attributes: Optional[dict[str, float]] = None,
    ) -> None:
        self.momentum = _check_momentum(momentum)
        self.base_batch_size = _check_positive_int(base_batch_size, "base_batch_size", allow_none=True)
        self.optimizer_rule = resolve_rule(optimizer_rule)
        self.teachers = _check_paths(teachers, "teachers", str)
        if self.teachers and evaluate_with_ema:
            raise ValueError(
                "`evaluate_with_ema=True` needs a separate EMA copy to swap in, and teacher mode (`teachers`) keeps"
                " none: evaluate the teacher submodules directly, or add a second EMAScalingCallback without"
                " `teachers` for a Polyak EMA of the student"
            )
        if evaluate_with_ema is None:
            evaluate_with_ema = not self.teachers
        self.evaluate_with_ema = _check_bool(evaluate_with_ema, "evaluate_with_ema")
        self.momentum_attributes = {
            path: _check_momentum(value, f"momentum_attributes[{path!r}]")
            for path, value in (_check_paths(momentum_attributes, "momentum_attributes", (int, float)) or {}).items()
        }
        self.update_every = _check_positive_int(update_every, "update_every")
        self.warmup = _check_bool(warmup, "warmup")
        if ema_precision not in ("fp32", "model"):
            raise ValueError(f"`ema_precision` must be one of ['fp32', 'model'], got {ema_precision!r}")
        self.ema_precision: EMAPrecision = ema_precision
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        self.name = name
        if momentum_schedule not in ("constant", "cosine"):
            raise ValueError(f"`momentum_schedule` must be one of ['constant', 'cosine'], got {momentum_schedule!r}")
        if momentum_schedule == "cosine" and final_momentum is None:
            raise ValueError("`momentum_schedule='cosine'` needs `final_momentum` (the value it ends at, BYOL: 1.0)")
        if momentum_schedule == "constant" and final_momentum is not None:
            raise ValueError(
                f"`final_momentum`={final_momentum!r} has no effect with `momentum_schedule='constant'`:"
                " set `momentum_schedule='cosine'` or drop `final_momentum`"
            )
        self.momentum_schedule = momentum_schedule
        self.final_momentum = (
            None if final_momentum is None else _check_momentum(final_momentum, "final_momentum", allow_one=True)
        )
        self.total_samples = _check_positive_int(total_samples, "total_samples", allow_none=True)
        if self.momentum_attributes and self.base_batch_size is None:
            raise ValueError(
                "`momentum_attributes` are scaled per micro-batch from its first forward on, so they need"
                " `base_batch_size` (the global batch size their momenta were tuned at)"
            )

        self._ema: Optional[EMAState] = None
        self._teacher_state: Optional[TeacherState] = None
        # momentum_attributes resolved: (path, owner, attribute name, original value, base momentum)
        self._attributes: list[tuple[str, Any, str, float, float]] = []
        self._module: Optional[pl.LightningModule] = None
        self._aliases: dict[str, int] = {}
        self._loaded: Optional[dict[str, Any]] = None
        self._hooks: list[RemovableHandle] = []
        self._scaled_groups: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._swap: Optional[AbstractContextManager[None]] = None
        self._module_holds_eval_weights = False
        self._derived_total: Optional[int] = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._base: Optional[int] = self.base_batch_size
        self._samples_seen = 0
        self._optimizer_steps = 0
        self._ema_updates = 0
        self._pending_decay = 1.0
        self._window_samples = 0
        self._window_closed = False
        self._step_at_batch_start = 0
        self._kappa = float("nan")
        self._step_momentum = float("nan")
        self._global_batch = 0
        self._effective_lrs: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ----------------------------------------------------------------------------------------------- public
    @property
    def samples_seen(self) -> int:
        """Training samples (global, all devices) consumed by the optimizer steps so far."""
        return self._samples_seen

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (one per batch, also with several optimizers)."""
        return self._optimizer_steps

    @property
    def kappa(self) -> float:
        """:math:`\\kappa` of the latest optimizer step (``nan`` before the first)."""
        return self._kappa

    @property
    def ema_momentum(self) -> float:
        """:math:`\\hat\\rho` of the latest optimizer step (``nan`` before the first)."""
        return self._step_momentum

    @property
    def progress(self) -> float:
        """Training progress on the sample clock: :attr:`samples_seen` / :attr:`resolved_total_samples`."""
        total = self.resolved_total_samples
        if self._samples_seen > total:
            raise ValueError(
                f"The run has trained on {self._samples_seen} samples, past `total_samples`={total}: set"
                " `total_samples` to at least the samples (global, all devices) this run trains on"
            )
        return self._samples_seen / total

    @property
    def resolved_total_samples(self) -> int:
        """``total_samples``, or ``max_epochs`` × samples per epoch (global) derived from the Trainer."""
        if self.total_samples is not None:
            return self.total_samples
        derived, reason = self._derive_total_samples()
        if derived is None:
            raise ValueError(
                f"Cannot derive `total_samples` from the Trainer ({reason}): pass `total_samples=` to"
                f" {type(self).__name__}, the number of training samples (global, all devices) the run will see"
            )
        return derived

    def _derive_total_samples(self) -> tuple[Optional[int], str]:
        # Derived once per epoch (reset at epoch start), not on every step. It does not depend on the batch
        # size, so it also holds between a ProgressiveBatchCallback's loader reset and the next epoch's rebuild.
        if self._derived_total is not None:
            return self._derived_total, ""
        trainer = self._module.trainer if self._module is not None else None
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
        self._derived_total = trainer.max_epochs * len(sampler) * trainer.world_size  # type: ignore[arg-type]
        return self._derived_total, ""

    def momentum_at(self, progress: float) -> float:
        r"""The momentum at the base batch size at ``progress`` (before :math:`\kappa`). Override to reshape it.

        The default is ``momentum`` for ``momentum_schedule="constant"``, else the cosine from ``momentum`` to
        ``final_momentum``. Warm-up and :math:`\kappa` are applied to the returned value.
        """
        if self.momentum_schedule == "constant":
            return self.momentum
        assert self.final_momentum is not None
        return cosine_schedule(progress, start=self.momentum, end=self.final_momentum)

    def _uses_progress(self) -> bool:
        return self.momentum_schedule != "constant" or type(self).momentum_at is not EMAScalingCallback.momentum_at

    @property
    def resolved_base_batch_size(self) -> Optional[int]:
        """``base_batch_size``, or the first step's global batch once it is known."""
        return self._base

    def batch_size_of(self, batch: Any) -> int:
        """Samples in one micro-batch on this device. Override for batches Lightning cannot measure."""
        return extract_batch_size(batch)

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA of every tracked parameter and buffer, by the module's names (EMA dtype, live tensors)."""
        ema = self._require_ema()
        return {name: ema.ema[index] for name, index in self._aliases.items()}

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Hold the EMA weights in the module inside the block, e.g. to export them; restore exactly after.

        Example::

            with ema_callback.ema_weights():
                torch.save(model.state_dict(), "ema.pt")
        """
        with self._require_ema().swapped():
            yield

    def functional_call(self, module: torch.nn.Module, args: Any, kwargs: Optional[dict[str, Any]] = None) -> Any:
        """Run ``module`` on the EMA weights without touching its own (:func:`torch.func.functional_call`).

        Lets one ``validation_step`` log both the raw and the EMA model's metrics::

            ema = next(c for c in self.trainer.callbacks if isinstance(c, EMAScalingCallback))
            logits_ema = ema.functional_call(self, (x,))
        """
        ema = self._require_ema()
        if module is not self._module:
            raise ValueError(
                f"`module` must be the LightningModule this callback averages ({type(self._module).__name__}),"
                f" got {type(module).__name__}"
            )
        weights = {name: ema.ema[index].to(ema.model[index].dtype) for name, index in self._aliases.items()}
        return torch.func.functional_call(module, weights, args, kwargs)

    # ------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _is_one_of(trainer.strategy, _SHARDED):
            raise RuntimeError(
                f"EMAScalingCallback keeps a full copy of the parameters and supports single-device and DDP"
                f" strategies, got {type(trainer.strategy).__name__}. Use `strategy='ddp'` (or 'ddp_spawn')."
            )
        # Lightning itself rejects two instances with the same `name` (their state keys collide).
        instances = [c for c in trainer.callbacks if isinstance(c, EMAScalingCallback)]  # type: ignore[attr-defined]
        swapping = [c.name for c in instances if c.evaluate_with_ema]
        if len(swapping) > 1:
            raise ValueError(
                f"Only one EMAScalingCallback may set `evaluate_with_ema=True`, got {swapping}: set it to False"
                " on the others and evaluate them with `functional_call` or `ema_weights()`"
            )
        self._module_holds_eval_weights = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            if not self.optimizer_rule.supports(optimizer):
                raise ValueError(
                    f"`optimizer_rule`={self.optimizer_rule!r} does not fit optimizer {index}"
                    f" ({type(optimizer).__name__}). Use 'sgd' for SGD, 'adam' for Adam/AdamW/RMSprop/NAdam/RAdam/"
                    "Adamax, a custom OptimizerRule, or None to scale the EMA only."
                )
        if self._module is not pl_module or (self._ema is None and self._teacher_state is None):
            if self.teachers:
                self._track_teachers(pl_module)
            else:
                self._track(pl_module)
        if self._loaded is not None:
            if self._ema is not None and "ema" in self._loaded:
                self._ema.load_state_dict(self._loaded["ema"])
            self._loaded = None
        self._attributes = [
            (path, *_resolve_attribute(pl_module, path), base) for path, base in self.momentum_attributes.items()
        ]
        for optimizer in trainer.optimizers:
            if not isinstance(self.optimizer_rule, NoScalingRule):
                self._hooks.append(optimizer.register_step_pre_hook(self._scale_hyperparameters))
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, SampleClockLR) and config.scheduler.clock is None:
                config.scheduler.attach(self)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train dataloader of the epoch exists now (a ProgressiveBatchCallback may have rebuilt it).
        self._derived_total = None
        clocked = any(
            isinstance(config.scheduler, SampleClockLR) and config.scheduler.clock is self
            for config in trainer.lr_scheduler_configs
        )
        if not (self._uses_progress() or clocked):
            return
        total = self.resolved_total_samples  # raises now, not at the first step, when it cannot be derived
        derived, _ = self._derive_total_samples()
        if self.total_samples is not None and derived is not None and trainer.max_steps == -1 and derived > total:
            assert trainer.max_epochs is not None
            raise ValueError(
                f"`total_samples`={total} is less than the {derived} samples this run trains on (max_epochs"
                f" {trainer.max_epochs} x {derived // trainer.max_epochs} per epoch): raise it, or drop it to derive it"
            )

    def _track(self, pl_module: pl.LightningModule) -> None:
        tracked: dict[int, int] = {}
        named: list[tuple[str, Tensor]] = []
        self._aliases = {}
        for name, tensor in [*pl_module.named_parameters(remove_duplicate=False), *pl_module.named_buffers()]:
            if id(tensor) not in tracked:
                tracked[id(tensor)] = len(named)
                named.append((name, tensor))
            self._aliases[name] = tracked[id(tensor)]
        self._ema = EMAState(named, precision=self.ema_precision)
        self._module = pl_module

    def _track_teachers(self, pl_module: pl.LightningModule) -> None:
        assert self.teachers is not None
        pairs: list[tuple[Tensor, Tensor]] = []
        for online_path, teacher_path in self.teachers.items():
            online = dict(_submodule(pl_module, online_path).named_parameters())
            teacher = dict(_submodule(pl_module, teacher_path).named_parameters())
            mirror = f"Teacher {teacher_path!r} does not mirror {online_path!r}"
            if online.keys() != teacher.keys():
                only = sorted(online.keys() ^ teacher.keys())
                raise ValueError(f"{mirror}: parameters {only[:5]} are in only one of them")
            trainable = [f"{teacher_path}.{name}" for name, tensor in teacher.items() if tensor.requires_grad]
            if trainable:
                raise ValueError(
                    f"Teacher {teacher_path!r} still requires grad ({', '.join(trainable[:3])}, ...): freeze it with"
                    f" `self.{teacher_path}.requires_grad_(False)` (lightly: `deactivate_requires_grad`), so that"
                    " only the EMA moves it"
                )
            for name, tensor in online.items():
                if teacher[name].shape != tensor.shape:
                    raise ValueError(
                        f"{mirror}: `{name}` has shape {tuple(teacher[name].shape)} in the teacher and"
                        f" {tuple(tensor.shape)} in the online module"
                    )
                pairs.append((teacher[name], tensor))
        self._teacher_state = TeacherState(pairs)
        self._module = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for _, owner, name, original, _ in self._attributes:
            setattr(owner, name, original)
        self._attributes = []
        self._restore_hyperparameters()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()
        self._restore_hyperparameters()

    # ---------------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        samples = self.batch_size_of(batch)
        self._window_samples += samples
        self._step_at_batch_start = trainer.global_step
        if self._attributes:
            # updated on every forward (DINO's center): scale by this micro-batch's global size
            assert self._base is not None
            kappa = samples * trainer.world_size / self._base
            for _, owner, name, _, base in self._attributes:
                setattr(owner, name, scale_ema_momentum(base, kappa))

    def _window_kappa(self, world_size: int) -> tuple[int, float]:
        global_batch = self._window_samples * world_size
        if self._base is None:
            self._base = global_batch
        return global_batch, global_batch / self._base

    def _close_window(self, world_size: int) -> None:
        """Count the step's samples on the clock, once per optimizer step, with rho-hat from the clock before it.

        Runs right after the optimizer step (its post-hook), so that a ``SampleClockLR`` stepped next by
        Lightning already sees the samples; ``on_train_batch_end`` catches a step whose hook did not run.
        """
        if self._window_closed:
            return
        global_batch, kappa = self._window_kappa(world_size)
        assert self._base is not None
        momentum = self.momentum_at(self.progress) if self._uses_progress() else self.momentum
        if self.warmup:
            momentum = warmup_momentum(momentum, base_steps=self._samples_seen / self._base)
        self._step_momentum = scale_ema_momentum(momentum, kappa)
        self._kappa, self._global_batch = kappa, global_batch
        self._samples_seen += global_batch
        self._optimizer_steps += 1
        self._window_closed = True

    def _after_optimizer_step(self, *_: Any) -> None:
        self._restore_hyperparameters()
        assert self._module is not None
        self._close_window(self._module.trainer.world_size)

    def _scale_hyperparameters(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._restore_hyperparameters()  # a step that raised last time never reached its post-hook
        assert self._module is not None
        kappa = self._window_kappa(self._module.trainer.world_size)[1]
        scaled = [self.optimizer_rule.scale(group, kappa) for group in optimizer.param_groups]
        for index, (group, values) in enumerate(zip(optimizer.param_groups, scaled)):
            self._scaled_groups.append((group, {key: group[key] for key in values}))
            group.update(values)
            self._effective_lrs[self._lr_key(optimizer, index)] = group["lr"]

    def _restore_hyperparameters(self, *_: Any) -> None:
        for group, original in self._scaled_groups:
            group.update(original)
        self._scaled_groups = []

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # a micro-batch accumulated into a later step
        self._close_window(trainer.world_size)
        self._window_samples = 0
        self._window_closed = False
        self._pending_decay *= self._step_momentum
        if self._optimizer_steps % self.update_every == 0:
            averager = self._teacher_state if self._teacher_state is not None else self._require_ema()
            averager.update(self._pending_decay)
            self._ema_updates += 1
            self._pending_decay = 1.0
        if trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False):
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        prefix = self.name
        shown = {f"{prefix}/kappa": self._kappa, f"{prefix}/momentum": self._step_momentum}
        pl_module.log_dict(shown, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        metrics = {
            f"{prefix}/batch_size": float(self._global_batch),
            f"{prefix}/samples_seen": float(self._samples_seen),
        }
        if isinstance(self.optimizer_rule, NoScalingRule):
            for optimizer in trainer.optimizers:
                for index, group in enumerate(optimizer.param_groups):
                    self._effective_lrs[self._lr_key(optimizer, index)] = group["lr"]
        metrics.update(self._effective_lrs)
        metrics.update(
            {f"{prefix}/{path}": float(getattr(owner, name)) for path, owner, name, _, _ in self._attributes}
        )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _lr_key(self, optimizer: torch.optim.Optimizer, group_index: int) -> str:
        assert self._module is not None
        optimizers = self._module.trainer.optimizers
        position = next(i for i, opt in enumerate(optimizers) if opt is optimizer)
        key = f"{self.name}/lr-{type(optimizer).__name__}"
        if sum(type(opt) is type(optimizer) for opt in optimizers) > 1:
            key += f"-{position}"
        return key + (f"/pg{group_index + 1}" if group_index else "")

    # -------------------------------------------------------------------------------------- evaluation
    def _swap_in(self) -> None:
        if (
            self.evaluate_with_ema
            and self._ema is not None
            and self._ema_updates > 0
            and self._swap is None
            and not self._module_holds_eval_weights
        ):
            self._swap = self._ema.swapped()
            self._swap.__enter__()

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    # -------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._ema is None and self._teacher_state is None:
            return dict(self._loaded) if self._loaded is not None else {}
        state: dict[str, Any] = {
            "format": _FORMAT,
            "base_batch_size": self._base,
            "samples_seen": self._samples_seen,
            "optimizer_steps": self._optimizer_steps,
            "ema_updates": self._ema_updates,
            "pending_decay": self._pending_decay,
        }
        if self._ema is not None:  # teacher mode: the teachers are in the module's own state_dict
            state["ema"] = self._ema.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != _FORMAT:
            raise ValueError(
                f"The checkpoint's {self.state_key} state has format {state_dict.get('format')!r};"
                f" this version of lightning-emascale reads format {_FORMAT}"
            )
        # The base saved by the first run keeps the EMA horizon in samples, unless the user set one now.
        self._base = self.base_batch_size if self.base_batch_size is not None else state_dict["base_batch_size"]
        self._samples_seen = state_dict["samples_seen"]
        self._optimizer_steps = state_dict["optimizer_steps"]
        self._ema_updates = state_dict["ema_updates"]
        self._pending_decay = state_dict["pending_decay"]
        self._window_samples = 0
        self._window_closed = False
        self._loaded = state_dict
        if self._ema is not None and self._module is not None and "ema" in state_dict:
            self._ema.load_state_dict(state_dict["ema"])
            self._loaded = None

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not (self.evaluate_with_ema and self._ema is not None and self._ema_updates > 0):
            return
        # `Model.load_from_checkpoint` reads "state_dict": put the EMA there and keep the training weights
        # in this callback's state for `trainer.fit(ckpt_path=...)`. Shared tensors are stored once.
        model_state = checkpoint["state_dict"]
        raw = self._ema.raw_tensors()
        raw_state = {}
        for key, index in self._aliases.items():
            if key in model_state:
                raw_state[key] = raw[index]
                model_state[key] = self._ema.ema[index].to(model_state[key].dtype)
        if self.state_key in checkpoint.get("callbacks", {}):
            checkpoint["callbacks"][self.state_key]["raw_state_dict"] = raw_state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            rank_zero_warn(
                f"The checkpoint has no {self.state_key} state (it was saved without this callback, or with"
                " another `name`): the EMA starts again from the loaded weights."
            )
            return
        raw = state.get("raw_state_dict")
        if raw is None:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            # Resume from the training weights, not from the EMA that "state_dict" holds.
            result = pl_module.load_state_dict(raw, strict=False)
            if result.unexpected_keys:
                raise KeyError(f"The checkpoint's training weights do not fit the model: {result.unexpected_keys}")
        else:
            self._module_holds_eval_weights = True  # the module already holds the EMA from "state_dict"

    def _require_ema(self) -> EMAState:
        if self.teachers:
            raise RuntimeError(
                f"Teacher mode keeps no separate EMA: the EMA weights are the module's teacher submodules"
                f" {sorted(self.teachers.values())}. Use those directly."
            )
        if self._ema is None:
            raise RuntimeError(
                "The EMA does not exist yet: it is created when `trainer.fit` starts. Call this inside or after fit."
            )
        return self._ema


def _check_positive_int(value: Any, name: str, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return value


def _check_paths(value: Any, name: str, value_type: Any) -> Optional[dict[str, Any]]:
    """A non-empty dict of attribute path -> ``value_type``, copied; ``None`` stays ``None``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"`{name}` must be a non-empty dict of attribute paths, got {value!r}")
    for path, item in value.items():
        if not isinstance(path, str) or not path or isinstance(item, bool) or not isinstance(item, value_type):
            raise ValueError(
                f"`{name}` must map attribute paths (strings) to {'strings' if value_type is str else 'numbers'},"
                f" got {path!r}: {item!r}"
            )
    return dict(value)


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"`teachers` names {path!r}, which is not a submodule of {type(module).__name__}; its children are"
            f" {children}"
        ) from None


def _resolve_attribute(module: torch.nn.Module, path: str) -> tuple[Any, str, float]:
    """The object that holds the attribute at ``path``, the attribute's name and its current value."""
    *owners, name = path.split(".")
    owner: Any = module
    try:
        for part in owners:
            owner = getattr(owner, part)
        value = getattr(owner, name)
    except AttributeError:
        raise ValueError(f"`momentum_attributes` names {path!r}, which {type(module).__name__} does not have") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`momentum_attributes` names {path!r}, which holds {value!r}, not a number")
    return owner, name, value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value
