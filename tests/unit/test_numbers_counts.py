"""Counts past MAX_COUNT and numbers past the float range, refused by name where they are given (issue 23, items 7 and 8).

``base_batch_size=10**400`` passed the checks and made kappa 0.0 at the first step; ``float(10**400)`` raised a bare
OverflowError naming nothing. No Trainer.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_emascale import ScaledEMA
from lightning_emascale._checks import (
    MAX_COUNT,
    as_real,
    check_count,
    check_finite,
    check_fraction,
    check_momentum,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_progress,
    show,
)

MAX = r"up to MAX_COUNT = 2\*\*53 = 9007199254740992 \(floats hold every integer up to it exactly\)"


def test_max_count_is_where_floats_stop_holding_every_integer():
    assert MAX_COUNT == 2**53
    assert float(MAX_COUNT) == MAX_COUNT and float(MAX_COUNT - 1) == MAX_COUNT - 1
    assert float(MAX_COUNT + 1) != MAX_COUNT + 1  # past it a count rounds, and kappa with it
    assert 1 / MAX_COUNT > 0 and math.isfinite(float(MAX_COUNT))  # kappa never rounds to 0 or overflows


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(10**400, "1e+400 (an integer of 401 digits)", id="10**400"),
        pytest.param(-(10**400), "-1e+400 (an integer of 401 digits)", id="-10**400"),
        pytest.param(10**5000, "1e+5000 (an integer of 5001 digits)", id="10**5000"),  # str() raises past 4300 digits
        pytest.param(123456789 * 10**40, "1.23456e+48 (an integer of 49 digits)", id="leading-digits-not-rounded"),
        pytest.param(10**30 - 1, "9" * 30, id="30-digits-in-full"),
        pytest.param(10**30, "1e+30 (an integer of 31 digits)", id="10**30"),
        (2**53, "9007199254740992"),
        (0.5, "0.5"),
        ("x", "'x'"),
        pytest.param(Fraction(10**5000, 3), "a Fraction too large to print", id="Fraction(10**5000, 3)"),
    ],
)
def test_show_prints_any_value_an_error_names(value, shown):
    assert show(value) == shown


def test_as_real_turns_a_number_past_the_float_range_into_an_infinity_not_an_overflow_error():
    assert as_real(10**400) == math.inf
    assert as_real(-(10**400)) == -math.inf
    assert as_real(Fraction(10**400, 3)) == math.inf
    assert as_real(2**1023) == 2.0**1023  # the largest power of two a float holds stays exact


@pytest.mark.parametrize(
    ("check", "match"),
    [
        (
            lambda v: check_momentum(v),
            r"`momentum` must be in \[0, 1\), got 1e\+400 \(an integer of 401 digits\), too large for a float",
        ),
        (
            lambda v: check_positive(v, "sigma"),
            r"`sigma` must be a positive finite number, got 1e\+400 \(an integer of 401 digits\), too large",
        ),
        (
            lambda v: check_finite(v, "start"),
            r"`start` must be a finite number, got 1e\+400 \(an integer of 401 digits\), too large",
        ),
        (lambda v: check_non_negative(v, "base_steps"), r"`base_steps` must be a finite number >= 0, got 1e\+400 \("),
        (
            lambda v: check_fraction(v, "final"),
            r"`final` must be a number in \[0, 1\], got 1e\+400 \(an integer of 401 digits\)",
        ),
        (
            lambda v: check_progress(v),
            r"`progress` must be in \[0, 1\] \(samples seen / total samples\), got 1e\+400 \(",
        ),
        (
            lambda v: check_positive_int(v, "update_every"),
            rf"`update_every` must be a positive integer {MAX}, got 1e\+400",
        ),
    ],
)
def test_every_check_names_the_argument_of_a_number_past_the_float_range(check, match):
    with pytest.raises(ValueError, match=match):
        check(10**400)


def test_check_count_takes_counts_up_to_max_count_and_says_the_bound_past_it():
    assert check_count(MAX_COUNT, "samples_seen") == MAX_COUNT
    assert check_count(np.int64(0), "samples_seen") == 0 and type(check_count(np.int64(3), "n")) is int
    assert check_count(None, "total_samples", minimum=1, allow_none=True) is None
    with pytest.raises(ValueError, match=rf"`samples_seen` must be an integer >= 0 {MAX}, got 9007199254740993$"):
        check_count(MAX_COUNT + 1, "samples_seen")
    with pytest.raises(ValueError, match=r"`samples_seen` must be an integer >= 0, got -1$"):
        check_count(-1, "samples_seen")
    with pytest.raises(
        ValueError,
        match=rf"`samples` must be a positive integer {MAX} \(the micro-batch's global size\), got 1e\+30 \(an integer",
    ):
        check_positive_int(10**30, "samples", what=" (the micro-batch's global size)")
    with pytest.raises(
        ValueError, match=r"`samples` must be a positive integer \(the micro-batch's global size\), got 2.5$"
    ):
        check_positive_int(2.5, "samples", what=" (the micro-batch's global size)")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"base_batch_size": 10**400},
            rf"`base_batch_size` must be a positive integer {MAX}, got 1e\+400 \(an integer of 401 digits\)",
        ),
        (
            {"base_batch_size": MAX_COUNT + 1},
            rf"`base_batch_size` must be a positive integer {MAX}, got 9007199254740993$",
        ),
        ({"total_samples": 10**400}, rf"`total_samples` must be a positive integer {MAX}, got 1e\+400"),
        (
            {"update_every": 10**5000},
            rf"`update_every` must be a positive integer {MAX}, got 1e\+5000 \(an integer of 5001 digits\)",
        ),
        ({"momentum": 10**400}, r"`momentum` must be in \[0, 1\), got 1e\+400 \(an integer of 401 digits\), too large"),
    ],
)
def test_scaled_ema_refuses_a_count_past_max_count_by_name_when_built(kwargs, match):
    """base_batch_size=10**400 was taken and made kappa 0.0 (and rho-hat 1.0: a frozen EMA) at every step."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        ScaledEMA(model, torch.optim.SGD(model.parameters(), lr=0.1), **{"momentum": 0.9, **kwargs})


def test_a_post_hoc_snapshot_interval_past_max_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match=rf"`snapshot_every_samples` must be a positive integer {MAX}, got 1e\+400"):
        ScaledEMA(torch.nn.Linear(2, 2), sigma_rels=[0.1], snapshot_every_samples=10**400, snapshot_dir=tmp_path)


def test_counts_at_max_count_are_taken_and_keep_kappa_exact():
    model = torch.nn.Linear(2, 2)
    ema = ScaledEMA(model, None, momentum=0.9, base_batch_size=MAX_COUNT, total_samples=MAX_COUNT)
    ema.count_samples(2)
    ema.end_step()
    assert ema.kappa == 2 / MAX_COUNT > 0
    assert ema.progress == 2 / MAX_COUNT


# ----------------------------------------------------------------------------- the optimizers a ScaledEMA follows
def test_a_string_for_optimizers_is_named_whole_and_a_listed_one_by_its_index():
    """ "sgd" was split into 's', 'g', 'd' and the error named the first letter's type."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(
        TypeError,
        match=r"`optimizers` must be torch optimizers, got str: 'sgd' \(pass a torch.optim.Optimizer or a list of them\)$",
    ):
        ScaledEMA(model, "sgd", momentum=0.9)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"`optimizers` must be torch optimizers, got str: 'adam' at index 1 \(pass"):
        ScaledEMA(model, [sgd, "adam"], momentum=0.9)


def test_one_optimizer_listed_twice_is_refused():
    """It was hooked twice, and the two pre-hooks scaled and restored the same param groups in turn."""
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`optimizers` lists one optimizer \(SGD\) twice, at 0 and 1: list each once"):
        ScaledEMA(model, [sgd, sgd], momentum=0.9, optimizer_rule="sgd", auto_end_step=False)
    assert sgd._optimizer_step_pre_hooks == {}  # nothing was hooked
