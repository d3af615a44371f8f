"""The EMA Scaling Rule as plain functions on floats.

Nothing here imports Lightning: every function can be checked on its own, and the callbacks only call
them. References: *How to Scale Your EMA* (Busbridge et al., NeurIPS 2023) for the rule, and
Morales-Brotons et al. (TMLR 2024) for the EMA warm-up.
"""

from __future__ import annotations

import math

from lightning_emascale._checks import check_momentum, check_non_negative, check_positive

__all__ = [
    "half_life_from_momentum",
    "inverse_power_warmup",
    "momentum_from_half_life",
    "scale_ema_momentum",
    "warmup_momentum",
]


def scale_ema_momentum(momentum: float, kappa: float) -> float:
    r"""Apply the EMA Scaling Rule: the momentum to use when the batch is ``kappa`` times the base batch.

    .. math:: \hat\rho = \rho^\kappa

    With a constant target, one update at :math:`\rho^\kappa` equals :math:`\kappa` updates at :math:`\rho`,
    so the EMA's horizon measured in samples does not depend on the batch size. ``kappa`` may be any
    positive real number (a short last batch gives a fractional one). A momentum of 1 (a frozen EMA, where
    BYOL's cosine schedule ends) stays 1.

    Args:
        momentum: the momentum :math:`\rho \in [0, 1]` tuned at the base batch size.
        kappa: the ratio :math:`\kappa > 0` of the batch size to the base batch size.

    Returns:
        The scaled momentum :math:`\rho^\kappa`, in :math:`[0, 1]`.

    Raises:
        ValueError: ``momentum`` is outside :math:`[0, 1]` or ``kappa`` is not a positive finite number.

    Example:
        >>> round(scale_ema_momentum(0.996, 4), 9)
        0.984095744
        >>> round(scale_ema_momentum(0.9999, 256), 6)
        0.974724
    """
    momentum = check_momentum(momentum, allow_one=True)
    kappa = check_positive(kappa, "kappa")
    return momentum**kappa


def momentum_from_half_life(half_life_samples: float, batch_size: float) -> float:
    r"""The per-step momentum whose EMA halves the weight of old samples every ``half_life_samples``.

    .. math:: \rho = 0.5^{B / H}

    Parametrising the EMA by a half-life in samples :math:`H` makes it batch-size invariant by
    construction: at batch size :math:`\kappa B` this gives :math:`\rho^\kappa`.

    Args:
        half_life_samples: the half-life :math:`H > 0`, counted in training samples.
        batch_size: the number of samples per optimizer step :math:`B > 0`.

    Example:
        >>> momentum_from_half_life(half_life_samples=64, batch_size=64)
        0.5
        >>> round(momentum_from_half_life(half_life_samples=22_145, batch_size=256), 4)
        0.992
    """
    half_life_samples = check_positive(half_life_samples, "half_life_samples")
    batch_size = check_positive(batch_size, "batch_size")
    return 0.5 ** (batch_size / half_life_samples)


def half_life_from_momentum(momentum: float, batch_size: float) -> float:
    r"""The half-life in samples of an EMA with momentum ``momentum`` at ``batch_size`` samples per step.

    .. math:: H = B \, \frac{\ln 0.5}{\ln \rho}

    The inverse of :func:`momentum_from_half_life`. A momentum of 0 keeps no history: its half-life is 0; a
    momentum of 1 never forgets: ``inf``. Any other momentum has a finite half-life, and one too large for a float
    (``batch_size`` near 1e308) is an error, not ``inf``.

    Args:
        momentum: :math:`\rho \in [0, 1]`, per step.
        batch_size: samples per step (:math:`B > 0`).

    Example:
        >>> round(half_life_from_momentum(0.999, batch_size=1))
        693
        >>> half_life_from_momentum(0.5, batch_size=128)
        128.0
    """
    momentum = check_momentum(momentum, allow_one=True)
    batch_size = check_positive(batch_size, "batch_size")
    if momentum == 0.0:
        return 0.0
    if momentum == 1.0:
        return math.inf  # the average never forgets
    half_life = batch_size * (math.log(0.5) / math.log(momentum))
    if not math.isfinite(half_life):
        raise ValueError(
            f"The half-life of `momentum`={momentum} at `batch_size`={batch_size} is beyond the float range"
            " (batch_size * ln 0.5 / ln momentum overflows): pass a smaller `batch_size`"
        )
    return half_life


def warmup_momentum(momentum: float, base_steps: float) -> float:
    r"""The EMA warm-up of Morales-Brotons et al.: :math:`\rho_t = \min(\rho, (1 + t) / (10 + t))`.

    Early in training the raw weights move fast and a long EMA would average in the random initialisation;
    the warm-up shortens the horizon at first. ``base_steps`` is :math:`t` counted in **base-batch steps**
    (samples seen divided by the base batch size), not in optimizer steps, so the warm-up spans the same
    number of samples at any batch size. Raise the result to :math:`\kappa` afterwards.

    Args:
        momentum: the momentum :math:`\rho \in [0, 1]` after the warm-up.
        base_steps: :math:`t \ge 0`, samples seen divided by the base batch size.

    Example:
        >>> warmup_momentum(0.999, base_steps=0)
        0.1
        >>> warmup_momentum(0.999, base_steps=90)
        0.91
        >>> warmup_momentum(0.9, base_steps=10_000)
        0.9
    """
    momentum = check_momentum(momentum, allow_one=True)
    base_steps = check_non_negative(base_steps, "base_steps")
    return min(momentum, (1.0 + base_steps) / (10.0 + base_steps))


def inverse_power_warmup(base_steps: float, gamma: float = 1.0, power: float = 2.0 / 3.0) -> float:
    r"""The inverse-power EMA warm-up (timm's ``use_warmup``, ema-pytorch, diffusers' ``use_ema_warmup``).

    .. math:: \rho_t = 1 - (1 + t / \gamma)^{-p}

    The momentum rises from 0 towards 1 as :math:`t` grows; an EMA takes :math:`\min(\rho, \rho_t)`. ``base_steps``
    is :math:`t` in **base-batch steps** since the EMA started (samples / base batch size), so the warm-up spans the
    same samples at any batch size. With :math:`\gamma = 1, p = 2/3` it reaches 0.999 after 31,622 base steps; with
    :math:`p = 3/4`, after 10,000.

    Args:
        base_steps: :math:`t \ge 0`, samples since the EMA started divided by the base batch size.
        gamma: :math:`\gamma > 0`, the scale of :math:`t` (the peers' ``inv_gamma``/``warmup_gamma``).
        power: :math:`p > 0` (the peers' ``power``/``warmup_power``).

    Example:
        >>> inverse_power_warmup(0)
        0.0
        >>> round(inverse_power_warmup(1), 6)  # 1 - 2 ** (-2 / 3)
        0.370039
        >>> round(inverse_power_warmup(10_000, power=0.75), 6)
        0.999
    """
    base_steps = check_non_negative(base_steps, "base_steps")
    gamma, power = check_positive(gamma, "gamma"), check_positive(power, "power")
    return 1.0 - (1.0 + base_steps / gamma) ** -power
