"""`skip_non_finite=True` in a fit: a NaN that appears in the weights for one step is skipped by the EMA,
counted in `ema/skipped_updates` and warned about at the end of the epoch, so the EMA stays finite; without the
option the NaN stays in the EMA for good."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch import Callback

from lightning_emascale import EMAScalingCallback


class _PoisonOnce(Callback):
    """Puts a NaN into the weights after the step of batch 3 and removes it before batch 4 (an overflow)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 3:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 4:
            with torch.no_grad():
                pl_module.net[0].weight.nan_to_num_(0.0)


def test_skip_non_finite_keeps_the_ema_finite_counts_and_warns():
    callback = EMAScalingCallback(momentum=0.9, skip_non_finite=True)
    trainer = make_trainer([_PoisonOnce(), callback])  # the poison runs before the EMA's batch-end hook
    with pytest.warns(UserWarning, match=r"1 EMA update\(s\) skipped this epoch"):
        trainer.fit(TinyModel())
    assert (callback.scaled_ema.skipped_updates, callback.ema_updates) == (1, 8)
    assert trainer.callback_metrics["ema/skipped_updates"] == 1
    assert all(torch.isfinite(v).all() for v in callback.ema_state_dict().values() if v.is_floating_point())

    plain = EMAScalingCallback(momentum=0.9)  # without the option one NaN stays in the EMA for good
    make_trainer([_PoisonOnce(), plain]).fit(TinyModel())
    assert not torch.isfinite(plain.ema_state_dict()["net.0.weight"]).all()
