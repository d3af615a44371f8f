"""The options of a scaled EMA that are not framework wiring, checked once. No torch.nn state, no Lightning."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from lightning_emascale._checks import (
    as_real,
    as_str,
    check_bool,
    check_choice,
    check_count,
    check_directory,
    check_momentum,
    check_names,
    check_paths,
    check_positive,
    check_positive_int,
    show,
)
from lightning_emascale._flat_group import EMAPrecision
from lightning_emascale._warnings import caller_level
from lightning_emascale.functional import inverse_power_warmup, warmup_momentum
from lightning_emascale.post_hoc_math import check_sigma_rel
from lightning_emascale.rules import OptimizerRule, RuleLike, resolve_rule
from lightning_emascale.schedules import cosine_schedule

#: ``"constant"``, ``"cosine"`` (from ``momentum`` to ``final_momentum``) or a callable of progress in [0, 1].
MomentumSchedule = Union[Literal["constant", "cosine"], Callable[[float], float]]
#: ``False``, ``True`` (= ``"ratio"``: :math:`(1 + t)/(10 + t)`) or ``"inverse-power"``
#: (:math:`1 - (1 + t/\gamma)^{-p}`).
Warmup = Union[bool, Literal["ratio", "inverse-power"]]
WARMUPS = ("ratio", "inverse-power")
DEFAULT_MOMENTUM = 0.999
DEFAULT_WARMUP_GAMMA = 1.0
DEFAULT_WARMUP_POWER = 2.0 / 3.0
FLAT_PARAMETERS_DEPRECATED = (
    "`flat_parameters=True` is deprecated and will be removed in the next release: it made no whole training step"
    " faster (ResNet-50 on a 2-core CPU: +1.7 ms, -4.4 to +7.2, per 400 ms step; ViT-B on an H200: 28.6 ms against"
    " 24.6 ms for the default), and the default update keeps its cost near one flat lerp. Drop the argument."
)


@dataclass(frozen=True, eq=False)
class EMAOptions:
    """Every option of :class:`~lightning_emascale.ScaledEMA`, validated on construction (see its docstring).

    ``momentum=None`` means 0.999 for the named schedules; a callable ``momentum_schedule`` gives the momentum
    itself, so it takes neither ``momentum`` nor ``final_momentum``.
    """

    momentum: Optional[float] = None
    base_batch_size: Optional[int] = None
    optimizer_rule: RuleLike = None
    update_every: int = 1
    warmup: Warmup = False
    warmup_gamma: Optional[float] = None
    warmup_power: Optional[float] = None
    min_momentum: Optional[float] = None
    start_after_samples: Optional[int] = None
    debias: bool = False
    switch_every_samples: Optional[int] = None
    switch_momentum: float = 0.0
    ema_precision: EMAPrecision = "fp32"
    momentum_schedule: MomentumSchedule = "constant"
    final_momentum: Optional[float] = None
    total_samples: Optional[int] = None
    teachers: Optional[Mapping[str, str]] = None
    momentum_attributes: Optional[Mapping[str, float]] = None
    center_momenta: Optional[Mapping[str, float]] = None
    sigma_rels: Optional[Sequence[float]] = None
    snapshot_every_samples: Optional[int] = None
    snapshot_dir: Optional[Union[str, os.PathLike]] = None
    include: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    skip_non_finite: bool = False
    freeze_teachers: bool = False
    flat_parameters: bool = False
    offload: bool = False
    side_stream: bool = True
    copy_on_swap: bool = False

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        schedule = self.momentum_schedule
        if self.sigma_rels is not None:  # a post-hoc EMA has no momentum: nothing of the schedule below applies
            store("sigma_rels", _check_sigma_rels(self.sigma_rels))
            every = check_positive_int(self.snapshot_every_samples, "snapshot_every_samples")
            store("snapshot_every_samples", every)
            store("snapshot_dir", check_directory(self.snapshot_dir, "snapshot_dir"))
        elif self.snapshot_every_samples is not None or self.snapshot_dir is not None:
            raise ValueError("`snapshot_every_samples` and `snapshot_dir` belong to a post-hoc EMA: give `sigma_rels`")
        elif callable(schedule):
            for name in ("momentum", "final_momentum"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}`={getattr(self, name)!r} has no effect with a callable `momentum_schedule`, which"
                        f" gives the momentum at every progress: drop `{name}`"
                    )
            for progress in (0.0, 1.0):  # fail now, not at the first step
                try:
                    value = schedule(progress)
                except TypeError as error:
                    raise TypeError(
                        f"`momentum_schedule` must be a callable of one argument, progress in [0, 1], that returns"
                        f" the momentum; calling {schedule!r}({progress}) raised: {error}"
                    ) from error
                check_momentum(value, f"momentum_schedule({progress})", allow_one=True)
        else:
            if not isinstance(schedule, str) or schedule not in ("constant", "cosine"):
                raise ValueError(
                    "`momentum_schedule` must be one of ['constant', 'cosine'] or a callable of progress in [0, 1],"
                    f" got {schedule!r}"
                )
            store("momentum", check_momentum(DEFAULT_MOMENTUM if self.momentum is None else self.momentum))
            if schedule == "cosine" and self.final_momentum is None:
                raise ValueError(
                    "`momentum_schedule='cosine'` needs `final_momentum` (the value it ends at, BYOL: 1.0)"
                )
            if schedule == "constant" and self.final_momentum is not None:
                raise ValueError(
                    f"`final_momentum`={self.final_momentum!r} has no effect with `momentum_schedule='constant'`:"
                    " set `momentum_schedule='cosine'` or drop `final_momentum`"
                )
            if self.final_momentum is not None:
                store("final_momentum", check_momentum(self.final_momentum, "final_momentum", allow_one=True))
        store("base_batch_size", check_positive_int(self.base_batch_size, "base_batch_size", allow_none=True))
        store("optimizer_rule", resolve_rule(self.optimizer_rule))
        store("update_every", check_positive_int(self.update_every, "update_every"))
        store("warmup", _check_warmup(self.warmup))
        self._check_warmup_shape(store)
        store("start_after_samples", check_count(self.start_after_samples, "start_after_samples", allow_none=True))
        store("debias", check_bool(self.debias, "debias"))
        every = check_positive_int(self.switch_every_samples, "switch_every_samples", allow_none=True)
        store("switch_every_samples", every)
        store("switch_momentum", check_momentum(self.switch_momentum, "switch_momentum"))
        if self.switch_every_samples is None and self.switch_momentum != 0.0:
            raise ValueError(
                f"`switch_momentum`={self.switch_momentum!r} has no effect without `switch_every_samples` (how often"
                " the EMA is written into the model): set it or drop `switch_momentum`"
            )
        check_choice(self.ema_precision, "ema_precision", ("fp32", "model"))
        store("total_samples", check_positive_int(self.total_samples, "total_samples", allow_none=True))
        store("teachers", check_paths(self.teachers, "teachers", as_str, "strings"))
        numbers = check_paths(self.momentum_attributes, "momentum_attributes", _real_as_given, "numbers") or {}
        scaled = {path: check_momentum(value, f"momentum_attributes[{path!r}]") for path, value in numbers.items()}
        store("momentum_attributes", scaled or None)
        centers = check_paths(self.center_momenta, "center_momenta", _real_as_given, "numbers") or {}
        checked = {path: check_momentum(value, f"center_momenta[{path!r}]") for path, value in centers.items()}
        store("center_momenta", checked or None)  # None when not given: `dataclasses.replace` checks it again
        shared = sorted(set(numbers) & set(centers))
        if shared:
            raise ValueError(
                f"{shared} are in both `momentum_attributes` and `center_momenta`: a centre is either scaled per"
                " micro-batch (`momentum_attributes`) or updated once per step (`center_momenta`), not both"
            )
        store("include", check_names(self.include, "include"))
        store("exclude", check_names(self.exclude, "exclude"))
        for name in ("skip_non_finite", "freeze_teachers", "flat_parameters", "offload", "side_stream", "copy_on_swap"):
            store(name, check_bool(getattr(self, name), name))
        if self.flat_parameters:
            warnings.warn(FLAT_PARAMETERS_DEPRECATED, FutureWarning, stacklevel=caller_level())

    def _check_warmup_shape(self, store: Callable[[str, Any], None]) -> None:
        """``warmup_gamma``, ``warmup_power`` (the inverse-power warm-up's only) and ``min_momentum``."""
        for name, default in (("warmup_gamma", DEFAULT_WARMUP_GAMMA), ("warmup_power", DEFAULT_WARMUP_POWER)):
            value = getattr(self, name)
            if value is not None and self.warmup != "inverse-power":
                raise ValueError(
                    f"`{name}`={value!r} shapes the inverse-power warm-up, 1 - (1 + t/warmup_gamma)^-warmup_power:"
                    f" set `warmup='inverse-power'` or drop `{name}` (warmup={self.warmup!r})"
                )
            if self.warmup == "inverse-power":
                store(name, default if value is None else check_positive(value, name))
        if self.min_momentum is None:
            return
        floor = check_momentum(self.min_momentum, "min_momentum")
        store("min_momentum", floor)
        if self.momentum_schedule == "constant" and self.momentum is not None and floor > self.momentum:
            raise ValueError(
                f"`min_momentum`={floor!r} is above `momentum`={self.momentum!r}, so the momentum would be"
                f" {floor!r} at every step: `min_momentum` must be at most `momentum`"
            )

    def check_include(self) -> None:
        """Raise for an empty ``include`` (a mode may ask before its own checks, as ``_teacher`` does)."""
        if self.include == ():
            raise ValueError("`include` is empty, which averages nothing: list what to average, or pass None for all")

    def check_combinations(self) -> None:
        """The checks of options that need others, run after the mode's own (``_modes.check``)."""
        self.check_include()
        if self.freeze_teachers and not self.teachers:
            raise ValueError("`freeze_teachers=True` freezes the teachers of teacher mode: give `teachers` too")
        if self.momentum_attributes and self.base_batch_size is None:
            raise ValueError(
                "`momentum_attributes` are scaled per micro-batch from its first forward on, so they need"
                " `base_batch_size` (the global batch size their momenta were tuned at)"
            )
        if self.center_momenta and self.base_batch_size is None:
            raise ValueError(
                "`center_momenta` are scaled by the step's global batch over `base_batch_size`: give"
                " `base_batch_size` (the global batch size their momenta were tuned at)"
            )
        if self.debias and self.skip_non_finite:
            raise ValueError(
                "`debias=True` with `skip_non_finite=True`: a skipped update is decided on the device with no host"
                " sync, and the debiasing weight is kept on the host, so it would count the skipped update. Use one"
                " of them"
            )
        if self.switch_every_samples is not None and self.mode != "polyak":
            raise ValueError(
                f"`switch_every_samples`={self.switch_every_samples!r} writes the one averaged copy of a Polyak EMA"
                f" into the model, and {'teacher mode' if self.mode == 'teacher' else 'a post-hoc EMA'} keeps none:"
                " drop it"
            )

    @property
    def mode(self) -> str:
        """``"post_hoc"`` (``sigma_rels``), ``"teacher"`` (``teachers``) or ``"polyak"``."""
        return "post_hoc" if self.sigma_rels is not None else "teacher" if self.teachers else "polyak"

    @property
    def rule(self) -> OptimizerRule:
        """The resolved optimizer rule."""
        assert isinstance(self.optimizer_rule, OptimizerRule)
        return self.optimizer_rule

    @property
    def schedule_uses_progress(self) -> bool:
        """Whether the momentum depends on training progress (so the run's total samples must be known)."""
        return self.sigma_rels is None and self.momentum_schedule != "constant"

    def shaped_momentum(self, momentum: float, samples_before: int, base: int) -> float:
        r"""The momentum at the base batch size of a step that starts ``samples_before`` samples into training,
        from the scheduled ``momentum``: 0 (the EMA copies the weights) until ``start_after_samples``, then the
        warm-up, then the floor ``min_momentum``. Raise it to :math:`\kappa` afterwards.

        :math:`t` counts base batches from the start: ``(samples_before - start_after_samples) / base``, or
        ``samples_before / base`` without a start. The warm-ups: ``"ratio"`` :math:`\min(\rho, (1 + t)/(10 + t))`,
        ``"inverse-power"`` :math:`\min(\rho, 1 - (1 + t/\gamma)^{-p})`.
        """
        start = self.start_after_samples
        if start is not None and samples_before <= start:
            return 0.0
        steps = (samples_before - (start or 0)) / base
        if self.warmup == "inverse-power":
            assert self.warmup_gamma is not None and self.warmup_power is not None
            momentum = min(momentum, inverse_power_warmup(steps, self.warmup_gamma, self.warmup_power))
        elif self.warmup:
            momentum = warmup_momentum(momentum, base_steps=steps)
        if self.min_momentum is not None:
            momentum = max(momentum, self.min_momentum)
        return momentum

    def momentum_at(self, progress: float) -> float:
        """The momentum at the base batch size at ``progress``, before warm-up and :math:`\\kappa`."""
        schedule = self.momentum_schedule
        if callable(schedule):
            return check_momentum(schedule(progress), f"momentum_schedule({progress})", allow_one=True)
        assert self.momentum is not None
        if schedule == "constant":
            return self.momentum
        assert self.final_momentum is not None
        return cosine_schedule(progress, start=self.momentum, end=self.final_momentum)


def _check_warmup(value: Any) -> Warmup:
    if isinstance(value, bool) or value in WARMUPS:
        return value
    raise ValueError(f"`warmup` must be True, False or one of {list(WARMUPS)}, got {show(value)}")


def _check_sigma_rels(value: Any) -> tuple[float, ...]:
    values = getattr(value, "tolist", lambda: value)()  # a numpy array or tensor too
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"`sigma_rels` must be a non-empty sequence of numbers, got {value!r}")
    checked = tuple(check_sigma_rel(item) for item in values)
    if len(set(checked)) != len(checked):
        raise ValueError(f"`sigma_rels` must be distinct, got {list(checked)}")
    return checked


def _real_as_given(value: Any) -> Any:
    """``value`` itself if it is a real number (so that a message shows it as given: ``10**400``, not ``inf``)."""
    return value if as_real(value) is not None else None


def _option(name: str) -> property:
    return property(lambda self: getattr(self._options, name), doc=f"The ``{name}`` option (read only).")


class OptionsView:
    """The options of an adapter that holds an :class:`EMAOptions` in ``_options``, as read-only attributes."""

    _options: EMAOptions
    momentum = _option("momentum")
    base_batch_size = _option("base_batch_size")
    optimizer_rule = _option("optimizer_rule")
    update_every = _option("update_every")
    warmup = _option("warmup")
    warmup_gamma = _option("warmup_gamma")
    warmup_power = _option("warmup_power")
    min_momentum = _option("min_momentum")
    start_after_samples = _option("start_after_samples")
    debias = _option("debias")
    switch_every_samples = _option("switch_every_samples")
    switch_momentum = _option("switch_momentum")
    ema_precision = _option("ema_precision")
    momentum_schedule = _option("momentum_schedule")
    final_momentum = _option("final_momentum")
    total_samples = _option("total_samples")
    teachers = _option("teachers")
    momentum_attributes = _option("momentum_attributes")
    center_momenta = _option("center_momenta")
    include = _option("include")
    exclude = _option("exclude")
    skip_non_finite = _option("skip_non_finite")
    freeze_teachers = _option("freeze_teachers")
    flat_parameters = _option("flat_parameters")
    offload = _option("offload")
    side_stream = _option("side_stream")
    copy_on_swap = _option("copy_on_swap")
