import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_emascale import half_life_from_momentum, momentum_from_half_life, scale_ema_momentum, warmup_momentum


@pytest.mark.parametrize(
    ("momentum", "kappa", "expected"),
    [(0.996, 4, 0.984096), (0.99, 8, 0.922745), (0.9999, 256, 0.974724), (0.9, 1, 0.9), (0.0, 3, 0.0)],
)
def test_reference_values(momentum, kappa, expected):
    assert scale_ema_momentum(momentum, kappa) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kappa", [1, 2, 4, 8, 16])
def test_one_scaled_step_equals_kappa_steps_against_a_constant_target(kappa):
    torch.manual_seed(0)
    ema_one, target = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    ema_many = ema_one.clone()
    momentum = 0.99
    for _ in range(kappa):
        ema_many = momentum * ema_many + (1 - momentum) * target
    rho = scale_ema_momentum(momentum, kappa)
    ema_one = rho * ema_one + (1 - rho) * target
    torch.testing.assert_close(ema_one, ema_many, rtol=0, atol=1e-12)


@given(st.floats(0.5, 0.9999), st.floats(0.05, 20.0), st.floats(0.05, 20.0))
def test_scaling_composes(momentum, k1, k2):
    # Scaling by k1 then by k2 is scaling by k1 * k2: the rule is consistent on the sample clock.
    composed = scale_ema_momentum(scale_ema_momentum(momentum, k1), k2)
    assert composed == pytest.approx(scale_ema_momentum(momentum, k1 * k2), rel=1e-9)


def test_first_order_agrees_with_the_sde_rule():
    # 1 - rho^kappa ~ kappa (1 - rho) when kappa (1 - rho) is small.
    assert 1 - scale_ema_momentum(0.9999, 4) == pytest.approx(4 * 1e-4, rel=1e-3)


@given(st.floats(1.0, 1e7), st.integers(1, 100_000))
def test_half_life_round_trip(half_life, batch_size):
    momentum = momentum_from_half_life(half_life, batch_size)
    if 1e-300 < momentum < 1:  # subnormal momenta (0.5 ** 1000 and below) lose the digits to round-trip
        assert half_life_from_momentum(momentum, batch_size) == pytest.approx(half_life, rel=1e-6)


def test_half_life_is_batch_size_invariant():
    # The half-life parametrisation reproduces the EMA Scaling Rule by construction.
    base = momentum_from_half_life(10_000, 256)
    assert momentum_from_half_life(10_000, 4 * 256) == pytest.approx(scale_ema_momentum(base, 4), rel=1e-12)
    # After H samples the weight of the oldest sample is one half.
    assert base ** (10_000 / 256) == pytest.approx(0.5)


def test_warmup_counts_base_steps():
    assert warmup_momentum(0.999, 0) == pytest.approx(0.1)
    assert warmup_momentum(0.999, 990) == pytest.approx(991 / 1000)
    assert warmup_momentum(0.99, 10_000) == 0.99
    # halfway between two base steps (a kappa = 0.5 step) is a valid clock reading
    assert warmup_momentum(0.999, 0.5) == pytest.approx(1.5 / 10.5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: scale_ema_momentum(1.01, 2), ValueError, r"`momentum` must be in \[0, 1\], got 1.01"),
        (lambda: scale_ema_momentum(-0.1, 2), ValueError, r"`momentum` must be in \[0, 1\], got -0.1"),
        (lambda: scale_ema_momentum("0.9", 2), TypeError, r"`momentum` must be a real number in \[0, 1\], got '0.9'"),
        (lambda: scale_ema_momentum(True, 2), TypeError, r"`momentum` must be a real number"),
        (lambda: scale_ema_momentum(0.9, 0), ValueError, r"`kappa` must be a positive finite number, got 0.0"),
        (lambda: scale_ema_momentum(0.9, math.inf), ValueError, r"`kappa` must be a positive finite number, got inf"),
        (lambda: scale_ema_momentum(0.9, math.nan), ValueError, r"`kappa` must be a positive finite number, got nan"),
        (lambda: momentum_from_half_life(-5, 4), ValueError, r"`half_life_samples` must be a positive finite"),
        (lambda: momentum_from_half_life(5, 0), ValueError, r"`batch_size` must be a positive finite number, got 0"),
        (lambda: half_life_from_momentum(1.5, 4), ValueError, r"`momentum` must be in \[0, 1\], got 1.5"),
        (lambda: warmup_momentum(0.9, -1), ValueError, r"`base_steps` must be a finite number >= 0, got -1.0"),
    ],
)
def test_errors_name_the_argument_and_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_frozen_ema_stays_frozen_at_any_kappa():
    # BYOL's cosine schedule ends at momentum 1: the EMA stops moving, at every batch size
    assert scale_ema_momentum(1.0, 8) == 1.0
    assert scale_ema_momentum(1.0, 0.25) == 1.0
    assert warmup_momentum(1.0, base_steps=10_000) == pytest.approx(10_001 / 10_010)


def test_zero_momentum_has_zero_half_life():
    assert half_life_from_momentum(0.0, 32) == 0.0
    assert half_life_from_momentum(1.0, 32) == math.inf  # never forgets (BYOL's final momentum)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: scale_ema_momentum(0.9, 10**400),
            ValueError,
            r"`kappa` must be a positive finite number, got 1e\+400 \(an integer of 401 digits\), too large for a float",
        ),
        (
            lambda: scale_ema_momentum(10**400, 2),
            ValueError,
            r"`momentum` must be in \[0, 1\], got 1e\+400 \(an integer of 401 digits\), too large for a float",
        ),
        (
            lambda: momentum_from_half_life(10**400, 4),
            ValueError,
            r"`half_life_samples` must be a positive finite number, got 1e\+400 \(an integer of 401 digits\)",
        ),
        (
            lambda: half_life_from_momentum(0.9, -(10**400)),
            ValueError,
            r"`batch_size` must be a positive finite number, got -1e\+400 \(an integer of 401 digits\)",
        ),
        (
            lambda: warmup_momentum(0.9, 10**400),
            ValueError,
            r"`base_steps` must be a finite number >= 0, got 1e\+400 \(an integer of 401 digits\), too large",
        ),
        (lambda: warmup_momentum(0.9, math.inf), ValueError, r"`base_steps` must be a finite number >= 0, got inf"),
        (lambda: warmup_momentum(0.9, "10"), TypeError, r"`base_steps` must be a finite real number >= 0, got '10'"),
        (
            lambda: half_life_from_momentum(0.9, 1e308),
            ValueError,
            r"The half-life of `momentum`=0.9 at `batch_size`=1e\+308 is beyond the float range \(batch_size \* ln 0.5 /"
            r" ln momentum overflows\): pass a smaller `batch_size`",
        ),
    ],
)
def test_huge_integers_and_overflowing_results_are_refused_by_name(call, error, match):
    """10**400 raised OverflowError from float() naming nothing, and a finite momentum's half-life came back inf."""
    with pytest.raises(error, match=match):
        call()


def test_the_largest_finite_inputs_still_give_finite_answers():
    assert half_life_from_momentum(0.5, 1e308) == 1e308
    assert momentum_from_half_life(1e-308, 1e308) == 0.0  # 0.5 ** inf: the limit, not an error
    assert warmup_momentum(0.999, 1e308) == 0.999
    assert scale_ema_momentum(0.9, 2**53) == 0.0
