"""The sample clock in the Trainer: the callback attaches itself, derives the total and explains what it cannot do."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import TinyModel, make_trainer, no_warning_matching
from torch.utils.data import DataLoader, IterableDataset

from lightning_emascale import EMAScalingCallback, SampleClockLR, WarmupCosine, cosine_schedule


# ------------------------------------------------------------------------------------------------ the clock
def test_callback_attaches_itself_and_derives_the_total():
    model = TinyModel(n_samples=32, batch_size=4, scheduler="sample_clock")
    ema = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([ema], max_epochs=2)
    trainer.fit(model)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.clock is ema
    assert ema.resolved_total_samples == 64 and ema.progress == 1.0
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.1)  # WarmupCosine(final=0.1) at the end


def test_cosine_momentum_schedule_on_samples():
    ema = EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, base_batch_size=4)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(ema.ema_momentum)

    make_trainer([ema, Spy()], max_epochs=1).fit(TinyModel(n_samples=32, batch_size=8))
    # kappa 2, evaluated before each step at s = 0, 8, 16, 24 of 32
    expected = [cosine_schedule(s / 32, 0.9, 1.0) ** 2 for s in (0, 8, 16, 24)]
    assert seen == pytest.approx(expected, rel=1e-12)


class Stream(IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(6, generator=generator), torch.randn(1, generator=generator)


class StreamModel(TinyModel):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4)


@pytest.mark.parametrize(
    ("model", "kwargs", "ema_kwargs", "match"),
    [
        (
            StreamModel(),
            {"max_steps": 5, "max_epochs": None},
            {},
            r"Cannot derive `total_samples` from the Trainer \(`max_epochs` is not set, the run is bounded by"
            r" `max_steps`=5\): pass `total_samples=`",
        ),
        (
            TinyModel(n_samples=32, batch_size=4),
            {"max_epochs": 1, "limit_train_batches": 3},
            {},
            r"\(`limit_train_batches` or `overfit_batches` is set\)",
        ),
        (
            TinyModel(n_samples=32, batch_size=4),
            {"max_epochs": 2},
            {"total_samples": 40},
            r"`total_samples`=40 is less than the 64 samples this run trains on \(max_epochs 2 x 32 per epoch\)",
        ),
        (
            StreamModel(),
            {"max_steps": 5, "max_epochs": None},
            {"total_samples": 12},
            r"The run has trained on 16 samples, past `total_samples`=12: set `total_samples` to at least",
        ),
    ],
)
def test_the_clock_explains_what_it_cannot_do(model, kwargs, ema_kwargs, match):
    ema = EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, **ema_kwargs)
    with pytest.raises(ValueError, match=match):
        make_trainer([ema], **kwargs).fit(model)


def test_an_iterable_dataset_runs_with_an_explicit_total():
    ema = EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, total_samples=20)
    make_trainer([ema], max_steps=5, max_epochs=None).fit(StreamModel())
    assert ema.samples_seen == 20 and ema.progress == 1.0
    assert ema.ema_momentum == pytest.approx(cosine_schedule(16 / 20, 0.9, 1.0))


def test_a_constant_momentum_never_needs_the_total():
    ema = EMAScalingCallback(momentum=0.9)
    make_trainer([ema], max_steps=3, max_epochs=None).fit(StreamModel())
    assert ema.ema_momentum == 0.9
    with pytest.raises(ValueError, match="Cannot derive `total_samples`"):
        _ = ema.progress


def step_shaped(progress: float) -> float:
    return 0.5 if progress < 0.5 else 0.75


def test_a_callable_momentum_schedule_runs_on_the_sample_clock():
    ema = EMAScalingCallback(momentum_schedule=step_shaped, base_batch_size=4)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(ema.ema_momentum)

    make_trainer([ema, Spy()], max_epochs=1).fit(TinyModel(n_samples=16, batch_size=4))
    assert seen == [0.5, 0.5, 0.75, 0.75]


def test_overriding_momentum_at_fails_loudly_instead_of_being_ignored():
    class StepShaped(EMAScalingCallback):
        def momentum_at(self, progress: float) -> float:
            return step_shaped(progress)

    with pytest.raises(TypeError, match=r"StepShaped overrides `momentum_at`, which no longer shapes the schedule"):
        StepShaped(momentum=0.9, base_batch_size=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"momentum_schedule": "linear"},
            r"`momentum_schedule` must be one of \['constant', 'cosine'\] or a callable of progress in \[0, 1\], got 'linear'",
        ),
        (
            {"momentum_schedule": step_shaped},
            r"`momentum`=0.9 has no effect with a callable `momentum_schedule`, which gives the momentum at every",
        ),
        ({"momentum_schedule": "cosine"}, r"`momentum_schedule='cosine'` needs `final_momentum`"),
        ({"final_momentum": 1.0}, r"`final_momentum`=1.0 has no effect with `momentum_schedule='constant'`"),
        (
            {"momentum_schedule": "cosine", "final_momentum": 1.5},
            r"`final_momentum` must be in \[0, 1\], got 1.5",
        ),
        ({"total_samples": 0}, r"`total_samples` must be a positive integer or None, got 0"),
    ],
)
def test_schedule_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAScalingCallback(momentum=0.9, **kwargs)


# ----------------------------------------------------------------------------------------- the run's length
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
    assert no_warning_matching(record, "read by nothing")
    assert isinstance(SampleClockLR, type) and WarmupCosine is not None


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


class _Oversampling(torch.utils.data.Sampler):
    """A custom batch sampler that yields more samples per epoch than its sampler holds (oversampling)."""

    def __init__(self, n: int) -> None:
        self.sampler = range(n)

    def __iter__(self):
        for _ in range(2):
            yield from ([i, i + 1, i + 2, i + 3] for i in range(0, len(self.sampler), 4))

    def __len__(self) -> int:
        return 2 * len(self.sampler) // 4


class _OversampledModel(TinyModel):
    def train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(dataset, batch_sampler=_Oversampling(len(dataset)))


def test_a_custom_batch_sampler_needs_total_samples_at_the_start_not_at_step_nine():
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    trainer = make_trainer([callback])
    with pytest.raises(ValueError, match=r"`batch_sampler` is a _Oversampling, .* pass `total_samples=`"):
        trainer.fit(_OversampledModel())
    assert trainer.global_step == 0
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0, total_samples=64)
    make_trainer([callback]).fit(_OversampledModel())
    assert callback.scaled_ema.samples_seen == 64 and callback.scaled_ema.progress == 1.0


class _DropLast(TinyModel):
    def train_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=5, drop_last=True)


def test_the_derived_total_leaves_out_the_batches_drop_last_drops():
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([callback], max_epochs=2).fit(_DropLast())
    assert callback.resolved_total_samples == 2 * 30  # 6 batches of 5 per epoch, the last 2 samples dropped
    assert callback.scaled_ema.progress == 1.0
    assert no_warning_matching(record, "stopped at progress")
