"""Sample-clock schedules and SampleClockLR on their own (no Lightning)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_emascale import SampleClockLR, WarmupCosine, cosine_schedule
from lightning_emascale.schedules import batch_size_at, check_batch_schedule


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_cosine_schedule_stays_between_its_ends_and_is_monotone(p, start, end):
    value = cosine_schedule(p, start, end)
    assert min(start, end) - 1e-12 <= value <= max(start, end) + 1e-12
    later = cosine_schedule(min(1.0, p + 0.01), start, end)
    assert (later - value) * (end - start) >= -1e-12


def test_cosine_schedule_is_byol_at_half_way():
    # BYOL: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
    assert cosine_schedule(0.25, 0.996, 1.0) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_schedule(1.0, 0.996, 1.0) == 1.0


def test_warmup_cosine_pieces():
    schedule = WarmupCosine(warmup=0.25, final=0.2, warmup_start=0.1)
    assert schedule(0.0) == pytest.approx(0.1)
    assert schedule(0.125) == pytest.approx(0.55)
    assert schedule(0.25) == pytest.approx(1.0)
    assert schedule(0.625) == pytest.approx(0.6)
    assert schedule(1.0) == pytest.approx(0.2)
    assert WarmupCosine()(0.0) == 1.0  # no warm-up: the cosine starts at the full LR
    assert pickle.loads(pickle.dumps(schedule)) == schedule  # survives ddp_spawn


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: cosine_schedule(1.5, 0.9, 1.0), ValueError, r"`progress` must be in \[0, 1\] .*, got 1.5"),
        (lambda: cosine_schedule(-0.1, 0.9, 1.0), ValueError, r"`progress` must be in \[0, 1\] .*, got -0.1"),
        (
            lambda: cosine_schedule("0.5", 0.9, 1.0),
            TypeError,
            r"`progress` must be a real number in \[0, 1\], got '0.5'",
        ),
        (lambda: WarmupCosine(warmup=1.0), ValueError, r"`warmup` must be in \[0, 1\): a warm-up over the whole run"),
        (lambda: WarmupCosine(warmup=-0.1), ValueError, r"`warmup` must be a number in \[0, 1\], got -0.1"),
        (lambda: WarmupCosine(final=2), ValueError, r"`final` must be a number in \[0, 1\], got 2"),
        (lambda: WarmupCosine(warmup_start=None), ValueError, r"`warmup_start` must be a number in \[0, 1\], got None"),
    ],
)
def test_schedule_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_batch_schedule_is_sorted_copied_and_looked_up():
    schedule = {5: 64, 0: 8}
    checked = check_batch_schedule(schedule)
    assert list(checked) == [0, 5] and checked is not schedule
    assert [batch_size_at(checked, e, default=1) for e in (0, 4, 5, 100)] == [8, 8, 64, 64]
    assert batch_size_at({3: 16}, 2, default=4) == 4


# ------------------------------------------------------------------------------------------------ SampleClockLR
class Clock:
    def __init__(self) -> None:
        self.progress = 0.0


def optimizer(lr=0.5):
    model = torch.nn.Linear(2, 1)
    return torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": lr / 10}], lr=lr)


def test_sample_clock_lr_follows_the_clock_not_the_step_count():
    clock = Clock()
    opt = optimizer()
    scheduler = SampleClockLR(opt, WarmupCosine(warmup=0.5), clock=clock)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    clock.progress = 0.25
    scheduler.step()
    scheduler.step()  # twice at the same progress: the same LR
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.025])
    clock.progress = 1.0
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.0, 0.0])


def test_sample_clock_lr_state_dict_drops_the_clock_and_schedule():
    scheduler = SampleClockLR(optimizer(), WarmupCosine(), clock=Clock())
    state = scheduler.state_dict()
    assert "clock" not in state and "schedule" not in state
    fresh = SampleClockLR(optimizer(), WarmupCosine())
    fresh.load_state_dict(state)
    assert fresh.clock is None and fresh.base_lrs == scheduler.base_lrs


def test_sample_clock_lr_errors():
    with pytest.raises(TypeError, match="`schedule` must be a callable of progress in"):
        SampleClockLR(optimizer(), schedule=0.5)
    scheduler = SampleClockLR(optimizer(), WarmupCosine())  # no clock: progress 0 while it is built
    with pytest.raises(RuntimeError, match="SampleClockLR has no clock: add an EMAScalingCallback"):
        scheduler.step()
    with pytest.raises(ValueError, match=r"`schedule` must return a finite number >= 0, got -1.0 at progress 0.0"):
        SampleClockLR(optimizer(), lambda p: -1.0, clock=Clock())
    with pytest.raises(ValueError, match=r"`schedule` must return a finite number >= 0, got nan"):
        SampleClockLR(optimizer(), lambda p: math.nan, clock=Clock())


def test_cosine_schedule_refuses_non_finite_ends():
    with pytest.raises(ValueError, match=r"`start` must be a finite number, got nan"):
        cosine_schedule(0.5, float("nan"), 1.0)
    with pytest.raises(TypeError, match=r"`end` must be a finite real number, got '1'"):
        cosine_schedule(0.5, 0.9, "1")


def test_sample_clock_lr_checks_its_clock_and_takes_numpy_factors():
    import numpy as np

    from lightning_emascale import SampleClockLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"`clock` must have a `progress` attribute .*, got 5"):
        SampleClockLR(optimizer, lambda progress: 1.0, clock=5)
    scheduler = SampleClockLR(optimizer, lambda progress: np.float32(0.5))
    with pytest.raises(TypeError, match=r"`clock` must have a `progress` attribute .*, got 'x'"):
        scheduler.attach("x")

    class Clock:
        progress = 0.5

    scheduler.attach(Clock())
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
