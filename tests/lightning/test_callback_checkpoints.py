"""EMAScalingCallback and checkpoints: a weights-only checkpoint holds the EMA through a stand-in
`on_save_checkpoint` hook that keeps the module's own hook, survives copies and pickles and is removed when fit
ends or raises; tuners' temporary checkpoints do not warn, a checkpoint without the callback's state does; a
resume into a new module and a state loaded by hand after an evaluation continue the saved run."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import TinyModel, make_trainer, no_warning_matching
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback
from lightning_emascale._lightning import WeightsOnlyCheckpointHook


def test_a_weights_only_checkpoint_holds_the_ema(tmp_path):
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    make_trainer([callback, checkpoint], enable_checkpointing=True, max_epochs=2).fit(model)
    loaded = TinyModel.load_from_checkpoint(tmp_path / "last.ckpt")
    ema = callback.ema_state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, ema[name].to(value.dtype)), name
    assert not torch.equal(loaded.net[0].weight, model.net[0].weight)  # not the raw weights
    assert "on_save_checkpoint" not in vars(model)  # the stand-in hook is gone after fit


class _Hooked(TinyModel):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["mine"] = 1


def test_the_weights_only_hook_keeps_the_modules_own_hook_and_copies_cleanly(tmp_path):
    class Inspect(EMAScalingCallback):
        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            self.copied = copy.deepcopy(pl_module)  # a copy or a pickle of the module during fit
            self.pickled = pickle.loads(pickle.dumps(pl_module))

    model = _Hooked()
    callback = Inspect(momentum=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    make_trainer([callback, checkpoint], enable_checkpointing=True).fit(model)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["mine"] == 1
    for copied in (callback.copied, callback.pickled):
        saved: dict = {}
        copied.on_save_checkpoint(saved)  # the copy's own hook, not the stand-in bound to the original
        assert saved == {"mine": 1}


def test_the_modules_own_hook_sees_the_ema_in_a_weights_only_checkpoint(tmp_path):
    seen = {}

    class Reading(TinyModel):
        def on_save_checkpoint(self, checkpoint):
            seen["weight"] = checkpoint["state_dict"]["net.0.weight"].clone()

    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback])
    trainer.fit(model := Reading())
    checkpoint = {"state_dict": model.state_dict()}
    hook = WeightsOnlyCheckpointHook.install(model, callback._put_ema_into)
    model.on_save_checkpoint(checkpoint)
    hook.remove()
    assert torch.equal(seen["weight"], callback.ema_state_dict()["net.0.weight"])  # as in a full checkpoint


def test_the_stand_in_checkpoint_hook_is_removed_when_fit_raises():
    class Failing(TinyModel):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([EMAScalingCallback(momentum=0.9)]).fit(model)
    assert "on_save_checkpoint" not in vars(model)


def test_tuners_temporary_checkpoints_do_not_warn(tmp_path):
    class Sized(TinyModel):
        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    model = Sized(n_samples=16)
    model.batch_size = 2
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    finders = [BatchSizeFinder(max_trials=2, steps_per_trial=1), LearningRateFinder(num_training_steps=3)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([callback, *finders], default_root_dir=tmp_path).fit(model)
    assert no_warning_matching(record, "has no EMAScalingCallback")
    assert callback.samples_seen == 16  # the trials are not counted: the clock starts with the real run
    assert callback.resolved_base_batch_size == model.batch_size


def test_a_checkpoint_without_the_callbacks_state_still_warns(tmp_path):
    model = TinyModel()
    trainer = make_trainer([], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match="has no EMAScalingCallback"):
        make_trainer([EMAScalingCallback(momentum=0.9)], max_epochs=2).fit(TinyModel(), ckpt_path=path)


def test_a_resume_with_the_same_callback_into_a_new_module_continues(tmp_path):
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(TinyModel())
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    make_trainer([callback], max_epochs=2).fit(TinyModel(), ckpt_path=path)  # the loaded state was lost before
    assert (callback.samples_seen, callback.optimizer_steps) == (64, 16)


def test_a_state_loaded_by_hand_after_an_evaluation_is_applied():
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], limit_val_batches=None)
    trainer.fit(model := TinyModel())
    saved = copy.deepcopy(callback.state_dict())
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)
    trainer.validate(model, verbose=False)
    callback.load_state_dict(saved)  # ignored after an evaluation before
    assert callback.samples_seen == 32
