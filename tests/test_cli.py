from unittest import mock

import pytest
from helpers import TinyModel
from lightning.pytorch.cli import LightningCLI

from lightning_emascale import AdamScalingRule, EMAScalingCallback


def _cli(*args):
    argv = [
        "any.py",
        "fit",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        *args,
    ]
    with mock.patch("sys.argv", argv):
        return LightningCLI(TinyModel, save_config_kwargs={"overwrite": True})


def test_configured_from_the_command_line(tmp_path):
    cli = _cli(
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_emascale.EMAScalingCallback",
        "--trainer.callbacks.momentum=0.99",
        "--trainer.callbacks.base_batch_size=2",
        "--trainer.callbacks.optimizer_rule=sgd",
        "--trainer.callbacks.name=teacher",
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EMAScalingCallback))
    assert (callback.momentum, callback.base_batch_size, callback.name) == (0.99, 2, "teacher")
    assert cli.trainer.callback_metrics["teacher/kappa"] == 2.0


def test_rule_object_from_a_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
model:
  optimizer: adam
  lr: 0.001
trainer:
  callbacks:
    - class_path: lightning_emascale.EMAScalingCallback
      init_args:
        momentum: 0.996
        base_batch_size: 2
        optimizer_rule:
          class_path: lightning_emascale.AdamScalingRule
"""
    )
    cli = _cli(f"--config={config}", f"--trainer.default_root_dir={tmp_path}")
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EMAScalingCallback))
    assert isinstance(callback.optimizer_rule, AdamScalingRule)
    assert float(cli.trainer.callback_metrics["ema/momentum"]) == pytest.approx(0.996**2)
