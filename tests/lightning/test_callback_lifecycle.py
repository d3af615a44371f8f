"""EMAScalingCallback across fits: a callback reused for a new run (another fold, another batch size, a
tuner callback beside it) starts afresh from the module's current weights and tensors, fitting again on the same
Trainer continues the run, a run that ends without one EMA update warns, and a copied callback gets its own
DDP-spawn file while a pickled one (a worker's copy) shares it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateFinder

from lightning_emascale import EMAScalingCallback


def test_a_callback_reused_across_fits_starts_each_new_run_afresh():
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", momentum_schedule="cosine", final_momentum=1.0)
    model = TinyModel(batch_size=4)
    make_trainer([callback]).fit(model)
    assert (callback.samples_seen, callback.progress) == (32, 1.0)
    model.hparams.batch_size = 8  # the next fold trains at another batch size, on the same module
    weights_at_start = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []

    class FirstUpdate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                steps.append(
                    (callback.ema_state_dict()["net.0.weight"].clone(), pl_module.net[0].weight.detach().clone())
                )

    make_trainer([callback, FirstUpdate()]).fit(model)  # raised "past total_samples" before
    assert (callback.samples_seen, callback.optimizer_steps, callback.kappa) == (32, 4, 1.0)  # base resolved again
    # the EMA restarted from the weights this run began with: after one step it is 0.9 of them + 0.1 of the step's
    ema_after_first_step, raw_after_first_step = steps[0]
    expected = 0.9 * weights_at_start["net.0.weight"] + 0.1 * raw_after_first_step
    torch.testing.assert_close(ema_after_first_step, expected)


def test_fitting_again_on_the_same_trainer_continues_the_run():
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    model = TinyModel()
    trainer = make_trainer([callback], max_epochs=1)
    trainer.fit(model)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)
    assert (callback.samples_seen, callback.optimizer_steps) == (64, 16)


def test_a_fresh_fit_tracks_the_modules_current_tensors():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback]).fit(model)
    model.net[2] = torch.nn.Linear(8, 1)  # a new head for the next run
    make_trainer([callback]).fit(model)
    # the second run averages the new head (the old averager kept averaging the orphaned one)
    assert any(tensor is model.net[2].weight for tensor in callback.scaled_ema.averager.tracked)


def test_a_k_fold_loop_with_a_tuner_callback_starts_each_fold_afresh(tmp_path):
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    for _ in range(2):  # the finder's temporary checkpoint carried the last fold's clock into the next before
        finder = LearningRateFinder(num_training_steps=4)
        make_trainer([callback, finder], default_root_dir=tmp_path).fit(TinyModel(n_samples=32))
        assert (callback.samples_seen, callback.progress) == (32, 1.0)


def test_a_run_without_an_ema_update_warns():
    with pytest.warns(UserWarning, match="never updated"):
        make_trainer([EMAScalingCallback(momentum=0.9, update_every=100)]).fit(TinyModel())
    callback = EMAScalingCallback(momentum=0.9, update_every=6)

    class StopEarly(TinyModel):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                self.trainer.should_stop = True
            return super().training_step(batch, batch_idx)

    with pytest.warns(UserWarning, match="without one EMA update"):
        make_trainer([callback]).fit(StopEarly())
    assert callback.ema_updates == 0


def test_a_copied_callback_gets_its_own_ddp_spawn_file():
    callback = EMAScalingCallback(momentum=0.9)
    assert copy.deepcopy(callback)._spawn_file.path != callback._spawn_file.path
    assert pickle.loads(pickle.dumps(callback))._spawn_file.path == callback._spawn_file.path  # a worker's copy
