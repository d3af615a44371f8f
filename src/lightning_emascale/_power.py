"""The post-hoc EMA's power EMAs (Karras et al., EDM2) on the sample clock, and their snapshot schedule.

Pure torch, no Lightning. One fp32 Polyak copy per ``sigma_rel``, moved by :math:`\\beta = (s / s')^{\\gamma + 1}`
from ``s`` to ``s'`` samples seen, so the profile in samples does not depend on the batch size; a snapshot is
written every ``snapshot_every_samples`` samples crossed (rank 0), for
:func:`~lightning_emascale.reconstruct_post_hoc`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_emascale._averager import Averager, Update
from lightning_emascale._options import EMAOptions
from lightning_emascale._polyak import PolyakEMA, refuse_polyak_only
from lightning_emascale.post_hoc import snapshot_path, write_snapshot
from lightning_emascale.post_hoc_math import gamma_from_sigma_rel, power_beta

#: The options a post-hoc EMA has no use for, and their defaults.
_MOMENTUM_OPTIONS = (
    ("momentum", None), ("final_momentum", None), ("momentum_schedule", "constant"), ("warmup", False),
    ("teachers", None), ("ema_precision", "fp32"),
)  # fmt: skip


def check_unused(arguments: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for options a post-hoc EMA has no use for, among an adapter's arguments (run first, before
    their values are checked: the first thing to say is that they do not apply)."""
    given = {name: arguments[name] for name, default in _MOMENTUM_OPTIONS if arguments.get(name, default) != default}
    if given:
        raise ValueError(
            f"{given} have no effect on a post-hoc EMA, whose power EMAs have no momentum and stay in fp32: drop them"
        )


def check_options(options: EMAOptions) -> None:
    """A post-hoc EMA's own checks: it has no momentum, keeps fp32 copies, and swaps nothing."""
    check_unused({name: getattr(options, name) for name, _ in _MOMENTUM_OPTIONS})
    refuse_polyak_only(options)


class PowerEMAs(Averager):
    """Power-function EMAs of a module's parameters and buffers, one fp32 copy per ``sigma_rel``, with snapshots.

    Args:
        module: the module averaged (``include``/``exclude`` choose its tensors, as for a Polyak EMA).
        sigma_rels: the lengths of the power EMAs, each in :math:`(0, 1/\\sqrt{12}]`.
        snapshot_every_samples: a snapshot every this many samples seen (``None``: only :meth:`save_snapshot`).
        snapshot_dir: the snapshots' directory (written by rank 0).
    """

    state_key = "power_ema"

    def __init__(
        self,
        module: torch.nn.Module,
        sigma_rels: Sequence[float],
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        snapshot_every_samples: Optional[int] = None,
        snapshot_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(sigma_rel) for sigma_rel in self.sigma_rels)
        self.states = [PolyakEMA.from_module(module, "fp32", include, exclude) for _ in self.sigma_rels]
        self.snapshot_every_samples = snapshot_every_samples
        self.snapshot_dir = snapshot_dir
        #: Samples seen at the last update (the power EMAs' clock; 0 before the first).
        self.samples_at_update = 0
        #: Whether snapshots are written (an adapter turns it off for a smoke test, e.g. Lightning's fast_dev_run).
        self.snapshots_enabled = True

    def describe(self) -> str:
        return f"a post-hoc EMA of sigma_rel {list(self.sigma_rels)}"

    def no_copy(self) -> Exception:
        return RuntimeError(
            "A post-hoc EMA keeps power EMAs, not one EMA: reconstruct the EMA of the length you want with"
            f" `reconstruct_post_hoc({self.snapshot_dir!r}, sigma_rel=...)` and load it into the module"
        )

    def momentum_between(self, samples_before: int, samples_after: int) -> Optional[float]:
        """The first power EMA's :math:`\\beta` over the step (what is logged as the momentum)."""
        return power_beta(samples_before, samples_after, self.gammas[0])

    def update(self, step: Update, only_if: Optional[Tensor] = None) -> None:
        """Move every power EMA from the samples seen at the last update to ``step.samples_seen``; write the
        snapshot of every multiple of ``snapshot_every_samples`` crossed."""
        before, after = self.samples_at_update, step.samples_seen
        for gamma, state in zip(self.gammas, self.states):
            state.update(Update(power_beta(before, after, gamma)), only_if)
        self.samples_at_update = after
        every = self.snapshot_every_samples
        if every and before // every < after // every:
            self.save_snapshot()

    def finite(self) -> Tensor:
        return self.states[0].finite()

    def set_side_stream(self, enabled: bool) -> None:
        for state in self.states:
            state.set_side_stream(enabled)

    def join(self) -> None:
        for state in self.states:
            state.join()

    def refresh(self) -> None:
        for state in self.states:
            state.refresh()

    def reset(self) -> None:
        """The clock starts again; the power EMAs restart from the module at the next update (β is 0 from 0)."""
        self.samples_at_update = 0

    def enable_snapshots(self, enabled: bool) -> None:
        self.snapshots_enabled = bool(enabled)

    def save_snapshot(self) -> Optional[str]:
        """Write the power EMAs' snapshot at the samples of the last update (rank 0 only) and return its path;
        nothing is written before the first update, with snapshots disabled, or again for the same samples."""
        if self.samples_at_update == 0 or not self.snapshots_enabled:
            return None
        assert self.snapshot_dir is not None
        path = snapshot_path(self.snapshot_dir, self.samples_at_update)
        if _is_rank_zero() and not path.exists():
            averages = [state.averages_state_dict() for state in self.states]
            write_snapshot(self.snapshot_dir, self.samples_at_update, self.sigma_rels, averages)
        return str(path)

    def state_dict(self) -> dict[str, Any]:
        """The averages of every power EMA, keyed by its ``sigma_rel`` (as a string), live tensors; and the clock."""
        averages = {repr(sigma): state.averages_state_dict() for sigma, state in zip(self.sigma_rels, self.states)}
        return {"power_ema": averages, "samples_at_update": self.samples_at_update}

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["power_ema"]
        expected = sorted(repr(sigma_rel) for sigma_rel in self.sigma_rels)
        if sorted(saved) != expected:
            raise KeyError(f"The saved post-hoc EMA tracks sigma_rel {sorted(saved)}, this one {expected}")
        for sigma_rel, averages in zip(self.sigma_rels, self.states):
            averages.check_averages(saved[repr(sigma_rel)])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state_dict(state)  # every check before the first copy
        for sigma_rel, averages in zip(self.sigma_rels, self.states):
            averages.load_averages(state["power_ema"][repr(sigma_rel)])
        self.samples_at_update = int(state["samples_at_update"])


def _is_rank_zero() -> bool:
    """Whether this process writes files: the only one, or rank 0 of a torch.distributed group."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0
