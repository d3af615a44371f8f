"""The Polyak copy behind what a user hands a function that reads or writes the EMA: a ``ScaledEMA``, or an object
holding one as ``scaled_ema`` (the Lightning callback, not imported here). Pure torch."""

from __future__ import annotations

from typing import Any

from lightning_emascale._polyak import PolyakEMA
from lightning_emascale.core import ScaledEMA


def scaled_ema_of(ema: Any) -> ScaledEMA:
    """The :class:`ScaledEMA` of ``ema``: itself, or its ``scaled_ema`` (an ``EMAScalingCallback``; before fit
    started, its own error says so)."""
    if isinstance(ema, ScaledEMA):
        return ema
    held = getattr(ema, "scaled_ema", None)  # a callback's property raises its own error before fit
    if isinstance(held, ScaledEMA):
        return held
    raise TypeError(
        "`ema` must be a ScaledEMA or an object holding one as `scaled_ema` (an EMAScalingCallback), got"
        f" {type(ema).__name__}"
    )


def polyak_of(ema: Any, function: str, sharded_why: str = "") -> tuple[ScaledEMA, PolyakEMA]:
    """The ScaledEMA of ``ema`` and its Polyak averager, refusing another mode and a sharded module (``sharded_why``
    ends the message)."""
    scaled = scaled_ema_of(ema)
    averager = scaled.averager
    if not isinstance(averager, PolyakEMA):
        raise RuntimeError(
            f"{function} needs a Polyak EMA (one averaged copy of the weights), and this ScaledEMA is"
            f" {averager.describe()}. {averager.no_copy()}"
        )
    if scaled.is_sharded:
        raise NotImplementedError(
            f"{function} is not supported for a sharded module (DTensor parameters of FSDP2 or tensor parallelism,"
            f" FSDP1, DeepSpeed ZeRO-3): each rank holds only its shards of the EMA. {sharded_why}"
        )
    return scaled, averager
