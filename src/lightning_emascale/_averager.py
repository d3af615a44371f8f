"""The averager protocol: what :class:`~lightning_emascale.ScaledEMA` needs of an EMA mode. Pure torch.

Three modes implement it, each in its own module and each checking its own options: the Polyak copy
(:mod:`~lightning_emascale._polyak`), the teacher pairs (:mod:`~lightning_emascale._teacher`) and the power EMAs of
the post-hoc EMA (:mod:`~lightning_emascale._power`). ``ScaledEMA`` picks one when it is built and never asks which
it holds: the defaults here are what a mode without that capability does (nothing, or an error in its own words).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

#: The key under which each mode saves its tensors in ``ScaledEMA.state_dict()``, and the mode's name in messages.
SAVED_MODES = {"ema": "a Polyak EMA", "power_ema": "a post-hoc EMA"}


@dataclass(frozen=True)
class Update:
    """One EMA update: ``decay``, the product of the steps' :math:`\\hat\\rho` since the last update (what a
    momentum-driven mode applies), and the samples seen after those steps (what the power EMAs move to)."""

    decay: float
    samples_seen: int = 0


class Averager:
    """An EMA mode. Subclasses implement :meth:`update` and :meth:`finite`, and override what they can do."""

    #: The key of its tensors in ``ScaledEMA.state_dict()`` (a key of :data:`SAVED_MODES`), ``None`` if it saves
    #: nothing of its own (the teachers are the module's own entries).
    state_key: ClassVar[Optional[str]] = None
    #: Whether it keeps one averaged copy that can be swapped in for evaluation and saved as the model's weights.
    swappable: ClassVar[bool] = False
    #: Whether an update writes the module's own tensors (a sharded module is then resharded after it).
    writes_module: ClassVar[bool] = False

    def describe(self) -> str:
        """The mode in words, for messages (``"a Polyak EMA"``)."""
        raise NotImplementedError

    def momentum_between(self, samples_before: int, samples_after: int) -> Optional[float]:
        """The momentum this mode itself applies over a step from ``samples_before`` to ``samples_after`` samples
        seen, or ``None`` where it applies the scheduled :math:`\\hat\\rho`."""
        return None

    def update(self, step: Update, only_if: Optional[Tensor] = None) -> None:
        """Move the EMA by one update; with ``only_if`` (a 0-d bool tensor) False, keep it (no host sync)."""
        raise NotImplementedError

    def finite(self) -> Tensor:
        """A 0-d bool tensor: whether the tensors the next update reads are finite (no host sync)."""
        raise NotImplementedError

    def join(self) -> None:
        """Order the training stream after the updates launched so far (before the weights are written again)."""

    def set_side_stream(self, enabled: bool) -> None:
        """Run the updates on a CUDA side stream from now on (the owner then joins before the next step)."""

    def refresh(self) -> None:
        """Read the module's tensors from their current storage (a module moved since the EMA was built)."""

    def reset(self) -> None:
        """Start afresh from the module's current tensors."""

    def state_dict(self) -> dict[str, Any]:
        """Its entries of ``ScaledEMA.state_dict()`` (live tensors)."""
        return {}

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise unless ``state`` (a whole ``ScaledEMA`` state) holds entries this averager can load."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load its entries of a whole ``ScaledEMA`` state, checked by :meth:`check_state_dict` first."""

    # The one averaged copy, for evaluation (Polyak mode); the other modes raise in their own words.
    def no_copy(self) -> Exception:
        """The error for an operation on an averaged copy this mode does not keep."""
        return RuntimeError(f"{self.describe()} keeps no averaged copy to swap in or read")

    @property
    def is_swapped(self) -> bool:
        """Whether the module holds the EMA weights now."""
        return False

    def swap_in(self) -> None:
        raise self.no_copy()

    def swap_out(self) -> None:
        raise self.no_copy()

    def averages_by_name(self) -> dict[str, Tensor]:
        raise self.no_copy()

    def write_into_module(self, keep: float = 0.0) -> None:
        """Write the averaged copy into the module's tensors for good, ``θ ← keep·θ + (1 − keep)·ζ`` (Polyak mode)."""
        raise self.no_copy()

    def raw_by_name(self) -> dict[str, Tensor]:
        raise self.no_copy()

    def weights_by_name(self) -> dict[str, Tensor]:
        """The EMA in the module's devices and dtypes, by name, for :func:`torch.func.functional_call`."""
        raise self.no_copy()

    def mark_seen(self) -> None:
        """Remember the module's tensors as the EMA last saw them (see :meth:`changed_since_seen`)."""

    def changed_since_seen(self) -> list[str]:
        """The names of tensors written by someone else since :meth:`mark_seen` (weights loaded by hand)."""
        return []

    #: Whether snapshots of the averages are written (post-hoc mode).
    snapshots_enabled: bool = False

    def enable_snapshots(self, enabled: bool) -> None:
        """Write snapshots from now on, or not (post-hoc mode; an adapter turns them off for a smoke test)."""
        raise RuntimeError("`snapshots_enabled` belongs to a post-hoc EMA (`sigma_rels=...`)")

    def save_snapshot(self) -> Optional[str]:
        """Write a snapshot of the averages (post-hoc mode) and return its path."""
        raise RuntimeError("`save_snapshot()` belongs to a post-hoc EMA (`sigma_rels=...`)")

    def check_directory(self) -> None:
        """Raise if the snapshot directory holds another run's snapshots (post-hoc mode)."""
        raise RuntimeError("`check_snapshot_dir()` belongs to a post-hoc EMA (`sigma_rels=...`)")


def all_finite(tensors: list[Tensor], nan_only: Optional[list[bool]] = None) -> Tensor:
    """A 0-d bool tensor: whether every floating-point tensor of ``tensors`` is finite (only free of NaN where
    ``nan_only`` says so: a buffer may hold -inf on purpose, e.g. an attention mask). No host sync."""
    flags_of = nan_only if nan_only is not None else [False] * len(tensors)
    groups: dict[tuple[torch.device, bool], list[Tensor]] = {}
    for tensor, only_nan in zip(tensors, flags_of):
        if tensor.is_floating_point() and tensor.numel() > 0:
            groups.setdefault((tensor.device, only_nan), []).append(tensor.detach())
    if not groups:
        return torch.tensor(True)
    device = next(iter(groups))[0]
    flags = []
    for (_, only_nan), group in groups.items():
        norms = torch.stack(torch._foreach_norm(group, float("inf"))).float()  # inf for an inf, nan for a nan
        flags.append((~torch.isnan(norms) if only_nan else torch.isfinite(norms)).all().to(device))
    return torch.stack(flags).all()
