"""Which weights an evaluation after fit uses: the EMA while it is current (also when the strategy writes
the weights again in place, as DDP does), the module's own weights when they were loaded by hand (with a
warning that the EMA is stale, until `reset()`), when another module is evaluated (quietly) and when a
checkpoint is evaluated, which leaves the run's EMA and clock alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import TinyModel, make_trainer, no_warning_matching
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_emascale import EMAScalingCallback


def _val_loss(model: TinyModel, state: dict[str, torch.Tensor] | None = None) -> float:
    model = copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state, strict=False)
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(model.x[:8]), model.y[:8]).item()


def test_evaluating_after_loading_other_weights_by_hand_does_not_use_the_stale_ema():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], limit_val_batches=None)
    trainer.fit(model)
    ema_loss = _val_loss(model, callback.ema_state_dict())
    assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(ema_loss)  # unchanged: the EMA

    other = TinyModel().state_dict()
    other["net.0.weight"] = other["net.0.weight"] + 1.0
    model.load_state_dict(other)
    with pytest.warns(UserWarning, match="weights were changed since the EMA last saw them"):
        result = trainer.validate(model, verbose=False)[0]["val_loss"]
    assert result == pytest.approx(_val_loss(model))  # the loaded weights, not the stale EMA
    assert torch.equal(model.net[0].weight, other["net.0.weight"])


def test_evaluating_another_module_quietly_evaluates_its_own_weights():
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], limit_val_batches=None)
    trainer.fit(TinyModel())
    fresh = TinyModel()  # e.g. `Model.load_from_checkpoint(path)`, which already is the EMA
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = trainer.validate(fresh, verbose=False)[0]["val_loss"]
    assert no_warning_matching(record, "EMA")
    assert result == pytest.approx(_val_loss(fresh))


def test_a_stale_ema_stays_stale_until_reset_and_the_libraries_own_swaps_are_not_changes():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], limit_val_batches=None)
    trainer.fit(model)
    with callback.ema_weights():  # the README's export recipe writes the weights twice
        pass
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(
            _val_loss(model, callback.ema_state_dict())
        )
    assert no_warning_matching(record, "stale")
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(other)
    for _ in range(2):  # the second evaluation warned no more and used the stale EMA before
        with pytest.warns(UserWarning, match="the EMA is stale"):
            assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(_val_loss(model))
    callback.scaled_ema.reset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.validate(model, verbose=False)
    assert no_warning_matching(record, "stale")


def test_evaluating_a_checkpoint_uses_its_weights_and_leaves_the_runs_ema_alone(tmp_path):
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_epochs=1, save_top_k=-1)
    trainer = make_trainer([callback, checkpoint], enable_checkpointing=True, max_epochs=2, limit_val_batches=None)
    trainer.fit(model)
    first = tmp_path / "epoch=0-step=8.ckpt"
    expected = _val_loss(model, torch.load(first, weights_only=True)["state_dict"])
    assert trainer.validate(model, ckpt_path=first, verbose=False)[0]["val_loss"] == pytest.approx(expected)

    full = tmp_path / "full.ckpt"
    trainer.save_checkpoint(full)
    samples = callback.samples_seen
    trainer.validate(model, ckpt_path=full, verbose=False)  # loaded the run's clock before
    assert callback.samples_seen == samples
    make_trainer([callback]).fit(model)  # a fresh run: not the checkpoint's clock
    assert (callback.samples_seen, callback.optimizer_steps) == (32, 8)


class _Rebroadcast(Callback):
    """Writes every tensor in place with its own value in `setup` of an evaluation, as DDP's
    `_sync_module_states` does after the callbacks' `setup`."""

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            with torch.no_grad():
                for tensor in [*pl_module.parameters(), *pl_module.buffers()]:
                    tensor.copy_(tensor.clone())


def test_every_evaluation_after_fit_uses_the_ema_when_the_strategy_rewrites_the_weights():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback, _Rebroadcast()], limit_val_batches=None)
    trainer.fit(model)
    expected = _val_loss(model, callback.ema_state_dict())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):  # the second one evaluated the training weights, "stale", before
            assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(expected)
    assert no_warning_matching(record, "stale")
