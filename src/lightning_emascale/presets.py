r"""Presets: the options of :class:`~lightning_emascale.ScaledEMA` that reproduce another EMA tool's configuration.

Each preset takes the tool's own constructor arguments, under the tool's names and with its defaults, and returns
this library's options, on the sample clock: at the base batch size (κ = 1) the EMA equals the tool's where the
tool updates at every step (``tests/unit/test_presets.py`` and ``tests/lightning/test_presets_in_the_trainer.py``
run each tool, or its documented formula, beside ours), and at any other batch size it keeps the tool's horizon in
samples, which none of them does. A tool that updates every n > 1 steps (ema-pytorch's default ``update_every=10``,
Lightning's ``update_every_n_steps``, composer's ``update_interval``) is mapped to ``update_every=n`` with the same
horizon, updating at other steps: not equal. The tool's arguments keep the tool's meaning where a name is also this
library's (ema-pytorch's ``update_every``). ``ScaledEMA.from_preset`` and
``EMAScalingCallback.from_preset`` build an EMA from a preset in one line. Pure Python, no torch.

The tools, and what their steps become here (:math:`B` the base batch size):

- ``"timm"``, ``ModelEmaV3`` with ``ema.update(model, step=...)`` after the k-th optimizer step, as timm's
  ``train.py`` does: ``decay``, ``min_decay``, ``update_after_step`` (× B samples), ``use_warmup`` with
  ``warmup_gamma``/``warmup_power``;
- ``"ema_pytorch"``, ``EMA``: ``beta``, ``update_after_step``, ``update_every``, ``inv_gamma``, ``power``,
  ``min_value``, ``update_model_with_ema_every``/``update_model_with_ema_beta`` (switch EMA),
  ``param_or_buffer_names_no_ema``;
- ``"diffusers"``, ``EMAModel``: ``decay``, ``min_decay``, ``update_after_step``, ``use_ema_warmup``,
  ``inv_gamma``, ``power`` (its default warm-up, :math:`(1 + t)/(10 + t)`, included);
- ``"lightning"``, ``EMAWeightAveraging``: ``decay``, ``update_every_n_steps``, ``update_starting_at_step``;
- ``"lightly"``, ``update_momentum`` with ``cosine_schedule(step, max_steps, start_value, end_value)`` in
  ``training_step``: ``start_value``, ``end_value``, ``max_steps`` (and this library's ``teachers``);
- ``"composer"``, ``EMA``: ``half_life`` or ``smoothing``, ``ema_start``, ``update_interval`` (batches ``"ba"``
  or samples ``"sam"``; ``"dur"`` for ``ema_start``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from lightning_emascale._checks import (
    as_real,
    check_count,
    check_fraction,
    check_momentum,
    check_positive,
    check_positive_int,
    show,
)

__all__ = ["PRESETS", "LightlyCosine", "preset_options"]


def preset_options(tool: str, base_batch_size: int, total_samples: Optional[int] = None, **arguments: Any) -> dict:
    """The options of :class:`~lightning_emascale.ScaledEMA` (and of the callback) that reproduce ``tool``'s EMA
    built with ``arguments``, its own constructor arguments under its own names (its defaults for the others).

    Args:
        tool: one of :data:`PRESETS`: ``"timm"``, ``"ema_pytorch"``, ``"diffusers"``, ``"lightning"``,
            ``"lightly"``, ``"composer"``.
        base_batch_size: the global batch the tool's configuration was tuned at; its steps become samples at it.
        total_samples: the run's training samples (global); needed by ``"lightly"``'s schedule and by
            ``"composer"``'s ``ema_start`` in ``"dur"``.
        **arguments: the tool's constructor arguments.

    Returns:
        A dict of options, with ``base_batch_size`` (and ``total_samples`` where given).

    Example:
        >>> preset_options("timm", base_batch_size=256, decay=0.9998, use_warmup=True)  # doctest: +NORMALIZE_WHITESPACE
        {'momentum': 0.9998, 'start_after_samples': 0, 'warmup': 'inverse-power', 'warmup_gamma': 1.0,
         'warmup_power': 0.6666666666666666, 'base_batch_size': 256}
    """
    if not isinstance(tool, str) or tool not in PRESETS:
        raise ValueError(f"`tool` must be one of {sorted(PRESETS)}, got {show(tool)}")
    base = check_positive_int(base_batch_size, "base_batch_size", what=" (the global batch the tool was tuned at)")
    total = check_positive_int(total_samples, "total_samples", allow_none=True)
    preset = PRESETS[tool]
    accepted = tool_arguments(tool)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(
            f"The {tool!r} preset takes {tool}'s arguments {sorted(accepted)}, got {unknown}; this library's own"
            " options go to `from_preset` beside them"
        )
    options = preset(base, total, **arguments)
    options["base_batch_size"] = base
    if total is not None:
        options["total_samples"] = total
    return options


def split_preset_arguments(
    tool: str, base_batch_size: int, total_samples: Optional[int], arguments: Mapping[str, Any]
) -> dict[str, Any]:
    """``from_preset``'s arguments as one set of options: the tool's own (by its names) through the preset, this
    library's as given; an option both set is refused."""
    if not isinstance(tool, str) or tool not in PRESETS:
        raise ValueError(f"`tool` must be one of {sorted(PRESETS)}, got {show(tool)}")
    names = tool_arguments(tool)
    options = preset_options(tool, base_batch_size, total_samples, **{k: v for k, v in arguments.items() if k in names})
    ours = {key: value for key, value in arguments.items() if key not in names}
    if "copy_at_end" in ours:  # not derived from the tool's arguments: the caller's choice wins
        options.pop("copy_at_end", None)
    clash = sorted(set(options) & set(ours))
    if clash:
        raise ValueError(
            f"{clash} are set by the {tool!r} preset from {tool}'s arguments: change those arguments instead, or"
            " build the EMA without the preset"
        )
    return {**options, **ours}


def tool_arguments(tool: str) -> tuple[str, ...]:
    """The names of the tool's arguments a preset takes (in the tool's order)."""
    parameters = list(inspect.signature(PRESETS[tool]).parameters)
    return tuple(parameters[2:])  # after base and total


def _start(steps: Any, base: int, name: str) -> int:
    """``update_after_step``-style steps as samples at the base batch size."""
    return check_count(steps, name) * base


def _timm(
    base: int, total: Optional[int], decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
    use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2.0 / 3.0,
    exclude_buffers: bool = False,
) -> dict:  # fmt: skip
    options: dict[str, Any] = {
        "momentum": check_momentum(decay, "decay"),
        "start_after_samples": _start(update_after_step, base, "update_after_step"),
    }
    if use_warmup:
        options.update(warmup="inverse-power", warmup_gamma=warmup_gamma, warmup_power=warmup_power)
    _floor(options, min_decay, "min_decay", applies=bool(use_warmup), tool="timm")
    _refuse_buffers_out(exclude_buffers, "exclude_buffers=True")
    return options


def _ema_pytorch(
    base: int, total: Optional[int], beta: float = 0.9999, update_after_step: int = 100, update_every: int = 10,
    inv_gamma: float = 1.0, power: float = 2.0 / 3.0, min_value: float = 0.0,
    param_or_buffer_names_no_ema: Any = (), update_model_with_ema_every: Optional[int] = None,
    update_model_with_ema_beta: float = 0.0,
) -> dict:  # fmt: skip
    every = check_positive_int(update_every, "update_every")
    per_step = 1.0 / every  # β applies once per `update_every` steps: per step, β ** (1 / update_every)
    momentum = check_momentum(beta, "beta", allow_one=True) ** per_step
    options: dict[str, Any] = {
        "momentum": momentum,
        "start_after_samples": _start(update_after_step, base, "update_after_step"),
        "warmup": "inverse-power",
        # d = 1 - (1 + t/γ)^-p once per U steps is d^(1/U) ≈ 1 - (1 + t/γ)^-p / U per step for large t, which is
        # 1 - (1 + t/γ')^-p with γ' = γ / U^(1/p) (exact at U = 1)
        "warmup_gamma": check_positive(inv_gamma, "inv_gamma") / every ** (1.0 / check_positive(power, "power")),
        "warmup_power": power,
    }
    if every > 1:
        options["update_every"] = every
    _floor(options, check_momentum(min_value, "min_value") ** per_step if min_value else 0.0, "min_value", True, "")
    names = list(param_or_buffer_names_no_ema or ())
    if names:
        options["exclude"] = names  # copied there, left out here: evaluation uses the training values either way
    if update_model_with_ema_every is not None:
        options["switch_every_samples"] = (
            check_positive_int(update_model_with_ema_every, "update_model_with_ema_every") * base
        )
        options["switch_momentum"] = check_momentum(update_model_with_ema_beta, "update_model_with_ema_beta")
    elif update_model_with_ema_beta != 0.0:
        raise ValueError(
            f"`update_model_with_ema_beta`={update_model_with_ema_beta!r} has no effect without"
            " `update_model_with_ema_every`"
        )
    return options


def _diffusers(
    base: int, total: Optional[int], decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
    use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2.0 / 3.0,
) -> dict:  # fmt: skip
    options: dict[str, Any] = {
        "momentum": check_momentum(decay, "decay"),
        "start_after_samples": _start(update_after_step, base, "update_after_step"),
        # without `use_ema_warmup`, diffusers warms up with (1 + t)/(10 + t)
        "warmup": "inverse-power" if use_ema_warmup else "ratio",
    }
    if use_ema_warmup:
        options.update(warmup_gamma=inv_gamma, warmup_power=power)
    _floor(options, min_decay, "min_decay", applies=True, tool="")
    return options


def _lightning(
    base: int, total: Optional[int], decay: float = 0.999, update_every_n_steps: int = 1,
    update_starting_at_step: Optional[int] = None, use_buffers: bool = True,
) -> dict:  # fmt: skip
    every = check_positive_int(update_every_n_steps, "update_every_n_steps")
    options: dict[str, Any] = {
        "momentum": check_momentum(decay, "decay") ** (1.0 / every),  # `decay` once per update: per step
        "start_after_samples": _start(update_starting_at_step or 0, base, "update_starting_at_step"),
        "copy_at_end": True,  # Lightning leaves the EMA in the model when training ends (the callback's option)
    }
    if every > 1:
        options["update_every"] = every
    _refuse_buffers_out(not use_buffers, "use_buffers=False")
    return options


@dataclass(frozen=True)
class LightlyCosine:
    """lightly's ``cosine_schedule(step, max_steps, start_value, end_value)`` on the sample clock, as lightly's
    examples call it: in ``training_step``, before the forward, with the steps taken so far. The update after the
    k-th step here is lightly's at step k, so the schedule is read one base batch ahead: ``step`` = progress ×
    ``max_steps`` + 1; lightly's half cosine spans ``max_steps - 1`` steps and holds ``end_value`` from there.
    Frozen and picklable (``ddp_spawn``, LightningCLI).

    Args:
        start_value: the momentum at step 0.
        end_value: the momentum from step ``max_steps - 1`` on.
        max_steps: lightly's total steps (the run's samples / the base batch size).

    Example:
        >>> schedule = LightlyCosine(0.99, 1.0, max_steps=10)
        >>> [round(schedule(p), 6) for p in (0.0, 0.4, 0.8)]
        [0.990302, 0.995868, 1.0]
    """

    start_value: float
    end_value: float
    max_steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_value", check_momentum(self.start_value, "start_value", allow_one=True))
        object.__setattr__(self, "end_value", check_momentum(self.end_value, "end_value", allow_one=True))
        object.__setattr__(self, "max_steps", check_positive_int(self.max_steps, "max_steps"))

    def __call__(self, progress: float) -> float:
        step = check_fraction(progress, "progress") * self.max_steps + 1.0
        if self.max_steps <= 1 or step >= self.max_steps - 1:
            return self.end_value  # lightly's own special cases
        weight = (math.cos(math.pi * step / (self.max_steps - 1)) + 1.0) / 2.0  # lightly's denominator
        return self.end_value - (self.end_value - self.start_value) * weight


def _lightly(
    base: int, total: Optional[int], start_value: float = 0.99, end_value: float = 1.0,
    max_steps: Optional[int] = None,
) -> dict:  # fmt: skip
    if start_value == end_value:
        return {"momentum": check_momentum(start_value, "start_value")}
    if max_steps is None:
        if total is None:
            raise ValueError(
                "The 'lightly' preset's cosine schedule needs `max_steps` (lightly's total steps) or `total_samples`"
            )
        max_steps = math.ceil(total / base)
    return {"momentum_schedule": LightlyCosine(start_value, end_value, max_steps)}


_COMPOSER_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ba|sam|dur|ep)\s*$")


def _composer_time(value: Any, name: str, units: tuple[str, ...]) -> tuple[float, str]:
    match = _COMPOSER_TIME.match(value) if isinstance(value, str) else None
    if match is None or match.group(2) not in units:
        raise ValueError(
            f"`{name}` must be a composer time string in {list(units)} (e.g. '1000ba'), got {show(value)}"
            + ("; epochs are not supported: give batches or samples" if match and match.group(2) == "ep" else "")
        )
    return float(match.group(1)), match.group(2)


def _composer(
    base: int, total: Optional[int], half_life: Optional[str] = "1000ba", smoothing: Optional[float] = None,
    ema_start: str = "0.0dur", update_interval: Optional[str] = None,
) -> dict:  # fmt: skip
    if (half_life is None) == (smoothing is None):
        raise ValueError("Give one of `half_life` and `smoothing` (composer's EMA takes exactly one)")
    interval, unit = _composer_time(update_interval or "1ba", "update_interval", ("ba",))
    every = check_positive_int(int(interval) if interval == int(interval) else interval, "update_interval")
    if smoothing is not None:
        per_step = check_momentum(smoothing, "smoothing") ** (1.0 / every)
    else:
        length, unit = _composer_time(half_life, "half_life", ("ba", "sam"))
        samples = check_positive(length, "half_life") * (base if unit == "ba" else 1)
        per_step = 0.5 ** (base / samples)
    start, start_unit = _composer_time(ema_start, "ema_start", ("ba", "sam", "dur"))
    if start_unit == "dur":
        if start > 0 and total is None:
            raise ValueError(f"`ema_start`={ema_start!r} is a fraction of the run: give `total_samples`")
        samples = check_fraction(start, "ema_start") * (total or 0)
    else:
        samples = start * (base if start_unit == "ba" else 1)
    # composer counts the batch before its BATCH_END event and starts at the first batch whose count reaches the
    # start: that batch copies the weights, the next ones average
    first = max(math.ceil(samples / base - 1e-9), 1)
    options: dict[str, Any] = {"momentum": per_step, "start_after_samples": (first - 1) * base}
    if every > 1:
        options["update_every"] = every
    return options


def _floor(options: dict, value: Any, name: str, applies: bool, tool: str) -> None:
    number = as_real(value)
    if number is None:
        raise ValueError(f"`{name}` must be a real number in [0, 1), got {show(value)}")
    if number and applies:
        options["min_momentum"] = check_momentum(number, name)
    elif number:
        raise ValueError(f"`{name}`={value!r} has no effect in {tool} without its warm-up: drop it")


def _refuse_buffers_out(refused: bool, given: str) -> None:
    if refused:
        raise ValueError(
            f"`{given}` keeps the buffers out of the average: here list them in `exclude=[...]` (evaluation then uses"
            " the training buffers, as the tool's copies hold)"
        )


#: Every tool a preset reproduces, and the function of its arguments.
PRESETS: Mapping[str, Callable[..., dict]] = {
    "timm": _timm,
    "ema_pytorch": _ema_pytorch,
    "diffusers": _diffusers,
    "lightning": _lightning,
    "lightly": _lightly,
    "composer": _composer,
}
