r"""``ScaledEMA``: the EMA Scaling Rule for any training loop (Lightning Trainer, Fabric, plain PyTorch).

No Lightning import: a plain loop pays only for torch. :class:`~lightning_emascale.EMAScalingCallback` is a
thin adapter that builds one of these when fit starts and forwards the Trainer's hooks to it.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_emascale._attributes import MomentumAttribute
from lightning_emascale._checks import as_int, as_real, check_name, check_saved_state
from lightning_emascale._ema import (
    EMAPrecision,
    EMAState,
    PowerEMAState,
    TeacherState,
    all_finite,
    freeze_teachers,
)
from lightning_emascale._options import EMAOptions, MomentumSchedule
from lightning_emascale._sharded import (
    fsdp1_modules,
    fsdp1_wraps_whole,
    fsdp_modules,
    is_fsdp1,
    is_sharded,
    local_piece,
    reshard,
    reshard_fsdp1,
)
from lightning_emascale.functional import half_life_from_momentum, scale_ema_momentum, warmup_momentum
from lightning_emascale.post_hoc import snapshot_path, write_snapshot
from lightning_emascale.post_hoc_math import power_beta
from lightning_emascale.rules import (
    NoScalingRule,
    RuleLike,
    SavedGroups,
    check_rule_fits,
    restore_param_groups,
    scale_param_groups,
)

# Which ScaledEMA applies its optimizer rule to an optimizer: a second rule on the same one would compound.
_SCALED_BY: weakref.WeakKeyDictionary[Optimizer, ScaledEMA] = weakref.WeakKeyDictionary()

#: The version of :meth:`ScaledEMA.state_dict`'s layout; a checkpoint of another version is refused.
_STATE_FORMAT = 1
_STATE_KEYS = ("format", "base_batch_size", "samples_seen", "optimizer_steps", "ema_updates", "pending_decay")


class ScaledEMA:
    r"""A model EMA whose horizon, counted in samples, does not depend on the batch size.

    After every optimizer step the EMA moves towards the weights, :math:`\zeta \leftarrow \hat\rho\,\zeta +
    (1 - \hat\rho)\,\theta`, with :math:`\hat\rho = \rho^\kappa` (the EMA Scaling Rule of Busbridge et al.,
    NeurIPS 2023) and :math:`\kappa` the step's global batch over ``base_batch_size``. While each optimizer
    step runs, its hyperparameters follow ``optimizer_rule`` (SGD: :math:`\eta \to \kappa\eta`; Adam:
    :math:`\eta \to \sqrt\kappa\eta`, :math:`1-\beta \to \kappa(1-\beta)`, :math:`\epsilon \to
    \epsilon/\sqrt\kappa`), and are restored right after, so schedulers never see the scaled values.

    Every schedule runs on the **sample clock** (Algorithm 1 of the paper): the momentum schedule is evaluated
    at :attr:`progress`, samples seen / total samples, before it is raised to :math:`\kappa`, and a
    :class:`~lightning_emascale.SampleClockLR` given ``clock=`` this object reads the same clock.

    In a plain loop, tell it the global size of every micro-batch; ``optimizer.step()`` does the rest (the
    hooks this object registers apply the rule for that step, advance the clock and move the EMA)::

        ema = ScaledEMA(model, optimizer, momentum=0.999, base_batch_size=256, optimizer_rule="sgd")
        for x, y in loader:
            loss_fn(model(x), y).backward()
            ema.count_samples(len(x) * world_size)  # every micro-batch: its global size
            optimizer.step()                         # rule applied for this step only; then the EMA moves
            optimizer.zero_grad()

    A **sharded module** (FSDP2 ``fully_shard`` or tensor parallelism: ``DTensor`` parameters; FSDP1 with
    ``use_orig_params=True``, wrapped at the root or inside) is averaged shard by shard: each rank keeps the EMA of
    its own shards, with no communication per step. Count ``len(x) * data_parallel_size`` (tensor-parallel ranks
    share their samples). Swaps copy into the local shards and reshard the FSDP modules; :meth:`state_dict` holds
    this rank's shards (``DTensor`` views under FSDP2).

    Args:
        module: the model whose parameters and buffers are averaged (Polyak mode), or which holds the teacher
            submodules (teacher mode, ``teachers``). Pass the module itself, or the DDP, FSDP1 or Fabric wrapper.
        optimizers: the optimizer, or several, whose steps drive the EMA; the optimizer rule scales them. A
            Fabric-wrapped optimizer is unwrapped. ``None``: no hooks; call :meth:`end_step` after every step.
        momentum: :math:`\rho \in [0, 1)`, the EMA momentum tuned at ``base_batch_size`` (with the cosine
            schedule, its value at the start of training). ``None`` means 0.999.
        base_batch_size: the global batch size ``momentum`` (and the optimizer's hyperparameters) were tuned
            at. ``None`` takes the first optimizer step's global batch.
        optimizer_rule: ``"sgd"``, ``"adam"``, ``"none"``/``None`` or an
            :class:`~lightning_emascale.OptimizerRule` instance.
        update_every: update the EMA every this many optimizer steps, with the momentum accumulated over
            those steps (the product of the steps' :math:`\hat\rho`).
        warmup: use :math:`\rho_t = \min(\rho, (1 + t)/(10 + t))` with :math:`t` = samples seen / base batch
            size (Morales-Brotons et al., 2024), so the warm-up spans the same samples at any batch size.
        ema_precision: ``"fp32"`` keeps the EMA of float16/bfloat16 tensors in float32; ``"model"`` keeps
            the model's dtype (half the memory, but updates smaller than the format's resolution are lost). It
            applies to the Polyak copy only: teachers keep their own dtype.
        momentum_schedule: ``"constant"``; ``"cosine"`` from ``momentum`` to ``final_momentum`` over the
            training samples (BYOL's teacher schedule); or any callable of progress in :math:`[0, 1]` that
            returns the momentum at the base batch size (then leave ``momentum`` unset). Warm-up and
            :math:`\kappa` are applied to its value.
        final_momentum: the momentum in :math:`[0, 1]` that the cosine schedule ends at (BYOL: 1.0).
        total_samples: the training samples (global, all ranks) the run will see, the denominator of
            :attr:`progress`; needed by a schedule of progress and by ``SampleClockLR``.
        teachers: **teacher mode**: online → teacher submodule paths of ``module``, e.g.
            ``{"backbone": "backbone_momentum"}`` (lightly's BYOL). Every teacher parameter moves toward its
            online twin with :math:`\hat\rho`; no separate copy is kept. Teachers must not require grad; their
            buffers (BatchNorm statistics) come from their own forward passes, as with lightly.
        momentum_attributes: other momenta to keep batch-size invariant: attribute path of ``module`` → its
            value at ``base_batch_size``, e.g. ``{"criterion.center_momentum": 0.9}`` for DINO's loss center.
            :meth:`count_samples` sets each to :math:`\rho^{b/B}` for the micro-batch's global size :math:`b`;
            :meth:`detach` restores them. Needs ``base_batch_size``.
        sigma_rels: **post-hoc mode** (Karras et al., EDM2): instead of one EMA, track a power-function EMA of
            each of these lengths (in :math:`(0, 1/\sqrt{12}]`, 0.288675; 0.05 and 0.10 are EDM2's), moved on the
            sample clock by :math:`\beta = (s / (s + b))^{\gamma + 1}`, so batch-size invariant by construction;
            after training, :func:`~lightning_emascale.reconstruct_post_hoc` gives the EMA of any length. Takes no
            momentum, schedule, warm-up or teachers; the power EMAs are fp32 (one copy each).
        snapshot_every_samples: post-hoc mode: write a snapshot of the power EMAs every this many samples seen
            (not steps, so progressive batch growth does not change where they fall). Call :meth:`save_snapshot`
            once more when training ends.
        snapshot_dir: post-hoc mode: the directory of the snapshots (written by rank 0 only).
        include: average only these parameters, buffers or submodules (names or submodule paths of ``module``,
            e.g. ``["generator"]`` in a GAN); the rest is neither averaged nor swapped. ``None``: everything but
            non-persistent buffers (which are not in the module's ``state_dict``, e.g. an annealed temperature);
            name one here to average it.
        exclude: leave these parameters, buffers or submodules out (e.g. ``["discriminator"]``, a frozen feature
            extractor). Every entry of ``include`` and ``exclude`` must match something.
        skip_non_finite: before every EMA update, check that the weights it reads are finite and skip the
            update if not (counted in :attr:`skipped_updates`), so one NaN step does not poison the EMA for the
            rest of the run. Decided on the device, without a host sync; costs one read of the weights and a
            slower per-tensor update.
        freeze_teachers: teacher mode: ``requires_grad_(False)`` on the teachers when built, instead of raising
            that they still require grad (lightly's I-JEPA leaves its target encoder trainable).
        flat_parameters: opt in to moving the module's parameters and buffers into one buffer laid out as the EMA
            (same values and strides; ``.data`` re-pointed; optimizer state and DDP keep working), so that one
            update is a single ``lerp_`` at the memory-bandwidth floor. Before each update it checks that they
            still live there and otherwise warns and falls back to the per-tensor update (after ``.to(dtype)``,
            ``load_state_dict(assign=True)`` or a device move). Build the EMA after converting the module.
        offload: keep the EMA in CPU memory while the module trains on a GPU, for models whose EMA does not fit
            beside them: each update copies the weights into pinned host memory without blocking and averages
            them on the CPU in a background thread, so training goes on meanwhile; readers of the EMA (swaps,
            checkpoints, :meth:`ema_state_dict`) wait for it. Host memory: the EMA plus one copy of the model.
        side_stream: on a GPU, run each Polyak or post-hoc update on a CUDA side stream, beside the next forward
            and backward: it waits for the optimizer step that wrote the weights, and the next optimizer step,
            swaps, checkpoints and :meth:`wait` wait for it, on the device (no host sync). Needs the optimizers
            attached (otherwise, and on a CPU, the update runs in line). Teachers are always updated in line (the
            next forward reads them). Write the weights outside the optimizer step only after :meth:`wait`.
        copy_on_swap: evaluation with the EMA (:meth:`swap_in`, :meth:`swapped`) copies the averages into the
            module and keeps a copy of the training weights, instead of pointing each parameter at its average
            (no copy where the dtypes match; a bf16 model gets only the cast). Choose it when evaluation writes
            the weights in place (test-time adaptation), which would otherwise change the EMA (with a warning).
        auto_end_step: end each step in the optimizer's post-hook (advance the clock, move the EMA). With
            ``False``, or with several optimizers, call :meth:`end_step` once after all of a step's optimizers
            have stepped (the Lightning callback does, at the end of each batch).
        total_samples_from: where to get the total when ``total_samples`` is ``None``, called whenever
            progress is needed: an adapter that knows the run's length supplies it (the Lightning callback
            derives it from the Trainer). It returns the total or raises ``ValueError`` saying why it cannot.

    Example:
        >>> import torch
        >>> from lightning_emascale import ScaledEMA
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = ScaledEMA(model, optimizer, momentum=0.996, base_batch_size=32, optimizer_rule="sgd")
        >>> for _ in range(4):  # two micro-batches of 64 per step: global batch 128
        ...     model(torch.randn(64, 4)).pow(2).mean().backward()
        ...     ema.count_samples(64)
        ...     if ema.samples_pending == 128:
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        >>> ema.kappa, round(ema.ema_momentum, 9), ema.samples_seen, ema.optimizer_steps
        (4.0, 0.984095744, 256, 2)
        >>> ema.step_lrs  # the learning rate each optimizer's step used: 0.1 x kappa
        [[0.4]]
        >>> optimizer.param_groups[0]["lr"]  # restored right after the step
        0.1
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer], None] = None,
        *,
        momentum: Optional[float] = None,
        base_batch_size: Optional[int] = None,
        optimizer_rule: RuleLike = None,
        update_every: int = 1,
        warmup: bool = False,
        ema_precision: EMAPrecision = "fp32",
        momentum_schedule: MomentumSchedule = "constant",
        final_momentum: Optional[float] = None,
        total_samples: Optional[int] = None,
        teachers: Optional[Mapping[str, str]] = None,
        momentum_attributes: Optional[Mapping[str, float]] = None,
        sigma_rels: Optional[Sequence[float]] = None,
        snapshot_every_samples: Optional[int] = None,
        snapshot_dir: Optional[Union[str, os.PathLike]] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        skip_non_finite: bool = False,
        freeze_teachers: bool = False,
        flat_parameters: bool = False,
        offload: bool = False,
        side_stream: bool = True,
        copy_on_swap: bool = False,
        auto_end_step: bool = True,
        total_samples_from: Optional[Callable[[], int]] = None,
    ) -> None:
        options = EMAOptions(
            momentum=momentum,
            base_batch_size=base_batch_size,
            optimizer_rule=optimizer_rule,
            update_every=update_every,
            warmup=warmup,
            ema_precision=ema_precision,
            momentum_schedule=momentum_schedule,
            final_momentum=final_momentum,
            total_samples=total_samples,
            teachers=teachers,
            momentum_attributes=momentum_attributes,
            sigma_rels=sigma_rels,
            snapshot_every_samples=snapshot_every_samples,
            snapshot_dir=snapshot_dir,
            include=include,
            exclude=exclude,
            skip_non_finite=skip_non_finite,
            freeze_teachers=freeze_teachers,
            flat_parameters=flat_parameters,
            offload=offload,
            side_stream=side_stream,
            copy_on_swap=copy_on_swap,
        )
        self._setup(module, optimizers, options, auto_end_step, total_samples_from)

    @classmethod
    def _from_options(
        cls,
        module: torch.nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer], None],
        options: EMAOptions,
        auto_end_step: bool = True,
        total_samples_from: Optional[Callable[[], int]] = None,
    ) -> ScaledEMA:
        """Build from options an adapter already checked when it was built (they are not checked again)."""
        self = cls.__new__(cls)
        self._setup(module, optimizers, options, auto_end_step, total_samples_from)
        return self

    def _setup(
        self,
        module: torch.nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer], None],
        options: EMAOptions,
        auto_end_step: bool,
        total_samples_from: Optional[Callable[[], int]],
    ) -> None:
        if type(self).momentum_at is not ScaledEMA.momentum_at:
            raise TypeError(
                f"{type(self).__name__} overrides `momentum_at`, which does not shape the schedule: pass the shape"
                " as `momentum_schedule=`, a callable of progress in [0, 1] that returns the momentum"
            )
        module = _unwrap_module(module)
        if not isinstance(auto_end_step, bool):
            raise ValueError(f"`auto_end_step` must be True or False, got {auto_end_step!r}")
        if total_samples_from is not None and not callable(total_samples_from):
            raise TypeError(
                f"`total_samples_from` must be a callable that returns the total, got {total_samples_from!r}"
            )
        # FSDP1: the root wrapper, or a module whose submodules were wrapped by hand (configure_model)
        fsdp1_root = module if fsdp1_modules(module) else None
        if fsdp1_root is not None:
            module = _check_fsdp1(fsdp1_root, options)
        sharded = fsdp1_root is not None or any(is_sharded(t) for t in [*module.parameters(), *module.buffers()])
        if sharded and (options.flat_parameters or options.sigma_rels):
            option = "flat_parameters=True" if options.flat_parameters else "a post-hoc EMA (`sigma_rels`)"
            raise ValueError(
                f"{option} is not supported for a sharded module (DTensor parameters of FSDP2 or tensor"
                " parallelism, FSDP1): "
                + (
                    "the strategy gathers each parameter from its own storage, so the parameters cannot be moved"
                    " into one buffer. Leave it False: the per-shard update needs no gather."
                    if options.flat_parameters
                    else "its snapshots are written by rank 0 alone. Keep a Polyak EMA (no `sigma_rels`)."
                )
            )
        #: Whether the module is sharded (``DTensor`` parameters, or FSDP1): each rank averages its own shards.
        self.is_sharded = sharded
        self._fsdp_modules = fsdp_modules(module) if sharded else []
        #: FSDP1: the root wrapper (its checkpoints go through FSDP1's state dicts) and every wrapper in it.
        self.fsdp1_root = fsdp1_root
        self._fsdp1_modules = fsdp1_modules(fsdp1_root) if fsdp1_root is not None else []
        self.options = options
        self._auto_end_step = auto_end_step
        self.total_samples_from = total_samples_from
        self.module = module
        #: The averager: an EMAState (Polyak copy) or a TeacherState (teacher mode).
        self.averager: Union[EMAState, TeacherState, PowerEMAState]
        if options.teachers:
            if options.freeze_teachers:
                freeze_teachers(module, options.teachers)
            self.averager = TeacherState.from_module(module, options.teachers)
        elif options.sigma_rels:
            self.averager = PowerEMAState(module, options.sigma_rels, options.include, options.exclude)
        else:
            self.averager = EMAState.from_module(  # FSDP1 gathers from the flat parameter: a swap copies
                module, options.ema_precision, options.include, options.exclude, options.flat_parameters,
                options.offload, options.copy_on_swap or fsdp1_root is not None,
            )  # fmt: skip
        self._optimizers: list[Optimizer] = []
        self._hooks: list[RemovableHandle] = []
        self._write_snapshots = True  # an adapter turns it off for a smoke test (Lightning's fast_dev_run)
        # The optimizer's pre-step hook waits for the side stream. An adapter whose loop runs the closure (forward
        # and backward) inside `optimizer.step()` turns it off and calls `wait()` after the closure instead, so
        # that the update overlaps the forward and backward there too (Lightning's `on_before_optimizer_step`).
        self._wait_before_step = True
        self._state_init_step: Optional[Optimizer] = None  # the optimizer whose state-initializing step runs now
        self._saved_groups: SavedGroups = []
        self._attributes: list[MomentumAttribute] = []
        self._reset_clock()
        self.attach([] if optimizers is None else optimizers)

    @property
    def auto_end_step(self) -> bool:
        """Whether the optimizer's post-step hook ends each step (set when built)."""
        return self._auto_end_step

    def _reset_clock(self) -> None:
        self._base: Optional[int] = self.options.base_batch_size
        self._samples_seen = 0
        self._optimizer_steps = 0
        self._ema_updates = 0
        self._decay_since_update = 1.0  # the product of the rho-hats of the steps since the last EMA update
        self._step_samples = 0  # global samples counted into the optimizer step under way
        self._step_on_clock = False  # the step under way has been counted on the clock
        self._ended_by_hook = False  # the optimizer's post-hook ended the last step (auto_end_step)
        self._kappa = math.nan
        self._step_momentum = math.nan
        self._step_batch = 0
        self._step_lrs: list[list[float]] = [[] for _ in self._optimizers]
        self._group_names: list[list[Optional[str]]] = [[] for _ in self._optimizers]  # param groups' "name"
        self._samples_at_update = 0  # samples seen at the last EMA update (the power EMAs' clock)
        self._skipped = torch.zeros((), dtype=torch.int64)  # updates skipped for non-finite weights (on device)

    # ------------------------------------------------------------------------------------------ wiring
    def attach(self, optimizers: Union[Optimizer, Sequence[Optimizer]]) -> None:
        """Hook ``optimizers`` (replacing any hooked before) and resolve the momentum attributes.

        The Lightning callback calls this at every fit start, with that fit's optimizers.
        """
        listed = [optimizers] if not isinstance(optimizers, Sequence) else list(optimizers)
        unwrapped = [_unwrap(optimizer) for optimizer in listed]
        check_rule_fits(self.options.rule, unwrapped)
        if self._auto_end_step and len(unwrapped) > 1:
            raise ValueError(
                f"`auto_end_step=True` ends the step in an optimizer's post-hook, but {len(unwrapped)} optimizers"
                " were given: pass `auto_end_step=False` and call `end_step()` once after all of them have stepped"
            )
        if not unwrapped and not isinstance(self.options.rule, NoScalingRule):
            raise ValueError(
                f"`optimizer_rule`={self.options.rule!r} scales the optimizers' steps, but no optimizer was given:"
                " pass `optimizers`, or `optimizer_rule=None` to scale the EMA only"
            )
        scaling = not isinstance(self.options.rule, NoScalingRule)
        for index, optimizer in enumerate(unwrapped):
            owner = _SCALED_BY.get(optimizer)
            if scaling and owner is not None and owner is not self:
                raise ValueError(
                    f"optimizer {index} ({type(optimizer).__name__}) is already scaled by the rule of {owner!r}: two"
                    " rules would compound (lr x kappa x kappa). Give `optimizer_rule` to one EMA only; the others"
                    " scale their momentum alone (`optimizer_rule=None`)"
                )
        for attribute in self._attributes:
            attribute.restore()  # so that the originals below are read unscaled
        attributes = [  # resolved before anything else changes: a bad path leaves the hooks in place
            MomentumAttribute.resolve(self.module, path, base)
            for path, base in (self.options.momentum_attributes or {}).items()
        ]
        self.detach()
        self._step_samples, self._step_on_clock = 0, False  # a step interrupted before it ended is dropped
        for state in self._ema_states():
            state.refresh()  # the tensors' storage now (a module moved since it was built)
        self._attributes = attributes
        self._optimizers = unwrapped
        for averager in self._side_stream_owners():  # the pre-step hook below waits for the side stream
            averager.use_side_stream = self.options.side_stream and bool(unwrapped)
        if scaling:
            _SCALED_BY.update(dict.fromkeys(unwrapped, self))
        self._step_lrs = [[] for _ in unwrapped]
        self._group_names = [[] for _ in unwrapped]
        for optimizer in unwrapped:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def detach(self) -> None:
        """Remove the optimizer hooks and restore what this object changed (hyperparameters, attributes)."""
        for optimizer in self._optimizers:
            if _SCALED_BY.get(optimizer) is self:
                del _SCALED_BY[optimizer]
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for averager in self._side_stream_owners():  # no hook waits for a side stream any more
            averager.join()
            averager.use_side_stream = False
        self._restore_hyperparameters()
        for attribute in self._attributes:
            attribute.restore()
        self._attributes = []

    def reset(self) -> None:
        """Start afresh: the clock back to zero and, in Polyak mode, the EMA equal to the current weights.

        The optimizers stay hooked. A ``base_batch_size`` that was resolved from the first step is resolved
        again. In teacher mode the teachers are the module's own and keep their values.
        """
        if self.is_swapped:
            raise RuntimeError("reset() while the EMA is swapped into the model: call swap_out() first")
        self._restore_hyperparameters()
        self._reset_clock()
        if isinstance(self.averager, EMAState):
            reshard_fsdp1(self._fsdp1_modules)  # FSDP1: read the shards, not a gathered copy
            self.averager.reset()

    # ------------------------------------------------------------------------------------------ the step
    def count_samples(self, samples: int) -> None:
        """Count one micro-batch of ``samples`` (global: all data-parallel ranks) into the step under way.

        Call it for every micro-batch before the optimizer step it is accumulated into. Momentum attributes
        are set for this micro-batch here.
        """
        count = as_int(samples)
        if count is None or count < 1:
            raise ValueError(f"`samples` must be a positive integer (the micro-batch's global size), got {samples!r}")
        if self._step_on_clock:  # the last step was counted but not ended: end it now
            self.end_step()
        self._ended_by_hook = False
        self._step_samples += count
        if self._attributes:
            assert self._base is not None  # momentum_attributes need base_batch_size
            for attribute in self._attributes:
                attribute.scale_for(count / self._base)

    @property
    def samples_pending(self) -> int:
        """Samples counted into the optimizer step under way (not yet on the clock)."""
        return 0 if self._step_on_clock else self._step_samples

    def _step_kappa(self) -> float:
        if self._step_samples == 0:
            raise RuntimeError(
                "No samples were counted for this optimizer step: call `count_samples(n)` with every micro-batch's"
                " global size before `optimizer.step()` (or before `end_step()`)"
            )
        if self._base is None:
            self._base = self._step_samples
        return self._step_samples / self._base

    def _before_optimizer_step(self, optimizer: Optimizer, *_: Any) -> None:
        if self._step_samples == 0 and _initializes_state(optimizer):
            self._state_init_step = optimizer  # no training step: nothing to scale or count
            return
        if self._wait_before_step:
            self.averager.join()  # the step writes the weights the last update may still be reading
        self._restore_hyperparameters()  # a step that raised last time never reached its post-hook
        if self.is_swapped:
            raise RuntimeError(
                "optimizer.step() while the EMA weights are swapped into the module: the step would train the EMA"
                " and be lost at swap_out(). Call swap_out() (or leave the swapped() block) before training"
            )
        kappa = self._step_kappa()
        # An older torch's AdamW (before it became an Adam subclass) lacks the key; its weight decay is decoupled.
        if isinstance(optimizer, torch.optim.AdamW):
            for group in optimizer.param_groups:
                group.setdefault("decoupled_weight_decay", True)
        self._saved_groups = scale_param_groups(self.options.rule, optimizer.param_groups, kappa)
        index = next(i for i, hooked in enumerate(self._optimizers) if hooked is optimizer)
        self._step_lrs[index] = [group["lr"] for group in optimizer.param_groups]
        self._group_names[index] = [group.get("name") for group in optimizer.param_groups]

    def _after_optimizer_step(self, optimizer: Optimizer, *_: Any) -> None:
        if self._state_init_step is optimizer:
            self._state_init_step = None
            return
        self._restore_hyperparameters()
        self._count_step_on_clock()  # before a SampleClockLR stepped next reads the clock
        if self._auto_end_step:
            self.end_step()
            self._ended_by_hook = True

    def _restore_hyperparameters(self) -> None:
        restore_param_groups(self._saved_groups)
        self._saved_groups = []

    def _count_step_on_clock(self) -> None:
        """Count the step on the sample clock, once, with rho-hat from the clock before it."""
        if self._step_on_clock:
            return
        kappa = self._step_kappa()
        assert self._base is not None
        if isinstance(self.averager, PowerEMAState):  # its decay comes from the clock: report the first one's
            after = self._samples_seen + self._step_samples
            self._step_momentum = power_beta(self._samples_seen, after, self.averager.gammas[0])
        else:
            momentum = self.momentum_at(self.progress) if self.options.schedule_uses_progress else self.options.momentum
            assert momentum is not None
            if self.options.warmup:
                momentum = warmup_momentum(momentum, base_steps=self._samples_seen / self._base)
            self._step_momentum = scale_ema_momentum(momentum, kappa)
        self._kappa, self._step_batch = kappa, self._step_samples
        self._samples_seen += self._step_samples
        self._optimizer_steps += 1
        self._step_on_clock = True

    def end_step(self) -> None:
        """End the optimizer step: count it on the clock (if no optimizer hook did) and move the EMA.

        Called by the optimizer's post-hook with ``auto_end_step=True``; call it yourself otherwise, once per
        optimizer step, after every optimizer of the step has run. A step that never reached the optimizer (an
        fp16 grad scaler skipped it) has no post-hook: call ``end_step()`` after every ``scaler.step()``, so that
        its samples are counted as seen. After a step the post-hook already ended, this does nothing.
        """
        if self._ended_by_hook:
            return
        self._count_step_on_clock()
        self._step_samples = 0
        self._step_on_clock = False
        self._decay_since_update *= self._step_momentum
        if self._optimizer_steps % self.options.update_every == 0:
            before, self._samples_at_update = self._samples_at_update, self._samples_seen
            reshard_fsdp1(self._fsdp1_modules)  # a module left gathered would hand the update its gathered views
            finite = self._weights_finite()
            if isinstance(self.averager, PowerEMAState):
                self.averager.advance(before, self._samples_seen, finite)
            else:
                self.averager.update(self._decay_since_update, finite)
                if isinstance(self.averager, TeacherState):
                    self.reshard()  # a teacher left gathered must gather its moved shards again
            self._ema_updates += 1
            self._decay_since_update = 1.0
            every = self.options.snapshot_every_samples  # post-hoc: a snapshot at each multiple of N samples crossed
            if every and before // every < self._samples_seen // every:
                self.save_snapshot()

    def _side_stream_owners(self) -> list[Union[EMAState, PowerEMAState]]:
        return [self.averager] if isinstance(self.averager, (EMAState, PowerEMAState)) else []

    def wait(self) -> None:
        """Make the current CUDA stream wait for the EMA update under way (``side_stream``; queued on the
        device, no host sync). The next optimizer step, swaps and checkpoints do it themselves: call it before
        writing or freeing the module's weights any other way (weight clipping right after the step)."""
        self.averager.join()

    def _ema_states(self) -> list[EMAState]:
        if isinstance(self.averager, PowerEMAState):
            return list(self.averager.states)
        return [self.averager] if isinstance(self.averager, EMAState) else []

    def _weights_finite(self) -> Optional[Tensor]:
        """With ``skip_non_finite``: a 0-d bool tensor, whether the weights the update reads are finite; the
        skipped count grows on the device where they are not. ``None`` otherwise."""
        if not self.options.skip_non_finite:
            return None
        averager = self.averager
        if isinstance(averager, TeacherState):
            tensors = averager.online_tensors()
            finite = all_finite(tensors)  # parameters only
        else:
            state = averager.states[0] if isinstance(averager, PowerEMAState) else averager
            tensors = state.tracked
            finite = all_finite(tensors, nan_only=state.is_buffer)
        if self.is_sharded and torch.distributed.is_initialized():  # every rank skips together, or none does
            flag = finite.to(_collective_device(finite.device), torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.to(finite.device).bool()  # back where the weights are (a CPU flag of offloaded shards)
        if self._skipped.device != finite.device:  # made on the device: a host-to-device copy would sync
            self._skipped = torch.zeros((), dtype=torch.int64, device=finite.device) + int(self._skipped)
        self._skipped += (~finite).long()
        return finite

    @property
    def skipped_updates(self) -> int:
        """EMA updates skipped because the weights were not finite (``skip_non_finite``; reading it syncs)."""
        return int(self._skipped)

    def save_snapshot(self) -> Optional[str]:
        """Post-hoc EMA: write the power EMAs' snapshot at the samples seen (rank 0 only) and return its path.

        Called on the sample clock every ``snapshot_every_samples``; call it once more when training ends (the
        Lightning callback does), so that the reconstruction can end at the last sample. Nothing is written
        again for a sample count that already has its snapshot, nor before the first update.
        """
        if not isinstance(self.averager, PowerEMAState):
            raise RuntimeError("`save_snapshot()` belongs to a post-hoc EMA (`sigma_rels=...`)")
        every = self.options.snapshot_every_samples
        assert every is not None and self.options.snapshot_dir is not None
        if self._ema_updates == 0 or not self._write_snapshots:
            return None
        path = snapshot_path(self.options.snapshot_dir, self._samples_at_update)
        if _is_rank_zero() and not path.exists():
            averages = [state.state_dict() for state in self.averager.states]
            write_snapshot(self.options.snapshot_dir, self._samples_at_update, self.averager.sigma_rels, averages)
        return str(path)

    def momentum_at(self, progress: float) -> float:
        """The momentum at the base batch size at ``progress``, before warm-up and kappa (not a hook: pass
        ``momentum_schedule`` to shape it)."""
        return self.options.momentum_at(progress)

    # -------------------------------------------------------------------------------------- the clock
    @property
    def samples_seen(self) -> int:
        """Training samples (global, all ranks) consumed by the optimizer steps so far."""
        return self._samples_seen

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (one per :meth:`end_step`, also with several optimizers)."""
        return self._optimizer_steps

    @property
    def ema_updates(self) -> int:
        """EMA updates so far (one every ``update_every`` optimizer steps)."""
        return self._ema_updates

    @property
    def kappa(self) -> float:
        """:math:`\\kappa` of the latest optimizer step (``nan`` before the first)."""
        return self._kappa

    @property
    def ema_momentum(self) -> float:
        """:math:`\\hat\\rho` of the latest optimizer step (``nan`` before the first)."""
        return self._step_momentum

    @property
    def global_batch_size(self) -> int:
        """The global batch of the latest optimizer step (0 before the first)."""
        return self._step_batch

    @property
    def step_lrs(self) -> list[list[float]]:
        """The learning rate each param group of each optimizer used in its latest step (after the rule)."""
        return [list(lrs) for lrs in self._step_lrs]

    @property
    def resolved_base_batch_size(self) -> Optional[int]:
        """``base_batch_size``, or the first step's global batch once it is known."""
        return self._base

    @property
    def resolved_total_samples(self) -> int:
        """``total_samples``, or what ``total_samples_from`` gives."""
        if self.options.total_samples is not None:
            return self.options.total_samples
        if self.total_samples_from is not None:
            total = self.total_samples_from()
            if as_int(total) is None or total < 1:
                raise ValueError(
                    f"`total_samples_from` must return a positive integer (the run's training samples), got {total!r}"
                )
            return int(total)
        raise ValueError(
            "`total_samples` is not set: pass `total_samples=`, the training samples (global, all ranks) the run"
            " will see; progress, a momentum schedule and SampleClockLR need it"
        )

    @property
    def progress(self) -> float:
        """Training progress on the sample clock: :attr:`samples_seen` / :attr:`resolved_total_samples`."""
        total = self.resolved_total_samples
        if self._samples_seen > total:
            raise ValueError(
                f"The run has trained on {self._samples_seen} samples, past `total_samples`={total}: set"
                " `total_samples` to at least the samples (global, all ranks) this run trains on"
            )
        return self._samples_seen / total

    def momentum_attribute_values(self) -> dict[str, float]:
        """The current value of every momentum attribute, by path."""
        return {attribute.path: attribute.value for attribute in self._attributes}

    def metrics(self, prefix: str = "ema") -> dict[str, float]:
        r"""What the latest step did, for a logger: ``<prefix>/kappa``, ``/momentum`` (:math:`\hat\rho`),
        ``/half_life`` (:attr:`half_life`, in samples), ``/batch_size`` (global), ``/samples_seen``,
        ``/lr-<Optimizer>`` (the effective learning rate, named as Lightning's ``LearningRateMonitor`` names it:
        ``-1``, ``-2`` for the second and third optimizer of a type, ``/pg1``, ``/pg2`` or the group's ``"name"``
        with several param groups), ``/<path>`` for every momentum attribute and ``/skipped_updates`` with
        ``skip_non_finite``. The Lightning callback logs exactly these.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule="sgd")
            >>> ema.count_samples(8)
            >>> optimizer.step()
            >>> {key: round(value, 6) for key, value in ema.metrics().items()}  # doctest: +NORMALIZE_WHITESPACE
            {'ema/kappa': 2.0, 'ema/momentum': 0.81, 'ema/half_life': 26.315254, 'ema/batch_size': 8.0,
             'ema/samples_seen': 8.0, 'ema/lr-SGD': 0.2}
        """
        check_name(prefix, "prefix")
        metrics = {
            f"{prefix}/kappa": self._kappa,
            f"{prefix}/momentum": self._step_momentum,
            f"{prefix}/half_life": self.half_life,
            f"{prefix}/batch_size": float(self._step_batch),
            f"{prefix}/samples_seen": float(self._samples_seen),
        }
        seen: dict[type, int] = {}
        for optimizer, lrs, names in zip(self._optimizers, self._step_lrs, self._group_names):
            kind = type(optimizer)
            seen[kind] = seen.get(kind, 0) + 1  # LearningRateMonitor's names: lr-SGD, lr-SGD-1, ...
            key = f"{prefix}/lr-{kind.__name__}" + (f"-{seen[kind] - 1}" if seen[kind] > 1 else "")
            for index, (lr, name) in enumerate(zip(lrs, names)):
                group = name or (f"pg{index + 1}" if len(lrs) > 1 else None)
                metrics[f"{key}/{group}" if group else key] = lr
        metrics.update({f"{prefix}/{path}": value for path, value in self.momentum_attribute_values().items()})
        if self.options.skip_non_finite:
            metrics[f"{prefix}/skipped_updates"] = float(self.skipped_updates)
        return metrics

    @property
    def half_life(self) -> float:
        r"""The EMA's half-life in samples at the latest step: the samples after which a weight's share of the
        average has halved, :math:`b \ln\frac12 / \ln\hat\rho` for a global batch :math:`b` (``inf`` at
        :math:`\hat\rho = 1`, ``nan`` before the first step). The same at every batch size under the rule, and
        readable where :math:`\hat\rho` rounds to 1.000."""
        if math.isnan(self._step_momentum) or self._step_batch == 0:
            return math.nan
        return half_life_from_momentum(self._step_momentum, self._step_batch)

    # ------------------------------------------------------------------------------------ the Polyak EMA
    def _polyak(self) -> EMAState:
        if isinstance(self.averager, PowerEMAState):
            raise RuntimeError(
                "A post-hoc EMA keeps power EMAs, not one EMA: reconstruct the EMA of the length you want with"
                f" `reconstruct_post_hoc({self.options.snapshot_dir!r}, sigma_rel=...)` and load it into the module"
            )
        if not isinstance(self.averager, EMAState):
            raise RuntimeError(
                "Teacher mode keeps no separate EMA: the EMA weights are the module's teacher submodules"
                f" {sorted(self.options.teachers.values())}. Use those directly."  # type: ignore[union-attr]
            )
        return self.averager

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA of every tracked parameter and buffer, by the module's names (EMA dtype, live tensors)."""
        return self._polyak().averages_by_name()

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The training values of every tracked tensor, by name, also while the EMA is swapped in."""
        state = self._polyak()
        if not state.is_swapped:
            reshard_fsdp1(self._fsdp1_modules)  # FSDP1: the shards, not a gathered copy
        return state.raw_by_name()

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Hold the EMA weights in the module inside the block; restore the training weights exactly after."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def swap_in(self) -> None:
        """Write the EMA weights into the module (e.g. before an evaluation loop); :meth:`swap_out` undoes it.

        A sharded module gets each rank's EMA shards copied into its local shards."""
        state = self._polyak()
        self.reshard()  # a module left gathered by a no-grad forward would keep its gathered copy
        state.swap_in()

    def swap_out(self) -> None:
        """Restore the training weights exactly after :meth:`swap_in`; nothing to do if they are in place."""
        state = self._polyak()
        if state.is_swapped:
            self.reshard()  # the evaluation's gathered copies hold the EMA
        state.swap_out()

    def reshard(self) -> None:
        """Sharded module: put every FSDP module left gathered (by a no-grad forward) back on its shard, so that
        the EMA reads and writes the shards and the next forward gathers what it wrote. Nothing to do otherwise."""
        if self.is_sharded:
            reshard(self._fsdp_modules)
            reshard_fsdp1(self._fsdp1_modules)

    @property
    def is_swapped(self) -> bool:
        """Whether the module holds the EMA weights now (between :meth:`swap_in` and :meth:`swap_out`)."""
        return isinstance(self.averager, EMAState) and self.averager.is_swapped

    def functional_call(self, module: torch.nn.Module, args: Any, kwargs: Optional[dict[str, Any]] = None) -> Any:
        """Run ``module`` on the EMA weights without touching its own (:func:`torch.func.functional_call`)."""
        state = self._polyak()
        if self.is_sharded:
            raise NotImplementedError(
                "functional_call is not supported for a sharded module: FSDP2 gathers the parameters it holds, not"
                " the ones functional_call substitutes. Evaluate inside `with ema.swapped():` instead."
            )
        if _unwrap_module(module) is not self.module:
            raise ValueError(
                f"`module` must be the module this EMA averages (the {type(self.module).__name__} it was built"
                f" with), got another {type(module).__name__}"
            )
        state.flush()
        weights = {
            name: state.averages[i].to(state.tracked[i].device, state.tracked[i].dtype)
            for name, i in state.index_of_name.items()
        }
        return torch.func.functional_call(module, weights, args, kwargs)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The clock and, in Polyak mode, the EMA tensors (live): everything needed to resume exactly."""
        state: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "base_batch_size": self._base,
            "samples_seen": self._samples_seen,
            "optimizer_steps": self._optimizer_steps,
            "ema_updates": self._ema_updates,
            "pending_decay": self._decay_since_update,
        }
        if self.options.skip_non_finite:
            state["skipped_updates"] = self.skipped_updates
        if isinstance(self.averager, EMAState):  # teacher mode: the teachers are in the module's state_dict
            state["ema"] = self.averager.state_dict()
        elif isinstance(self.averager, PowerEMAState):
            state.update(
                power_ema=self.averager.state_dict(),
                samples_at_update=self._samples_at_update,
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. A ``base_batch_size`` given now wins over the saved one."""
        _check_state(state, "The saved ScaledEMA state")
        key = {EMAState: "ema", PowerEMAState: "power_ema"}.get(type(self.averager))
        for other, mode in (("ema", "a Polyak EMA"), ("power_ema", "a post-hoc EMA")):
            if other in state and other != key:
                raise KeyError(
                    f"The saved ScaledEMA state holds the {other!r} tensors of {mode}, but this one is"
                    f" {self._mode()}: load a state written in the same mode"
                )
            if other == key and other not in state:
                raise KeyError(
                    f"The saved ScaledEMA state lacks the {other!r} tensors this one needs, {self._mode()} (it was"
                    " written in another mode): load a state written in the same mode"
                )
        if key is not None and isinstance(self.averager, (EMAState, PowerEMAState)):
            self.averager.load_state_dict(state[key])  # checks every tensor before the first copy
        self._restore_hyperparameters()
        self._reset_clock()
        if self._base is None and state["base_batch_size"] is not None:  # the saved base keeps the horizon
            self._base = int(state["base_batch_size"])
        self._samples_seen = int(state["samples_seen"])
        self._optimizer_steps = int(state["optimizer_steps"])
        self._ema_updates = int(state["ema_updates"])
        self._decay_since_update = float(state["pending_decay"])
        self._skipped = torch.tensor(int(state.get("skipped_updates", 0)), device=self._skipped.device)
        if isinstance(self.averager, PowerEMAState):
            self._samples_at_update = int(state["samples_at_update"])

    def _mode(self) -> str:
        if isinstance(self.averager, PowerEMAState):
            return f"a post-hoc EMA of sigma_rel {list(self.averager.sigma_rels)}"
        if isinstance(self.averager, TeacherState):
            return f"in teacher mode ({dict(self.options.teachers or {})})"
        return "a Polyak EMA"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._mode()}, base_batch_size={self._base}, rule={self.options.rule!r},"
            f" samples_seen={self._samples_seen}, optimizer_steps={self._optimizer_steps})"
        )


def _check_fsdp1(root: torch.nn.Module, options: EMAOptions) -> torch.nn.Module:
    """The module inside an FSDP1 root wrapper (or ``root``, whose submodules are wrapped), after checking that its
    EMA can be kept shard by shard."""
    if not all(getattr(unit, "_use_orig_params", False) for unit in fsdp1_modules(root)):
        raise ValueError(
            "FSDP1 with `use_orig_params=False` hides the parameters in flat parameters, so their EMA cannot be"
            " kept or named: pass `use_orig_params=True` (Lightning's FSDPStrategy default), or shard with FSDP2"
            " (`fully_shard`, ModelParallelStrategy)"
        )
    inner: torch.nn.Module = root.module if is_fsdp1(root) else root  # type: ignore[assignment]
    for online, teacher in (options.teachers or {}).items():
        unwrapped = [path for path in (online, teacher) if not fsdp1_wraps_whole(inner.get_submodule(path))]
        if unwrapped:
            raise ValueError(
                f"Under FSDP1, teacher {teacher!r} and its online module {online!r} must each be FSDP units of"
                f" their own, and {unwrapped} is not: FSDP1 slices a unit's parameters together, so a submodule"
                " that shares a unit with other parameters holds other slices on each rank. Wrap each (an"
                " `auto_wrap_policy` naming their classes, or `FullyShardedDataParallel(...)` around each)"
            )
    low = sorted({str(p.dtype) for p in inner.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low and options.ema_precision == "fp32":
        raise ValueError(
            f"An fp32 EMA of FSDP1 parameters held in {', '.join(low)} is not supported: FSDP1's checkpoints carry"
            " the EMA through the parameters' own dtype, which would round it. Keep fp32 parameters (precision"
            " '16-mixed'/'bf16-mixed'), pass `ema_precision='model'`, or shard with FSDP2 (`fully_shard`,"
            " ModelParallelStrategy), whose checkpoints keep the fp32 EMA"
        )
    return inner


def _collective_device(device: torch.device) -> torch.device:
    """Where a tensor goes for a collective of the default process group: ``device`` if its backend takes it, else
    the current GPU (NCCL alone takes no CPU tensor: a rank with only empty or CPU-offloaded shards has a CPU flag)."""
    backend = str(torch.distributed.get_backend())
    if device.type == "cpu" and "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _initializes_state(optimizer: Optimizer) -> bool:
    """Whether a step is the one ``torch.distributed.checkpoint`` takes to create an optimizer's state before
    loading it (no state yet, every learning rate set to 0), not a training step."""
    groups = optimizer.param_groups
    return not optimizer.state and bool(groups) and all(float(group.get("lr", 1.0)) == 0.0 for group in groups)


def _is_rank_zero() -> bool:
    """Whether this process writes files: the only one, or rank 0 of a torch.distributed group."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _check_state(state: Mapping[str, Any], where: str) -> None:
    """Raise unless ``state`` is a :meth:`ScaledEMA.state_dict` of this version; ``where`` starts the message."""
    check_saved_state(state, where, _STATE_FORMAT, _STATE_KEYS, hint=" (from `state_dict()`)")
    base = state["base_batch_size"]
    if base is not None and (as_int(base) is None or base < 1):
        raise ValueError(f"{where} has base_batch_size={base!r}; a positive integer or None is allowed")
    for key in ("samples_seen", "optimizer_steps", "ema_updates", "skipped_updates", "samples_at_update"):
        if key in state and (as_int(state[key]) is None or state[key] < 0):
            raise ValueError(f"{where} has {key}={state[key]!r}; an integer >= 0 is allowed")
    if state["ema_updates"] > state["optimizer_steps"]:
        raise ValueError(
            f"{where} has ema_updates={state['ema_updates']!r} past optimizer_steps={state['optimizer_steps']!r};"
            " there is at most one update per step"
        )
    decay = as_real(state["pending_decay"])
    if decay is None or not 0.0 < decay <= 1.0:
        raise ValueError(f"{where} has pending_decay={state['pending_decay']!r}; a number in (0, 1] is allowed")
    power = state.get("power_ema", {})
    if not isinstance(power, Mapping) or not all(isinstance(averages, Mapping) for averages in power.values()):
        raise TypeError(f"{where} has power_ema of type {type(power).__name__}; a dict of EMA dicts is allowed")
    for key, averages in (("ema", state.get("ema", {})), *((f"power_ema[{k!r}]", v) for k, v in power.items())):
        if not isinstance(averages, Mapping):
            raise TypeError(f"{where} has {key} of type {type(averages).__name__}; a dict of tensors is allowed")
        for name, tensor in averages.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{where} has {key}[{name!r}] of type {type(tensor).__name__}; a tensor is allowed")
            local = local_piece(tensor) if is_sharded(tensor) else tensor  # this rank's shard: no communication
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                raise ValueError(f"{where} has a non-finite EMA of {name!r}; the checkpoint is corrupt")
    if "power_ema" in state:
        if "samples_at_update" not in state:
            raise KeyError(f"{where} lacks ['samples_at_update']")
        if state["samples_at_update"] > state["samples_seen"]:
            raise ValueError(
                f"{where} has samples_at_update={state['samples_at_update']!r} past samples_seen="
                f"{state['samples_seen']!r}; the last update cannot come after the samples seen"
            )


def _unwrap_module(module: Any) -> torch.nn.Module:
    """The module inside DDP, Fabric or ``torch.compile`` wrappers (names and checkpoints are the module's own)."""
    while True:
        if type(module).__name__ == "_FabricModule" and is_fsdp1(getattr(module, "_forward_module", None)):
            module = module._forward_module  # FSDP1 under Fabric: its root wrapper (checkpoints, resharding)
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel) or type(module).__name__ == "_FabricModule":
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), torch.nn.Module
        ):
            module = module._orig_mod
        else:
            break
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    return module


def _unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a Fabric or Lightning wrapper (``.optimizer``), or ``optimizer`` itself."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer):  # Fabric's wrapper subclasses the optimizer
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        raise TypeError(f"`optimizers` must be torch optimizers, got {type(optimizer).__name__}")
    return inner
