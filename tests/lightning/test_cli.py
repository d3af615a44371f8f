from unittest import mock

import pytest
from helpers import TinyModel
from lightning.pytorch.cli import LightningCLI

from lightning_emascale import AdamScalingRule, EMAScalingCallback, ProgressiveBatchCallback, SampleClockLR


def _cli(*args):
    argv = [
        "any.py",
        "fit",
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
        "--trainer.max_epochs=1",
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


def test_the_peers_options_from_the_command_line(tmp_path):
    cli = _cli(
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_emascale.EMAScalingCallback",
        "--trainer.callbacks.momentum=0.99",
        "--trainer.callbacks.base_batch_size=4",
        "--trainer.callbacks.warmup=inverse-power",
        "--trainer.callbacks.warmup_power=0.75",
        "--trainer.callbacks.start_after_samples=8",
        "--trainer.callbacks.debias=true",
        "--trainer.callbacks.switch_every_samples=16",
        "--trainer.callbacks.copy_at_end=true",
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EMAScalingCallback))
    assert (callback.warmup, callback.warmup_power, callback.start_after_samples) == ("inverse-power", 0.75, 8)
    assert callback.debias and callback.switch_every_samples == 16 and callback.copy_at_end
    assert callback.ema_updates == 8


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
    cli = _cli(f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1")
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, EMAScalingCallback))
    assert isinstance(callback.optimizer_rule, AdamScalingRule)
    assert float(cli.trainer.callback_metrics["ema/momentum"]) == pytest.approx(0.996**2)


def test_progressive_scaling_on_the_sample_clock_from_a_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
model:
  batch_size: 2
  scheduler: sample_clock
trainer:
  max_epochs: 2
  callbacks:
    - class_path: lightning_emascale.ProgressiveBatchCallback
      init_args:
        schedule: {0: 2, 1: 8}
    - class_path: lightning_emascale.EMAScalingCallback
      init_args:
        momentum: 0.99
        momentum_schedule: cosine
        final_momentum: 1.0
        optimizer_rule: sgd
"""
    )
    cli = _cli(f"--config={config}", f"--trainer.default_root_dir={tmp_path}")
    progressive = next(c for c in cli.trainer.callbacks if isinstance(c, ProgressiveBatchCallback))
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAScalingCallback))
    assert progressive.schedule == {0: 2, 1: 8}
    assert cli.model.hparams.batch_size == 8
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, SampleClockLR)
    assert ema.samples_seen == ema.resolved_total_samples == 64
    assert cli.trainer.callback_metrics["ema/kappa"] == 4.0
    assert cli.trainer.callback_metrics["progressive/batch_size"] == 8.0
