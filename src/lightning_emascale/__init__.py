"""lightning-emascale: batch-size-invariant model EMA for PyTorch Lightning (the EMA Scaling Rule)."""

from lightning_emascale.callback import EMAScalingCallback
from lightning_emascale.functional import (
    half_life_from_momentum,
    momentum_from_half_life,
    scale_ema_momentum,
    warmup_momentum,
)
from lightning_emascale.lr_scheduler import SampleClockLR
from lightning_emascale.progressive import ProgressiveBatchCallback
from lightning_emascale.rules import AdamScalingRule, NoScalingRule, OptimizerRule, SGDScalingRule
from lightning_emascale.schedules import WarmupCosine, cosine_schedule

__version__ = "0.1.0"

__all__ = [
    "AdamScalingRule",
    "EMAScalingCallback",
    "NoScalingRule",
    "OptimizerRule",
    "ProgressiveBatchCallback",
    "SGDScalingRule",
    "SampleClockLR",
    "WarmupCosine",
    "cosine_schedule",
    "half_life_from_momentum",
    "momentum_from_half_life",
    "scale_ema_momentum",
    "warmup_momentum",
]
