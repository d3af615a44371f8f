"""The layout of :meth:`ScaledEMA.state_dict` and its checks, applied before anything is loaded. Pure torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_emascale._averager import SAVED_MODES
from lightning_emascale._checks import MAX_COUNT, as_int, as_real, check_saved_state, show
from lightning_emascale._sharded import is_sharded, local_piece

#: The version of :meth:`ScaledEMA.state_dict`'s layout; a checkpoint of another version is refused.
STATE_FORMAT = 1
#: The clock's entries, in every mode; a mode adds its own (``"ema"``, ``"power_ema"``).
STATE_KEYS = ("format", "base_batch_size", "samples_seen", "optimizer_steps", "ema_updates", "pending_decay")


def check_state(state: Mapping[str, Any], where: str) -> None:
    """Raise unless ``state`` is a :meth:`ScaledEMA.state_dict` of this version; ``where`` starts the message."""
    check_saved_state(state, where, STATE_FORMAT, STATE_KEYS, hint=" (from `state_dict()`)")
    base = state["base_batch_size"]
    if base is not None and (as_int(base) is None or base < 1):
        raise ValueError(f"{where} has base_batch_size={base!r}; a positive integer or None is allowed")
    if base is not None and base > MAX_COUNT:
        raise ValueError(f"{where} has base_batch_size={show(base)}; at most {MAX_COUNT} is allowed")
    for key in ("samples_seen", "optimizer_steps", "ema_updates", "skipped_updates", "samples_at_update"):
        if key in state and (as_int(state[key]) is None or not 0 <= state[key] <= MAX_COUNT):
            raise ValueError(
                f"{where} has {key}={show(state[key])}; an integer >= 0 and at most {MAX_COUNT} is allowed"
            )
    steps, samples = state["optimizer_steps"], state["samples_seen"]
    if samples < steps or (steps == 0) != (samples == 0):
        raise ValueError(
            f"{where} has samples_seen={state['samples_seen']!r} with optimizer_steps={state['optimizer_steps']!r};"
            " every optimizer step counts at least one sample, and samples are counted only by steps"
        )
    if state["ema_updates"] > state["optimizer_steps"]:
        raise ValueError(
            f"{where} has ema_updates={state['ema_updates']!r} past optimizer_steps={state['optimizer_steps']!r};"
            " there is at most one update per step"
        )
    decay = as_real(state["pending_decay"])  # 0 during a delayed start, which copies the weights
    if decay is None or not 0.0 <= decay <= 1.0:
        raise ValueError(f"{where} has pending_decay={state['pending_decay']!r}; a number in [0, 1] is allowed")
    weight = state.get("debias_weight", 0.0)
    if as_real(weight) is None or not 0.0 <= weight <= 1.0:
        raise ValueError(f"{where} has debias_weight={show(weight)}; a number in [0, 1] is allowed")
    switches = state.get("switches", 0)
    if as_int(switches) is None or not 0 <= switches <= MAX_COUNT:
        raise ValueError(f"{where} has switches={show(switches)}; an integer >= 0 and at most {MAX_COUNT} is allowed")
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
            # NaN here; infinities where a parameter's average holds them (a buffer may be a mask: -inf is kept)
            if local.is_floating_point() and bool(torch.isnan(local).any()):
                raise ValueError(f"{where} has a non-finite EMA of {name!r} (NaN); the checkpoint is corrupt")
    if "power_ema" in state:
        if "samples_at_update" not in state:
            raise KeyError(f"{where} lacks ['samples_at_update']")
        if state["samples_at_update"] > state["samples_seen"]:
            raise ValueError(
                f"{where} has samples_at_update={state['samples_at_update']!r} past samples_seen="
                f"{state['samples_seen']!r}; the last update cannot come after the samples seen"
            )


def check_mode(state: Mapping[str, Any], own: Any, description: str, where: str) -> None:
    """Raise unless ``state`` was written in the mode whose tensors are saved under ``own`` (a key of
    :data:`SAVED_MODES`, ``None`` for teacher mode, which saves none); ``description`` names that mode."""
    for key, mode in SAVED_MODES.items():
        if key in state and key != own:
            raise KeyError(
                f"{where} holds the {key!r} tensors of {mode}, but this one is {description}: load a state written"
                " in the same mode"
            )
        if key == own and key not in state:
            raise KeyError(
                f"{where} lacks the {key!r} tensors this one needs, {description} (it was written in another mode):"
                " load a state written in the same mode"
            )


def check_clock_options(state: Mapping[str, Any], options: Any, where: str) -> None:
    """Raise unless ``state`` holds the clock entries that ``options`` need and none that they do not: a debiased
    EMA's weight (``debias``) and the switches made (``switch_every_samples``). Either is lost or invented by
    resuming with the option changed, so such a resume is refused."""
    for key, option, on in (
        ("debias_weight", "debias", bool(options.debias)),
        ("switches", "switch_every_samples", options.switch_every_samples is not None),
    ):
        if on and key not in state:
            raise KeyError(
                f"{where} lacks {key!r}: it was written without `{option}`, which this EMA has. Resume with the"
                f" `{option}` it was written with"
            )
        if not on and key in state:
            raise ValueError(
                f"{where} holds {key!r}: it was written with `{option}`, which this EMA lacks. Resume with the"
                f" `{option}` it was written with"
            )
    saved_period, period = state.get("switch_every_samples"), options.switch_every_samples
    if saved_period is not None and period is not None and saved_period != period:
        raise ValueError(
            f"{where} was written with `switch_every_samples`={saved_period!r}, and this EMA has"
            f" {options.switch_every_samples!r}: the switches made count multiples of the period, so resume with"
            f" `switch_every_samples`={saved_period!r}"
        )
