"""Sample-clock schedules and SampleClockLR on their own (no Lightning)."""

from __future__ import annotations

import math
import pickle
import re

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
    opt.step()  # a training step first, as torch expects
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
    scheduler.optimizer.step()
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


# ------------------------------------------------------------------ numbers that pass the checks but broke later
def test_cosine_schedule_of_ends_near_the_float_limit_stays_between_them():
    """end - start overflowed to -inf, and the schedule returned inf for finite ends."""
    assert cosine_schedule(0.5, 1e308, -1e308) == 0.0
    assert cosine_schedule(0.25, -1.7e308, 1.7e308) == pytest.approx(-1.7e308 * math.cos(math.pi / 4), rel=1e-12)
    assert cosine_schedule(0.0, 1.7e308, -1.7e308) == 1.7e308
    assert cosine_schedule(1.0, 1.7e308, -1.7e308) == -1.7e308


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: cosine_schedule(0.5, 10**400, 1.0),
            r"`start` must be a finite number, got 1e\+400 \(an integer of 401 digits\), too large for a float",
        ),
        (
            lambda: cosine_schedule(0.5, 0.9, -(10**400)),
            r"`end` must be a finite number, got -1e\+400 \(an integer of 401 digits\), too large",
        ),
        (lambda: cosine_schedule(0.5, 0.9, math.inf), r"`end` must be a finite number, got inf"),
        (
            lambda: cosine_schedule(10**400, 0.9, 1.0),
            r"`progress` must be in \[0, 1\] \(samples seen / total samples\), got 1e\+400 \(",
        ),
        (
            lambda: cosine_schedule(math.nan, 0.9, 1.0),
            r"`progress` must be in \[0, 1\] \(samples seen / total samples\), got nan",
        ),
        (
            lambda: WarmupCosine(final=10**400),
            r"`final` must be a number in \[0, 1\], got 1e\+400 \(an integer of 401 digits\)",
        ),
        (lambda: WarmupCosine(warmup=math.nan), r"`warmup` must be a number in \[0, 1\], got nan"),
        (lambda: WarmupCosine()(math.inf), r"`progress` must be in \[0, 1\] .*, got inf"),
    ],
)
def test_huge_and_non_finite_schedule_inputs_are_refused_by_name(call, match):
    """10**400 raised OverflowError from float(), naming nothing."""
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (
            {0: 2**53 + 1},
            r"`schedule` values must be batch sizes \(integers >= 1\) up to MAX_COUNT = 2\*\*53 = 9007199254740992 \(floats hold every integer up to it exactly\), got 9007199254740993 at epoch 0",
        ),
        (
            {0: 8, 3: 10**400},
            r"`schedule` values must be batch sizes .* up to MAX_COUNT = 2\*\*53 .*, got 1e\+400 \(an integer of 401 digits\) at epoch 3",
        ),
        (
            {10**30: 8},
            r"`schedule` keys must be epochs \(integers >= 0\) up to MAX_COUNT = 2\*\*53 .*, got 1e\+30 \(an integer of 31 digits\)",
        ),
    ],
)
def test_a_batch_schedule_refuses_counts_past_max_count(schedule, match):
    with pytest.raises(ValueError, match=match):
        check_batch_schedule(schedule)
    assert check_batch_schedule({0: 2**53, 2**53: 1}) == {0: 2**53, 2**53: 1}  # the bound itself is taken


def test_sample_clock_lr_names_a_wrong_optimizer_before_torch_does():
    with pytest.raises(
        TypeError,
        match=r"`optimizer` must be a torch.optim.Optimizer \(the optimizer whose learning rates SampleClockLR sets\),"
        r" got str: 'not an optimizer'$",
    ):
        SampleClockLR("not an optimizer", WarmupCosine())

    class Wrapper:  # as Lightning's LightningOptimizer, which is no Optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    with pytest.raises(TypeError, match=r"got Wrapper: .*: pass its `.optimizer` \(SGD\)$"):
        SampleClockLR(Wrapper(optimizer()), WarmupCosine())


def test_sample_clock_lr_names_a_schedule_of_the_wrong_arity_or_one_that_overflows_the_lr():
    with pytest.raises(
        TypeError,
        match=r"`schedule` must be a callable of one argument, progress in \[0, 1\], that returns the learning-rate"
        r" factor; calling .*\(0.0\) raised: .* takes 0 positional arguments but 1 was given",
    ):
        SampleClockLR(optimizer(), lambda: 1.0, clock=Clock())
    with pytest.raises(
        ValueError,
        match=r"`schedule` returned 1e\+308 at progress 0.0, which times the initial learning rates \[5.0, 0.5\]"
        r" overflows to \[inf, 5e\+307\]: the factor must keep them finite",
    ):
        SampleClockLR(optimizer(lr=5.0), lambda p: 1e308, clock=Clock())
    with pytest.raises(
        ValueError, match=r"`schedule` must return a finite number >= 0, got 1e\+400 \(an integer of 401 digits\) at"
    ):
        SampleClockLR(optimizer(), lambda p: 10**400, clock=Clock())


@pytest.mark.parametrize("progress", [math.nan, 1.5, -0.1, "0.5", None])
def test_sample_clock_lr_refuses_a_clock_reading_outside_0_1(progress):
    """A custom schedule (a lambda) does not check progress itself: nan gave a nan learning rate silently."""
    clock = Clock()
    scheduler = SampleClockLR(optimizer(), lambda p: 1.0, clock=clock)
    before = [group["lr"] for group in scheduler.optimizer.param_groups]
    clock.progress = progress
    scheduler.optimizer.step()
    with pytest.raises(
        ValueError,
        match=rf"`clock` \(Clock\) reported progress {re.escape(repr(progress))}; SampleClockLR needs a number in"
        r" \[0, 1\] \(samples seen / total samples\)",
    ):
        scheduler.step()
    assert [group["lr"] for group in scheduler.optimizer.param_groups] == before


def test_sample_clock_lr_refuses_a_last_epoch_past_max_count():
    with pytest.raises(
        ValueError,
        match=r"`last_epoch` must be an integer >= -1 up to MAX_COUNT = 2\*\*53 = 9007199254740992 \(floats hold every"
        r" integer up to it exactly\), got 1e\+400 \(an integer of 401 digits\)",
    ):
        SampleClockLR(optimizer(), WarmupCosine(), last_epoch=10**400)


def test_a_refused_sample_clock_lr_leaves_the_param_groups_as_they_were():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    before = [dict(group) for group in optimizer.param_groups]
    with pytest.raises(ValueError, match=r"`schedule` must return a finite number >= 0, got nan at progress 0.0"):
        SampleClockLR(optimizer, lambda progress: float("nan"))
    assert optimizer.param_groups == before  # no `initial_lr` left behind to stand in for the base rate
    optimizer.param_groups[0]["lr"] = 0.2  # the corrected retry starts from the rate the user set
    scheduler = SampleClockLR(optimizer, lambda progress: 1.0)
    assert scheduler.base_lrs == [0.2]


@pytest.mark.parametrize(
    "schedule, epoch, default, error, message",
    [
        ({"a": 4}, 0, 2, ValueError, r"`schedule` keys must be epochs \(integers >= 0\), got 'a'"),
        ({0: 4}, "1", 2, ValueError, r"`epoch` must be .*got '1'"),
        ({0: 4}, None, 2, ValueError, r"`epoch` must be .*got None"),
        ({2: 4}, 0, 0, ValueError, r"`default` must be .*got 0"),
    ],
)
def test_batch_size_at_names_a_bad_argument(schedule, epoch, default, error, message):
    with pytest.raises(error, match=message):
        batch_size_at(schedule, epoch, default=default)


def test_sample_clock_lr_resumed_without_initial_rates_names_last_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    with pytest.raises(ValueError, match=r"`last_epoch`=5 resumes a schedule, which needs `initial_lr` .*group 0"):
        SampleClockLR(optimizer, lambda progress: 1.0, last_epoch=5)
