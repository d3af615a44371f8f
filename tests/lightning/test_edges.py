"""The edges a real user hits: each either keeps the EMA right or stops (or warns) with a clear message."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import PAIRS, TinyBYOL, TinyModel, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback, SampleClockLR, WarmupCosine
from lightning_emascale._lightning import WeightsOnlyCheckpointHook


def _val_loss(model: TinyModel, state: dict[str, torch.Tensor] | None = None) -> float:
    model = copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state, strict=False)
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(model.x[:8]), model.y[:8]).item()


def _no_warning_matching(record: list[warnings.WarningMessage], text: str) -> bool:
    return not any(text in str(warning.message) for warning in record)


# -------------------------------------------------------------------------------------------- checkpoints
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
    assert _no_warning_matching(record, "has no EMAScalingCallback")
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


# ---------------------------------------------------------------------------------------------- lifecycle
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
    assert _no_warning_matching(record, "EMA")
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
    assert _no_warning_matching(record, "stale")
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(other)
    for _ in range(2):  # the second evaluation warned no more and used the stale EMA before
        with pytest.warns(UserWarning, match="the EMA is stale"):
            assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(_val_loss(model))
    callback.scaled_ema.reset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.validate(model, verbose=False)
    assert _no_warning_matching(record, "stale")


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


def test_a_fresh_fit_tracks_the_modules_current_tensors():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback]).fit(model)
    model.net[2] = torch.nn.Linear(8, 1)  # a new head for the next run
    make_trainer([callback]).fit(model)
    # the second run averages the new head (the old averager kept averaging the orphaned one)
    assert any(tensor is model.net[2].weight for tensor in callback.scaled_ema.averager.tracked)


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


# ------------------------------------------------------------------------------------------------- inputs
class _MetadataModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(batch["x"]), batch["y"])

    def train_dataloader(self):
        def collate(samples):  # a 1-element metadata tensor first, as some collates do
            x, y = zip(*samples)
            return {"epoch": torch.tensor([0]), "x": torch.stack(x), "y": torch.stack(y)}

        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, collate_fn=collate)


def test_an_ambiguous_batch_raises_and_names_batch_size_of():
    with pytest.raises(ValueError, match=r"ambiguous.*\['epoch'\]: 1.*batch_size_of"):
        make_trainer([EMAScalingCallback(momentum=0.9)]).fit(_MetadataModel())

    class Measured(EMAScalingCallback):
        def batch_size_of(self, batch):
            return len(batch["x"])

    callback = Measured(momentum=0.9, base_batch_size=4)
    make_trainer([callback]).fit(_MetadataModel())
    assert (callback.kappa, callback.samples_seen) == (1.0, 32)


def test_a_first_batch_that_disagrees_with_the_dataloader_raises():
    class Doubled(TinyModel):
        def train_dataloader(self):  # a collate that stacks two augmented views as samples
            def collate(samples):
                x, y = map(torch.stack, zip(*samples))
                return torch.cat([x, x + 0.1]), torch.cat([y, y])

            return DataLoader(TensorDataset(self.x, self.y), batch_size=4, collate_fn=collate)

    with pytest.raises(ValueError, match=r"first batch measures 8 samples.*`batch_size` is 4.*batch_size_of"):
        make_trainer([EMAScalingCallback(momentum=0.9)]).fit(Doubled())
    # a dataset smaller than one batch is not a mismatch
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback]).fit(TinyModel(n_samples=3, batch_size=4))
    assert callback.samples_seen == 3


def test_max_steps_that_stop_the_run_first_need_total_samples():
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    with pytest.raises(ValueError, match=r"`max_steps`=6 stops the run before `max_epochs`=4.*total_samples"):
        make_trainer([callback], max_epochs=4, max_steps=6).fit(TinyModel())
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0, total_samples=24)
    make_trainer([callback], max_epochs=4, max_steps=6).fit(TinyModel())
    assert callback.progress == 1.0  # ended at progress 0.19 before
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    make_trainer([callback], max_epochs=2, max_steps=100).fit(TinyModel())  # max_epochs stops it: derived
    assert callback.progress == 1.0


def test_total_samples_read_by_nothing_warns():
    with pytest.warns(UserWarning, match=r"`total_samples`=32 is read by nothing"):
        make_trainer([EMAScalingCallback(momentum=0.9, total_samples=32)]).fit(TinyModel())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback = EMAScalingCallback(momentum=0.9, total_samples=32)
        make_trainer([callback]).fit(TinyModel(scheduler="sample_clock"))  # a SampleClockLR reads it
    assert _no_warning_matching(record, "read by nothing")
    assert isinstance(SampleClockLR, type) and WarmupCosine is not None


def test_progressive_accumulation_values_are_checked_at_fit_start():
    progressive = ProgressiveBatchCallback({0: 4, 2: 6}, mode="accumulation")
    callback = EMAScalingCallback(momentum=0.9)
    with pytest.raises(ValueError, match="batch size 6 of epoch 2 is not a multiple"):
        make_trainer([callback, progressive], max_epochs=3).fit(TinyModel(batch_size=4))
    assert callback.samples_seen == 0  # raised before the first step, not at step 16


def test_progressive_schedule_keys_beyond_max_epochs_warn():
    with pytest.warns(UserWarning, match=r"epochs \[2, 5\] are not reached with `max_epochs`=2"):
        make_trainer([ProgressiveBatchCallback({0: 2, 2: 4, 5: 8})], max_epochs=2).fit(TinyModel(batch_size=2))


# ------------------------------------------------------------------------------------------ non-finite
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


# --------------------------------------------------------------------------------------------- teachers
def test_freeze_teachers_makes_a_trainable_teacher_a_drop_in():
    model = TinyBYOL()
    model.backbone_momentum.requires_grad_(True)  # as lightly's I-JEPA leaves its target encoder
    with pytest.raises(ValueError, match="freeze_teachers=True"):
        make_trainer([EMAScalingCallback(momentum=0.9, teachers=PAIRS)]).fit(model)
    callback = EMAScalingCallback(momentum=0.9, teachers=PAIRS, freeze_teachers=True)
    make_trainer([callback]).fit(model)
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())
    assert callback.ema_updates == 8


def test_a_teacher_replaced_at_its_path_is_followed():
    class Replacing(TinyBYOL):  # lightly's SMoG replaces its teachers with deep copies now and then
        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 4:
                self.backbone_momentum = copy.deepcopy(self.backbone_momentum)
                self.replaced = self.backbone_momentum[0].weight.detach().clone()

    model = Replacing()
    callback = EMAScalingCallback(momentum=0.5, teachers=PAIRS)
    make_trainer([callback]).fit(model)
    # 4 updates after the replacement: the live teacher moved (it stayed frozen before, the orphan moving instead)
    assert not torch.equal(model.backbone_momentum[0].weight, model.replaced)
    expected = model.replaced.clone()
    assert (model.backbone_momentum[0].weight - model.backbone[0].weight).abs().max() < (
        expected - model.backbone[0].weight
    ).abs().max()


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


def test_callback_states_and_directories_of_the_wrong_type_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"state must be a dict, got str"):
        EMAScalingCallback(momentum=0.9).load_state_dict("x")
    existing = tmp_path / "file"
    existing.write_text("")
    from lightning_emascale import PostHocEMACallback

    with pytest.raises(ValueError, match=r"`directory` must be a directory path \(not an existing file\), got"):
        PostHocEMACallback(directory=existing)
    with pytest.raises(ValueError, match=r"`include` is empty"):
        EMAScalingCallback(include=[])
    with pytest.raises(ValueError, match=r"`teachers` maps 'a' to itself"):
        EMAScalingCallback(teachers={"a": "a"})
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string, got ' '"):
        EMAScalingCallback(name=" ")


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


def test_max_steps_under_manual_optimization_asks_for_total_samples():
    class TwoOptimizers(TinyModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                loss = super().training_step(batch, batch_idx)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.1),
            ]

    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    with pytest.raises(ValueError, match=r"`max_steps`=12 is set and the steps per epoch are not fixed.*total_samples"):
        make_trainer([callback], max_epochs=1, max_steps=12).fit(TwoOptimizers())


def test_a_post_hoc_directory_of_another_run_is_refused(tmp_path):
    from lightning_emascale import PostHocEMACallback

    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())
    with pytest.raises(ValueError, match=r"already holds 2 post-hoc snapshots of another run"):
        make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())


# --------------------------------------------------------------------------- found by a second review
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
    assert _no_warning_matching(record, "stale")


def test_a_resume_with_the_same_callback_into_a_new_module_continues(tmp_path):
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(TinyModel())
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    make_trainer([callback], max_epochs=2).fit(TinyModel(), ckpt_path=path)  # the loaded state was lost before
    assert (callback.samples_seen, callback.optimizer_steps) == (64, 16)


def test_a_k_fold_loop_with_a_tuner_callback_starts_each_fold_afresh(tmp_path):
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    for _ in range(2):  # the finder's temporary checkpoint carried the last fold's clock into the next before
        finder = LearningRateFinder(num_training_steps=4)
        make_trainer([callback, finder], default_root_dir=tmp_path).fit(TinyModel(n_samples=32))
        assert (callback.samples_seen, callback.progress) == (32, 1.0)


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


def test_a_smoke_test_writes_no_post_hoc_snapshots(tmp_path):
    from lightning_emascale import PostHocEMACallback

    make_trainer([PostHocEMACallback(snapshot_every_samples=4, directory=tmp_path)], fast_dev_run=1).fit(TinyModel())
    assert not list(tmp_path.iterdir())
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())  # not refused
    assert len(list(tmp_path.iterdir())) == 2


def test_a_copied_callback_gets_its_own_ddp_spawn_file():
    callback = EMAScalingCallback(momentum=0.9)
    assert copy.deepcopy(callback)._spawn_file.path != callback._spawn_file.path
    assert pickle.loads(pickle.dumps(callback))._spawn_file.path == callback._spawn_file.path  # a worker's copy


def test_flat_parameters_in_a_fit_give_the_same_ema_and_checkpoints(tmp_path):
    results = []
    for flat in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", flat_parameters=flat)
        trainer = make_trainer([callback], max_epochs=2, limit_val_batches=None)
        trainer.fit(model)
        loss = trainer.validate(model, verbose=False)[0]["val_loss"]
        trainer.save_checkpoint(tmp_path / f"{flat}.ckpt")
        results.append((callback.ema_state_dict(), dict(model.state_dict()), loss))
    (ema, raw, loss), (flat_ema, flat_raw, flat_loss) = results
    assert all(torch.equal(ema[name], flat_ema[name]) for name in ema)
    assert all(torch.equal(raw[name], flat_raw[name]) for name in raw)
    assert loss == flat_loss
    saved = torch.load(tmp_path / "True.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[name], ema[name].to(saved[name].dtype)) for name in ema if name in saved)


def test_an_offloaded_ema_in_a_fit_equals_the_default(tmp_path):
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", offload=offload, update_every=2)
        trainer = make_trainer([callback], max_epochs=2, limit_val_batches=None)
        trainer.fit(model)
        loss = trainer.validate(model, verbose=False)[0]["val_loss"]
        trainer.save_checkpoint(tmp_path / f"{offload}.ckpt")
        saved = torch.load(tmp_path / f"{offload}.ckpt", weights_only=False)["state_dict"]
        results.append((callback.ema_state_dict(), saved, loss))
    (ema, saved, loss), (offloaded, offloaded_saved, offloaded_loss) = results
    assert all(torch.equal(ema[name], offloaded[name]) for name in ema)
    assert all(torch.equal(saved[name], offloaded_saved[name]) for name in saved)
    assert loss == offloaded_loss


def test_the_pre_step_hook_waits_for_the_side_stream_unless_lightning_calls_the_closure_first(tmp_path):
    """Automatic optimization waits in `on_before_optimizer_step`, after forward and backward; manual optimization
    or an overridden `optimizer_step` may step the raw optimizer, so there the pre-step hook waits."""

    class OwnStep(TinyModel):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer_closure()
            optimizer.optimizer.step()  # the raw optimizer: Lightning calls no `on_before_optimizer_step`

    for module_class, expected in ((TinyModel, False), (OwnStep, True)):
        callback = EMAScalingCallback(momentum=0.9)
        make_trainer([callback], max_epochs=1).fit(module_class())
        assert callback.ema_updates > 0
        assert callback.scaled_ema._wait_before_step is expected, module_class
