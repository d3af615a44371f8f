"""lightning-emascale: a batch-size-invariant model EMA (the EMA Scaling Rule) for any PyTorch training loop.

``ScaledEMA``, the math and the schedules import torch only. The Lightning callbacks are loaded on first use
(a module ``__getattr__``), so a Fabric or plain-PyTorch user of the core never imports the Trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_emascale.batchnorm import update_bn
from lightning_emascale.core import ScaledEMA
from lightning_emascale.export import load_ema_weights, save_ema_pretrained, save_ema_weights
from lightning_emascale.functional import (
    half_life_from_momentum,
    inverse_power_warmup,
    momentum_from_half_life,
    scale_ema_momentum,
    warmup_momentum,
)
from lightning_emascale.lr_scheduler import SampleClockLR
from lightning_emascale.post_hoc import PostHocReconstruction, reconstruct_post_hoc
from lightning_emascale.presets import LightlyCosine, preset_options
from lightning_emascale.rules import AdamScalingRule, NoScalingRule, OptimizerRule, SGDScalingRule
from lightning_emascale.schedules import WarmupCosine, cosine_schedule

if TYPE_CHECKING:
    from lightning_emascale.callback import EMAScalingCallback
    from lightning_emascale.deepspeed_checkpoint import consolidate_deepspeed_checkpoint
    from lightning_emascale.post_hoc_callback import PostHocEMACallback
    from lightning_emascale.progressive import ProgressiveBatchCallback

__version__ = "0.1.0"

__all__ = [
    "AdamScalingRule",
    "EMAScalingCallback",
    "LightlyCosine",
    "NoScalingRule",
    "OptimizerRule",
    "PostHocEMACallback",
    "PostHocReconstruction",
    "ProgressiveBatchCallback",
    "SGDScalingRule",
    "SampleClockLR",
    "ScaledEMA",
    "WarmupCosine",
    "consolidate_deepspeed_checkpoint",
    "cosine_schedule",
    "half_life_from_momentum",
    "inverse_power_warmup",
    "load_ema_weights",
    "momentum_from_half_life",
    "preset_options",
    "reconstruct_post_hoc",
    "save_ema_pretrained",
    "save_ema_weights",
    "scale_ema_momentum",
    "update_bn",
    "warmup_momentum",
]

# The names that need Lightning, and the module each one lives in.
_LIGHTNING = {
    "EMAScalingCallback": "lightning_emascale.callback",
    "PostHocEMACallback": "lightning_emascale.post_hoc_callback",
    "ProgressiveBatchCallback": "lightning_emascale.progressive",
    "consolidate_deepspeed_checkpoint": "lightning_emascale.deepspeed_checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        value = getattr(importlib.import_module(_LIGHTNING[name]), name)
        globals()[name] = value  # loaded once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
