r"""The math of the post-hoc EMA (Karras et al., EDM2, 2024) on the sample clock. No Lightning, no tensors of state.

A **power-function EMA** with exponent :math:`\gamma` weights the weights seen at sample :math:`\tau \le s` by
:math:`\propto \tau^\gamma`. Its profile after :math:`s` samples is

.. math:: p_{\gamma, s}(\tau) = (\gamma + 1)\,\tau^\gamma / s^{\gamma + 1}, \qquad 0 \le \tau \le s.

One optimizer step of global batch :math:`b` moves it with :math:`\beta = (s / (s + b))^{\gamma + 1}`: at any batch
schedule the profile in samples is the same, so it is batch-size invariant by construction. Its length is
:math:`\sigma_\mathrm{rel} = \sqrt{(\gamma + 1) / ((\gamma + 2)^2 (\gamma + 3))}`, the profile's standard
deviation relative to :math:`s`. Snapshots of a few such EMAs span a space of profiles; the least-squares
combination of snapshots closest to a target profile (another :math:`\sigma_\mathrm{rel}`, or an exponential EMA
with a half-life in samples) gives the EMA of any length after training.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_emascale._checks import check_positive

__all__ = [
    "Profile",
    "check_sigma_rel",
    "gamma_from_sigma_rel",
    "inner_product",
    "least_squares_weights",
    "power_beta",
    "sigma_rel_from_gamma",
]

#: The largest sigma_rel a power EMA with gamma >= 0 has (gamma = 0: the plain running mean).
MAX_SIGMA_REL = math.sqrt(1 / 12)


def sigma_rel_from_gamma(gamma: float) -> float:
    r"""The relative standard deviation of the power profile of exponent ``gamma``.

    Example:
        >>> round(sigma_rel_from_gamma(6.94), 4)
        0.1
    """
    gamma = check_positive(gamma + 1.0, "gamma + 1") - 1.0
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def check_sigma_rel(sigma_rel: float) -> float:
    """``sigma_rel`` as a float in :math:`(0, 1/\\sqrt{12}]`, or an error naming it."""
    sigma_rel = check_positive(sigma_rel, "sigma_rel")
    if sigma_rel > MAX_SIGMA_REL + 1e-12:
        raise ValueError(
            f"`sigma_rel` must be in (0, 1/sqrt(12) = {MAX_SIGMA_REL:.6f}] (at most the running mean's, gamma = 0),"
            f" got {sigma_rel}"
        )
    return sigma_rel


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    r"""The exponent :math:`\gamma \ge 0` whose power EMA has length ``sigma_rel`` (EDM2's parametrisation).

    ``sigma_rel`` must be in :math:`(0, 1/\sqrt{12}]`; the largest is the plain running mean (:math:`\gamma = 0`).

    Example:
        >>> round(gamma_from_sigma_rel(0.10), 2), round(gamma_from_sigma_rel(0.05), 2)
        (6.94, 16.97)
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    low, high = 0.0, 1.0
    while sigma_rel_from_gamma(high) > sigma_rel:  # sigma_rel falls monotonically with gamma >= 0
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if sigma_rel_from_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def power_beta(samples_before: float, samples_after: float, gamma: float) -> float:
    r"""The decay that moves a power EMA from ``samples_before`` to ``samples_after`` samples seen.

    .. math:: \beta = (s / (s + b))^{\gamma + 1}

    It is 0 at the first step (the EMA starts at the first weights) and keeps the profile
    :math:`\propto \tau^\gamma` in samples at any batch size.

    Example:
        >>> power_beta(0, 32, gamma=7.0)
        0.0
        >>> round(power_beta(96, 128, gamma=1.0), 4)  # (3/4)^2
        0.5625
    """
    if not 0 <= samples_before < samples_after:
        raise ValueError(
            f"the samples seen must grow: got {samples_before} before and {samples_after} after the update"
        )
    return (samples_before / samples_after) ** (gamma + 1.0)


@dataclass(frozen=True)
class Profile:
    r"""A weight profile over the samples seen: a power EMA (``gamma``) or an exponential EMA (``half_life``),
    ending at ``samples``. Each integrates to 1 on :math:`[0, s]`.
    """

    samples: float
    gamma: float | None = None
    half_life: float | None = None

    def __post_init__(self) -> None:
        check_positive(self.samples, "samples")
        if (self.gamma is None) == (self.half_life is None):
            raise ValueError("a profile is a power EMA (`gamma`) or an exponential one (`half_life`), one of the two")
        if self.half_life is not None:
            check_positive(self.half_life, "half_life_samples")

    def density(self, tau: torch.Tensor) -> torch.Tensor:
        """The profile's weight density at the sample counts ``tau`` (float64), zero past :attr:`samples`."""
        inside = (tau >= 0) & (tau <= self.samples)
        if self.gamma is not None:
            values = (self.gamma + 1) * (tau / self.samples) ** self.gamma / self.samples
        else:
            rate = math.log(2.0) / self.half_life  # type: ignore[operator]
            values = rate * torch.exp(-rate * (self.samples - tau)) / -math.expm1(-rate * self.samples)
        return torch.where(inside, values, torch.zeros_like(values))


def inner_product(first: Profile, second: Profile) -> float:
    r"""``<p, q> = integral of p(tau) q(tau)``: closed form for two power profiles, quadrature otherwise."""
    end = min(first.samples, second.samples)
    if first.gamma is not None and second.gamma is not None:
        g1, g2, s1, s2 = first.gamma, second.gamma, first.samples, second.samples
        # (g1+1)(g2+1) end^(g1+g2+1) / ((g1+g2+1) s1^(g1+1) s2^(g2+1)), in logs to stay finite
        log = (
            math.log(g1 + 1) + math.log(g2 + 1) + (g1 + g2 + 1) * math.log(end)
            - math.log(g1 + g2 + 1) - (g1 + 1) * math.log(s1) - (g2 + 1) * math.log(s2)
        )  # fmt: skip
        return math.exp(log)
    # Gauss-Legendre on [0, end], in pieces so that a sharp power or exponential profile is resolved
    nodes, weights = _gauss_legendre(64)
    edges = torch.linspace(0.0, end, 65, dtype=torch.float64)
    total = 0.0
    for left, right in itertools.pairwise(edges):
        tau = 0.5 * (right - left) * nodes + 0.5 * (right + left)
        total += float(0.5 * (right - left) * (weights * first.density(tau) * second.density(tau)).sum())
    return total


def least_squares_weights(snapshots: Sequence[Profile], target: Profile) -> tuple[list[float], float]:
    """The combination of ``snapshots`` closest to ``target`` in L2, and its relative residual.

    The residual is ``||sum_i w_i p_i - t|| / ||t||``: 0 where the target is one of the snapshots, about 1 where
    the snapshots cannot represent it at all.

    Example:
        >>> snaps = [Profile(1000, gamma=6.94), Profile(1000, gamma=16.97)]
        >>> weights, residual = least_squares_weights(snaps, Profile(1000, gamma=6.94))
        >>> [round(w, 6) for w in weights], residual < 1e-6
        ([1.0, 0.0], True)
    """
    if not snapshots:
        raise ValueError("there are no snapshots to combine")
    gram = torch.tensor([[inner_product(a, b) for b in snapshots] for a in snapshots], dtype=torch.float64)
    rhs = torch.tensor([inner_product(a, target) for a in snapshots], dtype=torch.float64)
    scale = gram.diagonal().sqrt()  # equilibrate: profiles of very different lengths have very different norms
    solution = torch.linalg.lstsq(gram / scale[:, None] / scale[None, :], rhs / scale, rcond=1e-12).solution
    weights = solution / scale
    norm = inner_product(target, target)
    squared = norm - 2.0 * float(weights @ rhs) + float(weights @ gram @ weights)
    return [float(w) for w in weights], math.sqrt(max(squared, 0.0) / norm)


def _gauss_legendre(points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the Gauss-Legendre rule on [-1, 1] (Golub-Welsch), float64."""
    k = torch.arange(1, points, dtype=torch.float64)
    off = k / torch.sqrt(4.0 * k * k - 1.0)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2.0 * vectors[0] ** 2
