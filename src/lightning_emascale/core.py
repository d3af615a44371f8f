r"""``ScaledEMA``: the EMA Scaling Rule for any training loop (Lightning Trainer, Fabric, plain PyTorch).

No Lightning import: a plain loop pays only for torch. :class:`~lightning_emascale.EMAScalingCallback` is a
thin adapter that builds one of these when fit starts and forwards the Trainer's hooks to it.

``ScaledEMA`` holds the sample clock, :math:`\kappa`, progress, the momentum schedule and the optimizer rule's
hooks. What is averaged is an averager (:mod:`~lightning_emascale._averager`: a Polyak copy, teacher pairs or power
EMAs), picked once when it is built; where the module's tensors live is a
:class:`~lightning_emascale._module_layout.ModuleLayout`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_emascale._attributes import MomentumAttribute
from lightning_emascale._averager import Update
from lightning_emascale._centers import CenterUpdate
from lightning_emascale._checks import MAX_COUNT, as_int, check_name, check_positive_int, show
from lightning_emascale._modes import build_averager, options_from
from lightning_emascale._modes import check as check_options
from lightning_emascale._module_layout import ModuleLayout, unwrap_module
from lightning_emascale._options import EMAOptions, EMAPrecision, MomentumSchedule, Warmup
from lightning_emascale._saved_state import STATE_FORMAT, check_clock_options, check_mode, check_state
from lightning_emascale._scaled_optimizers import ScaledOptimizers
from lightning_emascale._warnings import caller_level
from lightning_emascale._zero import is_deepspeed_optimizer
from lightning_emascale.functional import half_life_from_momentum, scale_ema_momentum
from lightning_emascale.presets import split_preset_arguments
from lightning_emascale.rules import RuleLike


class ScaledEMA:
    r"""A model EMA whose horizon, counted in samples, does not depend on the batch size.

    After every optimizer step the EMA moves towards the weights, :math:`\zeta \leftarrow \hat\rho\,\zeta +
    (1 - \hat\rho)\,\theta`, with :math:`\hat\rho = \rho^\kappa` (the EMA Scaling Rule of Busbridge et al.,
    NeurIPS 2023) and :math:`\kappa` the step's global batch over ``base_batch_size``. While each optimizer step
    runs, its hyperparameters follow ``optimizer_rule`` and are restored right after. Every schedule runs on the
    sample clock (:attr:`progress`, samples seen / total samples). In a plain loop, call :meth:`count_samples` with
    every micro-batch's global size before ``optimizer.step()``. The guide in ``docs/core.md`` explains each option
    at length: sharded modules, the side stream, offloading, swaps.

    Args:
        module: the model averaged (Polyak mode) or holding the teachers (``teachers``); the module itself or its
            DDP, FSDP1 or Fabric wrapper.
        optimizers: the optimizer(s) whose steps drive the EMA and that the rule scales; ``None``: no hooks, call
            :meth:`end_step` after every step.
        momentum: :math:`\rho \in [0, 1)` tuned at ``base_batch_size`` (the cosine schedule's start); ``None``: 0.999.
        base_batch_size: the global batch ``momentum`` and the optimizer were tuned at; ``None``: the first step's.
        optimizer_rule: ``"sgd"``, ``"adam"``, ``"none"``/``None`` or an :class:`~lightning_emascale.OptimizerRule`.
        update_every: update every this many optimizer steps, with the product of their :math:`\hat\rho`.
        warmup: ``True`` or ``"ratio"``: :math:`\rho_t = \min(\rho, (1 + t)/(10 + t))`; ``"inverse-power"``:
            :math:`\min(\rho, 1 - (1 + t/\gamma)^{-p})`; :math:`t` = samples since the start / base batch size.
        warmup_gamma: :math:`\gamma` of the inverse-power warm-up (``None``: 1).
        warmup_power: :math:`p` of the inverse-power warm-up (``None``: 2/3).
        min_momentum: a floor under the momentum after the warm-up (the peers' ``min_decay``/``min_value``).
        start_after_samples: a delayed start: every step that starts at most this many samples into training has
            momentum 0, so an update (every step, or every ``update_every``) sets the EMA to the weights; averaging
            starts with the next step (the peers' ``update_after_step`` × base batch size).
        debias: a zero-initialised EMA divided by its total weight (Adam's bias correction), computed as an
            equivalent momentum per update: the first update copies the weights.
        switch_every_samples: "switch EMA": after the update of the first step that starts at or past each multiple
            of this many samples, write the EMA into the model's weights (Polyak mode).
        switch_momentum: the share of the training weights a switch keeps: :math:`\theta \leftarrow m\theta +
            (1 - m)\zeta`; 0 copies the EMA.
        ema_precision: ``"fp32"`` keeps the EMA of float16/bfloat16 tensors in float32; ``"model"`` their dtype.
        momentum_schedule: ``"constant"``, ``"cosine"`` (to ``final_momentum``) or a callable of progress in
            :math:`[0, 1]` returning the momentum at the base batch size (then leave ``momentum`` unset).
        final_momentum: where the cosine schedule ends, in :math:`[0, 1]` (BYOL: 1.0).
        total_samples: the run's training samples (global), the denominator of :attr:`progress`.
        teachers: teacher mode: online → teacher submodule paths, e.g. ``{"backbone": "backbone_momentum"}``.
        momentum_attributes: attribute path → its momentum at ``base_batch_size`` (DINO's
            ``{"criterion.center_momentum": 0.9}``), set to :math:`\rho^{b/B}` for every micro-batch of :math:`b`.
        center_momenta: path → the momentum at ``base_batch_size`` of a centre updated once per optimizer step with
            the mean over all its micro-batches (lightly's ``DINOLoss`` or ``Center``: ``{"criterion": 0.9}``);
            exact under gradient accumulation.
        sigma_rels: post-hoc mode (EDM2): the lengths of the power EMAs tracked, each in :math:`(0, 0.288675]`.
        snapshot_every_samples: post-hoc mode: a snapshot every this many samples seen.
        snapshot_dir: post-hoc mode: the snapshots' directory (written by rank 0).
        include: average only these parameters, buffers or submodules (names or paths).
        exclude: leave these out (e.g. ``["discriminator"]``).
        skip_non_finite: skip an update whose weights are not finite (decided on the device, no host sync).
        freeze_teachers: teacher mode: ``requires_grad_(False)`` on the teachers instead of refusing them.
        flat_parameters: deprecated (no whole step was faster): move the module's tensors into one buffer laid out
            as the EMA.
        offload: keep the EMA in CPU memory, updated in a background thread.
        side_stream: on a GPU, run each Polyak or post-hoc update on a CUDA side stream.
        copy_on_swap: evaluation copies the averages into the module instead of pointing it at them.
        auto_end_step: end each step in the optimizer's post-hook; ``False`` (or several optimizers): call
            :meth:`end_step` once per step.
        total_samples_from: where to get the total when ``total_samples`` is ``None`` (an adapter's callable).

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
        warmup: Warmup = False,
        warmup_gamma: Optional[float] = None,
        warmup_power: Optional[float] = None,
        min_momentum: Optional[float] = None,
        start_after_samples: Optional[int] = None,
        debias: bool = False,
        switch_every_samples: Optional[int] = None,
        switch_momentum: float = 0.0,
        ema_precision: EMAPrecision = "fp32",
        momentum_schedule: MomentumSchedule = "constant",
        final_momentum: Optional[float] = None,
        total_samples: Optional[int] = None,
        teachers: Optional[Mapping[str, str]] = None,
        momentum_attributes: Optional[Mapping[str, float]] = None,
        center_momenta: Optional[Mapping[str, float]] = None,
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
        self._build(module, optimizers, options_from(locals()), auto_end_step, total_samples_from)

    @classmethod
    def from_options(
        cls,
        module: torch.nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer], None],
        options: EMAOptions,
        auto_end_step: bool = True,
        total_samples_from: Optional[Callable[[], int]] = None,
    ) -> ScaledEMA:
        """Build from options an adapter made with its arguments (an adapter states its options once); the options'
        combinations are checked again here."""
        check_options(options)
        self = cls.__new__(cls)
        self._build(module, optimizers, options, auto_end_step, total_samples_from)
        return self

    @classmethod
    def from_preset(
        cls,
        tool: str,
        module: torch.nn.Module,
        optimizers: Union[Optimizer, Sequence[Optimizer], None] = None,
        *,
        base_batch_size: int,
        total_samples: Optional[int] = None,
        **arguments: Any,
    ) -> ScaledEMA:
        """An EMA configured as ``tool``'s, from the tool's own constructor arguments (its names, its defaults),
        beside any of this class's other arguments. At ``base_batch_size`` it equals the tool's EMA; at other batch
        sizes it keeps the tool's horizon in samples. See :func:`~lightning_emascale.presets.preset_options`.

        Args:
            tool: ``"timm"``, ``"ema_pytorch"``, ``"diffusers"``, ``"lightning"``, ``"lightly"`` or ``"composer"``.
            module: as in the constructor.
            optimizers: as in the constructor.
            base_batch_size: the global batch the tool's configuration was tuned at.
            total_samples: the run's training samples (global), as in the constructor.
            **arguments: the tool's arguments (e.g. ``decay=0.9998, use_warmup=True``) and this class's others.

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(4, 1)
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> ema = ScaledEMA.from_preset("timm", model, optimizer, base_batch_size=64, decay=0.9998, use_warmup=True)
            >>> ema.options.warmup, ema.options.start_after_samples
            ('inverse-power', 0)
        """
        options = split_preset_arguments(tool, base_batch_size, total_samples, arguments)
        options.pop("copy_at_end", None)  # the callback's (Lightning's preset): in a loop, call copy_to() at the end
        return cls(module, optimizers, **options)

    def _build(
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
        unwrap_module(module)  # a module that is none raises first
        if not isinstance(auto_end_step, bool):
            raise ValueError(f"`auto_end_step` must be True or False, got {auto_end_step!r}")
        if total_samples_from is not None and not callable(total_samples_from):
            raise TypeError(
                f"`total_samples_from` must be a callable that returns the total, got {total_samples_from!r}"
            )
        #: Where the module's tensors live: unwrapped, sharded or not (each rank averages its own shards).
        self.layout = ModuleLayout(module, options)
        self.module = self.layout.module
        self.options = options
        self._auto_end_step = auto_end_step
        self.total_samples_from = total_samples_from
        #: The optimizers this EMA follows, and the rule applied to their steps.
        self._steps = ScaledOptimizers(options.rule)
        self._attributes: list[MomentumAttribute] = []
        self._centers: list[CenterUpdate] = []  # `center_momenta`, intercepted while attached
        # Checked before the averager is built, which may move the module's tensors (`flat_parameters`) or freeze
        # its teachers: a construction that fails leaves the module as it was.
        attachment = self._checked_attachment([] if optimizers is None else optimizers)
        #: What is averaged: a Polyak copy, teacher pairs or power EMAs (an :class:`Averager`).
        # FSDP1 gathers from the flat parameter, DeepSpeed keeps its own flat buffers: a swap copies
        copy_on_swap = (
            options.copy_on_swap or self.layout.fsdp1_root is not None or self.layout.deepspeed_engine is not None
        )
        if options.switch_every_samples is not None:  # refused now, not when the first switch comes due
            self.refuse_writes_under_deepspeed("`switch_every_samples`")
        self.averager = build_averager(self.module, options, copy_on_swap)
        #: Whether the optimizer's pre-step hook waits for the side stream. An adapter whose loop runs the closure
        #: (forward and backward) inside ``optimizer.step()`` sets it False and calls :meth:`wait` after the
        #: closure instead, so that the update overlaps them there too (Lightning's ``on_before_optimizer_step``).
        self.wait_before_step = True
        self._state_init_step: Optional[Optimizer] = None  # the optimizer whose state-initializing step runs now
        self._reset_clock()
        self._attach(*attachment)

    @property
    def auto_end_step(self) -> bool:
        """Whether the optimizer's post-step hook ends each step (set when built)."""
        return self._auto_end_step

    @property
    def is_sharded(self) -> bool:
        """Whether the module is sharded (``DTensor`` parameters, FSDP1 or ZeRO-3), each rank averaging its shards."""
        return self.layout.is_sharded

    @property
    def fsdp1_root(self) -> Optional[torch.nn.Module]:
        """FSDP1 — the root wrapper (its checkpoints go through FSDP1's state dicts); ``None`` otherwise."""
        return self.layout.fsdp1_root

    @property
    def deepspeed_engine(self) -> Optional[torch.nn.Module]:
        """DeepSpeed — the engine the module was given in (it drops the gathered ZeRO-3 copies); ``None`` otherwise."""
        return self.layout.deepspeed_engine

    @property
    def swappable(self) -> bool:
        """Whether this EMA keeps one averaged copy (Polyak mode) to swap in and save as the model's weights."""
        return self.averager.swappable

    @property
    def snapshots_enabled(self) -> bool:
        """Post-hoc mode — whether snapshots are written (an adapter turns them off for a smoke test)."""
        return self.averager.snapshots_enabled

    @snapshots_enabled.setter
    def snapshots_enabled(self, enabled: bool) -> None:
        self.averager.enable_snapshots(enabled)

    def _reset_clock(self) -> None:
        self._base: Optional[int] = self.options.base_batch_size
        self._samples_seen = 0
        self._optimizer_steps = 0
        self._ema_updates = 0
        self._decay_since_update = 1.0  # the product of the rho-hats of the steps since the last EMA update
        self._debias_weight = 0.0  # `debias`: the weight of the samples in the average, 1 - the product of decays
        self._switches = 0  # `switch_every_samples`: the multiples switched for so far
        self._step_samples = 0  # global samples counted into the optimizer step under way
        self._step_on_clock = False  # the step under way has been counted on the clock
        self._ended_by_hook = False  # the optimizer's post-hook ended the last step (auto_end_step)
        self._kappa = math.nan
        self._step_momentum = math.nan
        self._last_update_decay = math.nan
        self._momentum_key: tuple[int, int, Optional[int]] = (-1, -1, None)  # the clock the cached momentum is for
        self._momentum_of_key = math.nan
        self._step_batch = 0
        self._steps.clear_records()
        self._skipped = torch.zeros((), dtype=torch.int64)  # updates skipped for non-finite weights (on device)

    # ------------------------------------------------------------------------------------------ wiring
    def attach(self, optimizers: Union[Optimizer, Sequence[Optimizer]]) -> None:
        """Hook ``optimizers`` (replacing any hooked before) and resolve the momentum attributes.

        The Lightning callback calls this at every fit start, with that fit's optimizers.
        """
        self._attach(*self._checked_attachment(optimizers))

    def _checked_attachment(
        self, optimizers: Union[Optimizer, Sequence[Optimizer]]
    ) -> tuple[list[Optimizer], list[MomentumAttribute], list[CenterUpdate]]:
        """The torch optimizers of ``optimizers``, the resolved momentum attributes and centres, each checked; a
        refusal leaves the hooks, attributes and centres in place."""
        unwrapped = self._steps.check(optimizers, self, self._auto_end_step)
        given = list(optimizers) if isinstance(optimizers, Sequence) else [optimizers]
        deepspeed = [type(o).__name__ for o in given if is_deepspeed_optimizer(o)]
        if deepspeed and self._auto_end_step:
            raise ValueError(
                f"`auto_end_step=True` ends the step when the torch optimizer inside DeepSpeed's {deepspeed[0]} has"
                " stepped, before DeepSpeed copies the result into the parameters: pass `auto_end_step=False` and"
                " call `end_step()` after each `engine.step()` that ends a gradient-accumulation window"
            )
        owned = {id(tensor) for tensor in self.module.parameters()}
        held = {id(p) for optimizer in unwrapped for group in optimizer.param_groups for p in group["params"]}
        if owned and held and not owned & held and not deepspeed:  # DeepSpeed's optimizer trains master copies
            names = [type(optimizer).__name__ for optimizer in unwrapped]
            warnings.warn(
                f"`optimizers` ({', '.join(names)}) hold none of the parameters of the module"
                f" ({type(self.module).__name__}): unless they train copies that are written back into it (master"
                " weights), their steps never move the weights this EMA averages. Pass the optimizer that trains this"
                " module",
                UserWarning,
                stacklevel=caller_level(),
            )
        current = {attribute.path: attribute.original for attribute in self._attributes}
        attributes = [MomentumAttribute.resolve(self.module, path, base, current.get(path)) for path, base in
                      (self.options.momentum_attributes or {}).items()]  # fmt: skip
        centers = [
            CenterUpdate.resolve(self.module, path, base) for path, base in (self.options.center_momenta or {}).items()
        ]
        owners: dict[int, str] = {}
        scaled = {(id(attribute.owner), attribute.attribute): attribute.path for attribute in attributes}
        for center in centers:  # one interception per centre, checked before anything is attached
            first = owners.setdefault(id(center.owner), center.path)
            if first != center.path:
                raise ValueError(
                    f"`center_momenta` names {center.path!r}, the same {type(center.owner).__name__} as {first!r}:"
                    " name each centre once"
                )
            both = scaled.get((id(center.owner), center.momentum))
            if both is not None:
                raise ValueError(
                    f"`momentum_attributes` scales {both!r}, the momentum of the centre `center_momenta` updates at"
                    f" {center.path!r}: a centre is either scaled per micro-batch or updated once per step, so drop"
                    f" {both!r} from `momentum_attributes`"
                )
        return unwrapped, attributes, centers

    def _attach(
        self, unwrapped: list[Optimizer], attributes: list[MomentumAttribute], centers: list[CenterUpdate]
    ) -> None:
        self.detach()
        self._step_samples, self._step_on_clock = 0, False  # a step interrupted before it ended is dropped
        self.averager.refresh()  # the tensors' storage now (a module moved since it was built)
        self._attributes = attributes
        self._centers = centers
        for center in centers:
            center.attach()
        self.averager.set_side_stream(self.options.side_stream and bool(unwrapped))  # the pre-step hook waits
        self._steps.hook(unwrapped, self, self._before_optimizer_step, self._after_optimizer_step)

    def detach(self) -> None:
        """Remove the optimizer hooks and restore what this object changed (hyperparameters, attributes)."""
        self._steps.unhook(self)
        self.averager.join()  # no hook waits for a side stream any more
        self.averager.set_side_stream(False)
        for attribute in self._attributes:
            attribute.restore()
        self._attributes = []
        for center in self._centers:
            center.restore()
        self._centers = []

    def reset(self) -> None:
        """Start afresh: the clock back to zero and, in Polyak mode, the EMA equal to the current weights.

        The optimizers stay hooked. A ``base_batch_size`` that was resolved from the first step is resolved
        again. In teacher mode the teachers are the module's own and keep their values.
        """
        if self.is_swapped:
            raise RuntimeError("reset() while the EMA is swapped into the model: call swap_out() first")
        self._steps.restore()
        self._reset_clock()
        self.layout.reshard_fsdp1()  # FSDP1: read the shards, not a gathered copy
        self.averager.reset()

    # ------------------------------------------------------------------------------------------ the step
    def count_samples(self, samples: int) -> None:
        """Count one micro-batch of ``samples`` (global: all data-parallel ranks) into the step under way.

        Call it for every micro-batch before the optimizer step it is accumulated into. Momentum attributes
        are set for this micro-batch here.
        """
        count = check_positive_int(samples, "samples", what=" (the micro-batch's global size)")
        if self._step_on_clock:  # the last step was counted but not ended: end it now
            self.end_step()
        self._ended_by_hook = False
        self._step_samples += count
        for center in self._centers:
            center.micro_batch(count)
        if self._attributes:
            assert self._base is not None  # momentum_attributes need base_batch_size
            for attribute in self._attributes:
                attribute.scale_for(count / self._base)

    @property
    def samples_pending(self) -> int:
        """Samples counted into the optimizer step under way (not yet on the clock)."""
        return 0 if self._step_on_clock else self._step_samples

    def _step_kappa(self, resolve: bool = True) -> float:
        """The step's kappa; with ``resolve``, an unset base batch becomes this step's (a refusal resolves none)."""
        if self._step_samples == 0:
            raise RuntimeError(
                "No samples were counted for this optimizer step: call `count_samples(n)` with every micro-batch's"
                " global size before `optimizer.step()` (or before `end_step()`)"
            )
        if self._base is None and resolve:
            self._base = self._step_samples
        return self._step_samples / (self._base or self._step_samples)

    def _before_optimizer_step(self, optimizer: Optimizer, *_: Any) -> None:
        if self._step_samples == 0 and _initializes_state(optimizer):
            self._state_init_step = optimizer  # no training step: nothing to scale or count
            return
        if self.wait_before_step:
            self.averager.join()  # the step writes the weights the last update may still be reading
        self._steps.restore()  # a step that raised last time never reached its post-hook
        if self.is_swapped:
            raise RuntimeError(
                "optimizer.step() while the EMA weights are swapped into the module: the step would train the EMA"
                " and be lost at swap_out(). Call swap_out() (or leave the swapped() block) before training"
            )
        if not self._step_on_clock:  # the step's first optimizer (another one of it found it counted)
            self._step_momentum_checked()  # a schedule that fails raises now, before the step moves the weights
        self._steps.scale(optimizer, self._step_kappa())

    def _after_optimizer_step(self, optimizer: Optimizer, *_: Any) -> None:
        if self._state_init_step is optimizer:
            self._state_init_step = None
            return
        self._steps.restore()
        self._count_step_on_clock()  # before a SampleClockLR stepped next reads the clock
        if self._auto_end_step:
            self.end_step()
            self._ended_by_hook = True

    def _count_step_on_clock(self) -> None:
        """Count the step on the sample clock, once, with rho-hat from the clock before it."""
        if self._step_on_clock:
            return
        kappa = self._step_kappa()
        self._step_momentum = self._step_momentum_checked()
        self._kappa, self._step_batch = kappa, self._step_samples
        self._samples_seen += self._step_samples
        self._optimizer_steps += 1
        self._step_on_clock = True

    def _step_momentum_checked(self) -> float:
        """The momentum of the step under way (from the clock before it and its samples), computed and checked
        once per step: before the optimizer moves the weights, where a hook sees the step."""
        key = (self._samples_seen, self._step_samples, self._base)
        if self._momentum_key == key:
            return self._momentum_of_key
        kappa = self._step_kappa(resolve=False)  # resolved by the step, not by a refusal
        after = self._samples_seen + self._step_samples
        momentum = self.averager.momentum_between(self._samples_seen, after)  # a mode with its own decay
        if momentum is None:
            momentum = self.momentum_at(self.progress) if self.options.schedule_uses_progress else self.options.momentum
            assert momentum is not None
            base = self._base or self._step_samples  # this step's, where the step resolves it
            momentum = self.options.shaped_momentum(momentum, self._samples_seen, base)
            momentum = scale_ema_momentum(momentum, kappa)
        self._momentum_key, self._momentum_of_key = key, momentum
        return momentum

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
        for center in self._centers:  # one update per optimizer step, with the mean of its micro-batches
            center.end_step(self._kappa)
        self._step_samples = 0
        self._step_on_clock = False
        self._decay_since_update *= self._step_momentum
        if self._optimizer_steps % self.options.update_every == 0:
            self.layout.reshard_fsdp1()  # a module left gathered would hand the update its gathered views
            finite = self._weights_finite()
            decay = self._debiased(self._decay_since_update) if self.options.debias else self._decay_since_update
            self.averager.update(Update(decay, self._samples_seen), finite)
            if self.averager.writes_module:
                self.reshard()  # a teacher left gathered must gather its moved shards again
            self._ema_updates += 1
            self._last_update_decay = decay
            self._decay_since_update = 1.0
        if self.options.switch_every_samples is not None:
            due = (self._samples_seen - self._step_batch) // self.options.switch_every_samples
            if due > self._switches:  # the step started at or past a multiple not switched for yet
                self._write_into_module(self.options.switch_momentum, "the switch due (`switch_every_samples`)")
                self._switches = due  # only once written: a refused switch is made at the next step

    def refuse_writes_under_deepspeed(self, what: str) -> None:
        """Raise ``RuntimeError`` under DeepSpeed for ``what`` (an option or call) that writes the EMA into the
        model: the optimizer's fp32 masters would not follow (an adapter checks its own options with it early)."""
        if self.layout.deepspeed_engine is not None:
            raise RuntimeError(
                f"{what} is not supported under DeepSpeed: its optimizer keeps fp32 master weights that writing the"
                " EMA into the model would not reach, so the next `engine.step()` would overwrite it. Save a"
                " checkpoint, consolidate it (`lightning_emascale.consolidate_deepspeed_checkpoint`, whose"
                " `state_dict` is the EMA) and load that instead"
            )

    def _debiased(self, decay: float) -> float:
        """The momentum that makes this EMA equal a zero-initialised one divided by its total weight: with
        :math:`w` the weight of the samples in the average (0 before the first update),
        :math:`w' = \\rho w + 1 - \\rho` and the update applies :math:`\\rho w / w'`."""
        weight = decay * self._debias_weight + (1.0 - decay)
        applied = decay * self._debias_weight / weight if weight > 0.0 else 1.0  # nothing averaged yet: keep
        self._debias_weight = weight
        return applied

    def copy_to(self) -> None:
        """Write the EMA into the module's weights for good (Polyak mode): the training weights are replaced.

        Training may go on from them ("switch EMA" does this every ``switch_every_samples``). Under DeepSpeed the
        optimizer's fp32 master weights would not follow: consolidate the checkpoint and load it instead."""
        self._write_into_module(0.0, "copy_to()")

    def _write_into_module(self, keep: float, what: str) -> None:
        if not self.averager.swappable:
            raise self.averager.no_copy()
        if self.is_swapped:
            raise RuntimeError(
                f"{what} writes the EMA into the model, which holds the EMA now (swapped in): call swap_out() first"
            )
        self.refuse_writes_under_deepspeed(what)
        self.averager.join()
        self.reshard()  # a module left gathered by a no-grad forward would keep its gathered copy
        self.averager.write_into_module(keep)
        self.reshard()

    def wait(self) -> None:
        """Make the current CUDA stream wait for the EMA update under way (``side_stream``; queued on the
        device, no host sync). The next optimizer step, swaps and checkpoints do it themselves: call it before
        writing or freeing the module's weights any other way (weight clipping right after the step)."""
        self.averager.join()

    def _weights_finite(self) -> Optional[Tensor]:
        """With ``skip_non_finite``: a 0-d bool tensor, whether the weights the update reads are finite (on every
        rank of a sharded module); the skipped count grows on the device where they are not. ``None`` otherwise."""
        if not self.options.skip_non_finite:
            return None
        finite = self.layout.agree(self.averager.finite())
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
        again for the samples of the snapshot written last, nor before the first update; a snapshot due after a
        resume replaces the file an abandoned attempt of the same run left under its name.
        """
        return self.averager.save_snapshot()

    def check_snapshot_dir(self) -> None:
        """Post-hoc EMA: raise ``ValueError`` if ``snapshot_dir`` holds another run's snapshots (done before the
        first step anyway). Only rank 0 reads the directory: in a DDP loop of your own, call it before training and
        share the outcome with the other ranks, so that they do not wait for rank 0 in a collective."""
        self.averager.check_directory()

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
        """:math:`\\kappa` of the latest optimizer step (``nan`` before the first step this object counted, also
        right after :meth:`load_state_dict`: a step's :math:`\\kappa` is not saved)."""
        return self._kappa

    @property
    def ema_momentum(self) -> float:
        """:math:`\\hat\\rho` of the latest optimizer step, per step (``nan`` before the first step this object
        counted). With ``update_every`` = T an update applies the product of its T steps' values:
        :attr:`momentum_per_update`."""
        return self._step_momentum

    @property
    def momentum_per_update(self) -> float:
        """The momentum the latest EMA update applied; the product of :attr:`ema_momentum` over the steps since
        the update before (equal to it with ``update_every=1``; ``nan`` before the first update this object made).
        """
        return self._last_update_decay

    @property
    def global_batch_size(self) -> int:
        """The global batch of the latest optimizer step (0 before the first)."""
        return self._step_batch

    @property
    def step_lrs(self) -> list[list[float]]:
        """The learning rate each param group of each optimizer used in its latest step (after the rule)."""
        return [list(lrs) for lrs in self._steps.step_lrs]

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
            if as_int(total) is None or not 1 <= total <= MAX_COUNT:
                raise ValueError(
                    f"`total_samples_from` must return a positive integer up to {MAX_COUNT} (the run's training"
                    f" samples), got {show(total)}"
                )
            return int(total)
        raise ValueError(
            "`total_samples` is not set: pass `total_samples=`, the training samples (global, all ranks) the run"
            " will see; progress, a momentum schedule and SampleClockLR need it"
        )

    @property
    def progress(self) -> float:
        """Training progress on the sample clock; :attr:`samples_seen` / :attr:`resolved_total_samples`."""
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
        r"""What the latest step did, for a logger: ``<prefix>/kappa``, ``/momentum`` (:math:`\hat\rho` of the
        step), with ``update_every`` > 1 ``/momentum_per_update`` (what the latest update applied:
        :attr:`momentum_per_update`), ``/half_life`` (:attr:`half_life`, in samples), ``/batch_size`` (global),
        ``/samples_seen``,
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
            **({f"{prefix}/momentum_per_update": self._last_update_decay} if self.options.update_every > 1 else {}),
            f"{prefix}/half_life": self.half_life,
            f"{prefix}/batch_size": float(self._step_batch),
            f"{prefix}/samples_seen": float(self._samples_seen),
        }
        metrics.update(self._steps.lr_metrics(prefix))
        metrics.update({f"{prefix}/{path}": value for path, value in self.momentum_attribute_values().items()})
        if self.options.skip_non_finite:
            metrics[f"{prefix}/skipped_updates"] = float(self.skipped_updates)
        return metrics

    @property
    def half_life(self) -> float:
        r"""The EMA's half-life in samples at the latest step; the samples after which a weight's share of the
        average has halved, :math:`b \ln\frac12 / \ln\hat\rho` for a global batch :math:`b` (``inf`` at
        :math:`\hat\rho = 1`, ``nan`` before the first step). The same at every batch size under the rule, and
        readable where :math:`\hat\rho` rounds to 1.000."""
        if math.isnan(self._step_momentum) or self._step_batch == 0:
            return math.nan
        return half_life_from_momentum(self._step_momentum, self._step_batch)

    # ------------------------------------------------------------------------------------ the EMA weights
    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA of every tracked parameter and buffer, by the module's names (EMA dtype, live tensors)."""
        return self.averager.averages_by_name()

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The training values of every tracked tensor, by name, also while the EMA is swapped in."""
        if self.averager.swappable and not self.is_swapped:
            self.layout.reshard_fsdp1()  # FSDP1: the shards, not a gathered copy
        return self.averager.raw_by_name()

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
        if not self.averager.swappable:
            raise self.averager.no_copy()
        self.reshard()  # a module left gathered by a no-grad forward would keep its gathered copy
        self.averager.swap_in()

    def swap_out(self) -> None:
        """Restore the training weights exactly after :meth:`swap_in`; nothing to do if they are in place."""
        if not self.averager.swappable:
            raise self.averager.no_copy()
        if self.averager.is_swapped:
            self.reshard()  # the evaluation's gathered copies hold the EMA
        self.averager.swap_out()

    def reshard(self) -> None:
        """Sharded module: put every FSDP module left gathered (by a no-grad forward) back on its shard, so that
        the EMA reads and writes the shards and the next forward gathers what it wrote. Nothing to do otherwise."""
        self.layout.reshard()

    @property
    def is_swapped(self) -> bool:
        """Whether the module holds the EMA weights now (between :meth:`swap_in` and :meth:`swap_out`)."""
        return self.averager.is_swapped

    def mark_seen(self) -> None:
        """Remember the module's tensors as they are now: :meth:`changed_since_seen` compares against them (an
        adapter calls it when fit ends, and where the module's tensors were rewritten with the same values)."""
        self.averager.mark_seen()

    def changed_since_seen(self) -> list[str]:
        """The names of the module's tracked tensors written by anything but this EMA since :meth:`mark_seen` (weights
        loaded by hand, which make the EMA stale); always empty in teacher and post-hoc mode."""
        return self.averager.changed_since_seen()

    def functional_call(self, module: torch.nn.Module, args: Any, kwargs: Optional[dict[str, Any]] = None) -> Any:
        """Run ``module`` on the EMA weights without touching its own (:func:`torch.func.functional_call`)."""
        if not self.averager.swappable:
            raise self.averager.no_copy()
        if self.is_sharded:
            raise NotImplementedError(
                "functional_call is not supported for a sharded module: FSDP2 and DeepSpeed ZeRO-3 gather the"
                " parameters they hold, not the ones functional_call substitutes. Evaluate inside"
                " `with ema.swapped():` instead."
            )
        if unwrap_module(module) is not self.module:
            raise ValueError(
                f"`module` must be the module this EMA averages (the {type(self.module).__name__} it was built"
                f" with), got another {type(module).__name__}"
            )
        return torch.func.functional_call(module, self.averager.weights_by_name(), args, kwargs)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The clock and the averager's own entries (Polyak: the EMA tensors, live): everything needed to resume
        exactly."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "base_batch_size": self._base,
            "samples_seen": self._samples_seen,
            "optimizer_steps": self._optimizer_steps,
            "ema_updates": self._ema_updates,
            "pending_decay": self._decay_since_update,
        }
        if self.options.skip_non_finite:
            state["skipped_updates"] = self.skipped_updates
        if self.options.debias:
            state["debias_weight"] = self._debias_weight
        if self.options.switch_every_samples is not None:
            state["switches"] = self._switches
            state["switch_every_samples"] = self.options.switch_every_samples
        state.update(self.averager.state_dict())
        return state

    @staticmethod
    def check_state_dict(state: Mapping[str, Any], where: str = "The saved ScaledEMA state") -> None:
        """Raise unless ``state`` is a :meth:`state_dict` of this version (in any mode), with a message that
        starts with ``where``; nothing is loaded."""
        check_state(state, where)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. A ``base_batch_size`` given now wins over the saved one."""
        check_state(state, "The saved ScaledEMA state")
        check_mode(state, self.averager.state_key, self.averager.describe(), "The saved ScaledEMA state")
        check_clock_options(state, self.options, "The saved ScaledEMA state")
        self.averager.load_state_dict(state)  # checks every tensor before the first copy
        self._steps.restore()
        self._reset_clock()
        if self._base is None and state["base_batch_size"] is not None:  # the saved base keeps the horizon
            self._base = int(state["base_batch_size"])
        self._samples_seen = int(state["samples_seen"])
        self._optimizer_steps = int(state["optimizer_steps"])
        self._ema_updates = int(state["ema_updates"])
        self._decay_since_update = float(state["pending_decay"])
        self._skipped = torch.tensor(int(state.get("skipped_updates", 0)), device=self._skipped.device)
        self._debias_weight = float(state.get("debias_weight", 0.0))
        self._switches = int(state.get("switches", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.averager.describe()}, base_batch_size={self._base},"
            f" rule={self.options.rule!r}, samples_seen={self._samples_seen}, optimizer_steps={self._optimizer_steps})"
        )


def _initializes_state(optimizer: Optimizer) -> bool:
    """Whether a step is the one ``torch.distributed.checkpoint`` takes to create an optimizer's state before
    loading it (no state yet, every learning rate set to 0), not a training step."""
    groups = optimizer.param_groups
    return not optimizer.state and bool(groups) and all(float(group.get("lr", 1.0)) == 0.0 for group in groups)
