"""The Lightning presets against the tools themselves, in the Trainer: Lightning's ``EMAWeightAveraging`` and
lightly's ``update_momentum`` with ``cosine_schedule`` (as lightly's examples call them in ``training_step``). At
the base batch the EMA (the teacher) equals theirs to 1e-6 after every step."""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import pytest
import torch
from helpers import PAIRS, TinyBYOL, TinyModel, make_trainer
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_emascale import EMAScalingCallback, ScaledEMA

BATCH = 4


class Recorder(L.Callback):
    """The float tensors of ``read()`` after every optimizer step."""

    def __init__(self, read) -> None:
        self.read = read
        self.rows: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: v.detach().clone() for k, v in self.read(pl_module).items() if v.is_floating_point()})


def largest_gap(ours: list[dict], theirs: list[dict], skip: int = 0) -> float:
    assert len(ours) == len(theirs) > skip
    return max(  # relative where a value exceeds 1 in size: float32 rounding grows with it
        ((mine[name] - other[name]).abs() / other[name].abs().clamp(min=1.0)).max().item()
        for mine, other in zip(ours[skip:], theirs[skip:])
        for name in other
    )


@pytest.mark.parametrize("arguments", [{"decay": 0.9}, {"decay": 0.95, "update_starting_at_step": 5}])
def test_lightning_preset_equals_ema_weight_averaging(arguments):
    """Lightning's first update copies the weights (torch's ``AveragedModel``), so does the preset's start. Before
    ``update_starting_at_step`` Lightning keeps the weights it started with, the preset the current ones: the EMAs
    are compared from the start on. Integer buffers are not compared: Lightning averages and truncates them."""
    runs, finals = {}, {}
    for side in ("theirs", "ours"):
        L.seed_everything(0)
        model = TinyModel(n_samples=64, batch_size=BATCH, lr=0.02)  # lr 0.1 diverges on this data
        if side == "theirs":
            callback = EMAWeightAveraging(**arguments)
            recorder = Recorder(lambda module, c=callback: dict(c._average_model.module.state_dict()))
        else:
            callback = EMAScalingCallback.from_preset("lightning", base_batch_size=BATCH, **arguments)
            recorder = Recorder(lambda module, c=callback: c.ema_state_dict())
        make_trainer([callback, recorder], max_epochs=2, limit_val_batches=0).fit(model)
        runs[side] = recorder.rows
        finals[side] = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    start = arguments.get("update_starting_at_step", 0)
    gap = largest_gap(runs["ours"], runs["theirs"], skip=start)
    print(f"\npreset lightning {arguments}: largest |ours - theirs| = {gap:.3g} over {len(runs['ours'])} steps")
    assert gap < 1e-6
    # both leave the EMA in the model when training ends (the preset sets `copy_at_end=True`)
    assert largest_gap([finals["ours"]], [finals["theirs"]]) < 1e-6


class LightlyBYOL(TinyBYOL):
    """TinyBYOL written as lightly's examples write it: the teacher moved in ``training_step``, before the forward,
    with ``cosine_schedule(global_step, max_steps, 0.99, 1)``."""

    def __init__(self, max_steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_steps = max_steps

    def training_step(self, batch, batch_idx):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        momentum = cosine_schedule(self.global_step, self.max_steps, 0.99, 1.0)
        for online, teacher in PAIRS.items():
            update_momentum(self.get_submodule(online), self.get_submodule(teacher), m=momentum)
        return super().training_step(batch, batch_idx)


def test_lightly_preset_equals_update_momentum_with_cosine_schedule():
    """The teacher each forward sees is the same: lightly moves it before the forward of step k with the weights
    after k steps and cosine_schedule(k); the preset moves it after step k, reading the schedule one base batch
    ahead. (lightly's loop makes no update after its last step, the preset does: the last one is not compared.)"""
    pytest.importorskip("lightly")
    n_samples, epochs = 48, 2
    max_steps = epochs * n_samples // BATCH
    teacher_of = lambda module: {  # noqa: E731
        f"{t}.{n}": p for t in PAIRS.values() for n, p in module.get_submodule(t).named_parameters()
    }

    class BeforeForward(L.Callback):  # the teacher the forward of each step sees
        def __init__(self) -> None:
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if isinstance(pl_module, LightlyBYOL):  # lightly moves it inside training_step: read it there
                return
            self.rows.append({k: v.detach().clone() for k, v in teacher_of(pl_module).items()})

    class InsideStep(LightlyBYOL):
        rows: ClassVar[list] = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.rows.append({k: v.detach().clone() for k, v in teacher_of(self).items()})
            return loss

    L.seed_everything(0)
    theirs = InsideStep(max_steps=max_steps, n_samples=n_samples, batch_size=BATCH)
    theirs.rows = []
    make_trainer([], max_epochs=epochs).fit(theirs)
    L.seed_everything(0)
    ours = TinyBYOL(n_samples=n_samples, batch_size=BATCH)
    callback = EMAScalingCallback.from_preset(
        "lightly", base_batch_size=BATCH, start_value=0.99, end_value=1.0, max_steps=max_steps, teachers=PAIRS
    )
    seen = BeforeForward()
    make_trainer([callback, seen], max_epochs=epochs).fit(ours)
    gap = largest_gap(seen.rows, theirs.rows)
    print(f"\npreset lightly cosine 0.99 -> 1 over {max_steps} steps: largest |ours - theirs| = {gap:.3g}")
    assert len(seen.rows) == max_steps and gap < 1e-6


def test_copy_at_end_and_update_bn_at_end():
    """``update_bn_at_end`` gives the EMA the statistics ``update_bn`` computes over the training loader, and
    ``copy_at_end`` then leaves that EMA in the model."""
    from lightning_emascale import update_bn

    L.seed_everything(0)
    plain_model = TinyModel(n_samples=32, batch_size=BATCH, lr=0.02)
    plain = EMAScalingCallback(momentum=0.9)
    make_trainer([plain], max_epochs=1, limit_val_batches=0).fit(plain_model)
    update_bn(plain_model.train_dataloader(), plain)
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=BATCH, lr=0.02)
    callback = EMAScalingCallback(momentum=0.9, update_bn_at_end=True, copy_at_end=True)
    make_trainer([callback], max_epochs=1, limit_val_batches=0).fit(model)
    for name, value in plain.ema_state_dict().items():
        assert torch.equal(callback.ema_state_dict()[name], value), name
        assert torch.equal(model.state_dict()[name], value.to(model.state_dict()[name].dtype)), name
    assert not torch.equal(plain_model.net[1].running_mean, model.net[1].running_mean)  # the training model's own
    with pytest.raises(
        ValueError, match=r"`copy_at_end` and `update_bn_at_end` act on the one averaged copy of a Polyak EMA"
    ):
        EMAScalingCallback(teachers=PAIRS, copy_at_end=True)
    with pytest.raises(ValueError, match=r"`update_bn_at_end` must be True or False, got 'yes'"):
        EMAScalingCallback(update_bn_at_end="yes")


def test_update_bn_at_end_runs_batches_as_training_does_and_refuses_early_what_it_cannot_do():
    """bf16-true: the batches are cast by the precision plugin, as in training (a raw float32 batch would not run
    through bf16 weights). A module without `forward` is refused when fit starts, not after the run."""
    L.seed_everything(0)
    model = TinyModel(n_samples=16, batch_size=BATCH, lr=0.02)
    callback = EMAScalingCallback(momentum=0.9, update_bn_at_end=True)
    make_trainer([callback], max_epochs=1, precision="bf16-true", limit_val_batches=0).fit(model)
    ema = callback.ema_state_dict()
    assert ema["net.1.num_batches_tracked"] == 4  # one pass of the 4 training batches, counted afresh
    assert not torch.equal(ema["net.1.running_mean"].to(model.net[1].running_mean.dtype), model.net[1].running_mean)

    class NoForward(TinyModel):
        forward = L.LightningModule.forward

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

    trainer = make_trainer([EMAScalingCallback(update_bn_at_end=True)], limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"`update_bn_at_end=True` runs NoForward.forward on the first element of each training batch, and it defines no `forward`",
    ):
        trainer.fit(NoForward())
    assert trainer.global_step == 0  # refused when fit started, before training


def test_the_lightning_preset_copies_at_the_end_unless_told_not_to():
    from lightning_emascale import preset_options

    assert preset_options("lightning", base_batch_size=BATCH)["copy_at_end"] is True  # a LightningCLI config too
    assert EMAScalingCallback.from_preset("lightning", base_batch_size=BATCH).copy_at_end
    assert not EMAScalingCallback.from_preset("lightning", base_batch_size=BATCH, copy_at_end=False).copy_at_end
    model = torch.nn.Linear(2, 1)
    ema = ScaledEMA.from_preset("lightning", model, base_batch_size=BATCH, decay=0.99)  # a loop: copy_to() yourself
    assert ema.options.start_after_samples == 0
