"""The post-hoc EMA's power EMAs (Karras et al., EDM2) on the sample clock, and their snapshot schedule.

Pure torch, no Lightning. One fp32 Polyak copy per ``sigma_rel``, moved by :math:`\\beta = (s / s')^{\\gamma + 1}`
from ``s`` to ``s'`` samples seen, so the profile in samples does not depend on the batch size; a snapshot is
written every ``snapshot_every_samples`` samples crossed (rank 0), for
:func:`~lightning_emascale.reconstruct_post_hoc`.

Every run has an id (:attr:`PowerEMAs.run_id`, made when the power EMAs are built, kept in their state so that a
resumed run keeps it) that its snapshots carry; a snapshot directory holding a snapshot of another run is refused
before the first step (and before every write), so that two runs never mix their snapshots. A snapshot due is written
even where the run wrote one of that name before (an attempt abandoned by a resume from an earlier state).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_emascale._averager import Averager, Update
from lightning_emascale._options import EMAOptions
from lightning_emascale._polyak import PolyakEMA, refuse_polyak_only
from lightning_emascale.post_hoc import describe_run, load_snapshot, scan_directory, snapshot_path, write_snapshot
from lightning_emascale.post_hoc_math import gamma_from_sigma_rel, power_beta

#: The options a post-hoc EMA has no use for, and their defaults.
_MOMENTUM_OPTIONS = (
    ("momentum", None), ("final_momentum", None), ("momentum_schedule", "constant"), ("warmup", False),
    ("warmup_gamma", None), ("warmup_power", None), ("min_momentum", None), ("start_after_samples", None),
    ("debias", False), ("teachers", None), ("ema_precision", "fp32"),
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

    A directory that holds a snapshot of another run (another :attr:`run_id`) is refused with a ``ValueError``
    before the first update moves anything: where the optimizer's hook sees the step, before the step itself (the
    core asks :meth:`momentum_between` first); and again before every snapshot written, at the first step that
    crosses its sample count. The directory is listed only then (once per snapshot, and once before the first step).
    Snapshots without a run id (written before run ids) count as another run's, except to a run resumed from a
    state saved before run ids (:attr:`run_id` ``None``): it wrote them, and writes its own without an id too.

    A snapshot due is written even where a file of this run has its name: a resume from an earlier state rewrites
    what the abandoned attempt wrote after it (an uninterrupted resume writes the same values again). The first
    check of a run (built, resumed or reset) removes the temporary files that its killed writes left
    (``post_hoc-<samples>-<run id>-<random>.tmp``), never another run's, which may be writing.

    Only rank 0 checks, as only it writes, so under DDP only rank 0 raises: the Lightning callback broadcasts the
    outcome of its check at the start of fit, so that every rank raises. In a loop of your own, call
    ``ema.check_snapshot_dir()`` on rank 0 before the first step and share its outcome (e.g.
    ``torch.distributed.broadcast_object_list``) so that every rank stops; a refusal at a later snapshot (a snapshot
    of another run written into the directory mid-run) is raised on rank 0 only, and the other ranks wait in their
    next collective until its timeout.
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
        #: The id of this run, written into its snapshots and its state (``None``: a run resumed from a state saved
        #: before run ids, whose snapshots carry none).
        self.run_id: Optional[str] = _new_run_id()
        #: The directory's argument in messages (an adapter sets its own name for it, e.g. ``"directory"``).
        self.directory_argument = "snapshot_dir"
        self._checked = False  # snapshot_dir was checked in this run (before its first step)
        self._write_checked_at: Optional[int] = None  # samples_at_update when checked for the next update's snapshot
        self._written_at: Optional[int] = None  # the samples of the last snapshot written (None: none since it began)
        self._swept = False  # the temporary files this run's killed writes left were removed
        self._ours: dict[str, tuple[int, int, int]] = {}  # snapshots found to be this run's: name -> stat signature

    def describe(self) -> str:
        return f"a post-hoc EMA of sigma_rel {list(self.sigma_rels)}"

    def no_copy(self) -> Exception:
        return RuntimeError(
            "A post-hoc EMA keeps power EMAs, not one EMA: reconstruct the EMA of the length you want with"
            f" `reconstruct_post_hoc({self.snapshot_dir!r}, sigma_rel=...)` and load it into the module"
        )

    def momentum_between(self, samples_before: int, samples_after: int) -> Optional[float]:
        """The first power EMA's :math:`\\beta` over the step (what is logged as the momentum).

        The core asks it first for every step, before the optimizer moves the weights where a hook sees the step:
        ``snapshot_dir`` is checked here (:meth:`check_directory`) before the first step and at the first step that
        crosses the sample count of the next snapshot, so that a directory of another run is refused before anything
        moves.
        """
        self._check_if_due(samples_after)
        return power_beta(samples_before, samples_after, self.gammas[0])

    def update(self, step: Update, only_if: Optional[Tensor] = None) -> None:
        """Move every power EMA from the samples seen at the last update to ``step.samples_seen``; write the
        snapshot of every multiple of ``snapshot_every_samples`` crossed (``snapshot_dir`` checked before anything
        moves where no hook saw the step; not again where :meth:`momentum_between` checked it for this update)."""
        before, after = self.samples_at_update, step.samples_seen
        self._check_if_due(after)
        for gamma, state in zip(self.gammas, self.states):
            state.update(Update(power_beta(before, after, gamma)), only_if)
        self.samples_at_update = after
        if self._writes_between(before, after):
            self._write()

    def _check_if_due(self, samples_after: int) -> None:
        """Check ``snapshot_dir`` before a step to ``samples_after`` if it was not checked in this run yet, or if the
        next update writes a snapshot (a multiple of snapshot_every_samples crossed since the last update) and it was
        not checked for that snapshot yet: one listing per snapshot, at the first step that crosses its samples."""
        writes = self._writes_between(self.samples_at_update, samples_after)
        if self._checked and (not writes or self._write_checked_at == self.samples_at_update):
            return
        self.check_directory()
        if writes:
            self._write_checked_at = self.samples_at_update

    def _writes_between(self, before: int, after: int) -> bool:
        """Whether an update from ``before`` to ``after`` samples seen crosses a multiple of snapshot_every_samples."""
        every = self.snapshot_every_samples
        return every is not None and every > 0 and before // every < after // every

    def check_directory(self) -> None:
        """Raise ``ValueError`` if ``snapshot_dir`` holds a snapshot that is not this run's (rank 0, with snapshots
        enabled; one listing, each file read once while it stays unchanged). The message names the directory as
        :attr:`directory_argument`. The first check of a run that passes removes the temporary files its killed
        writes left."""
        if self.snapshots_enabled and _is_rank_zero():  # otherwise nothing is written (enable_snapshots: check again)
            self._check_files()
        self._checked = True

    def _check_files(self) -> None:
        argument = self.directory_argument
        assert self.snapshot_dir is not None
        snapshots, leftovers = scan_directory(self.snapshot_dir, None if self._swept else self.run_id)
        for _, path in snapshots:
            signature = _signature(path)
            if signature is None or self._ours.get(path.name) == signature:
                continue  # gone since it was listed, or read before
            try:
                run_id = load_snapshot(path).get("run_id")
            except ValueError as error:
                raise ValueError(
                    f"`{argument}`={os.fspath(self.snapshot_dir)!r} holds {path.name}, which is no snapshot this run"
                    f" can tell as its own ({error}). Remove it, or give this run a new `{argument}`"
                ) from error
            if run_id != self.run_id:
                ours = "no run id, resumed from a state saved before run ids" if self.run_id is None else None
                raise ValueError(
                    f"`{argument}`={os.fspath(self.snapshot_dir)!r} holds post-hoc snapshots of another run:"
                    f" {path.name} ({describe_run(run_id)}; this run: {ours or describe_run(self.run_id)}). Its"
                    " snapshots would mix with them, and `reconstruct_post_hoc` would combine both runs. Give this"
                    f" run a new `{argument}` (or move the other run's snapshots out), or resume the run that wrote"
                    " them from its own checkpoint"
                )
            self._ours[path.name] = signature
        if not self._swept:  # after the check: a refused directory is left as it was
            for path in leftovers:
                path.unlink(missing_ok=True)
            self._swept = True

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
        """The clock starts again; the power EMAs restart from the module at the next update (β is 0 from 0). It is
        a new run, with a new :attr:`run_id`: the snapshots written so far are another run's."""
        self.samples_at_update = 0
        self._new_run(_new_run_id())

    def _new_run(self, run_id: Optional[str]) -> None:
        self.run_id = run_id
        self._ours.clear()
        self._checked, self._write_checked_at, self._written_at, self._swept = False, None, None, False

    def enable_snapshots(self, enabled: bool) -> None:
        self.snapshots_enabled = bool(enabled)
        self._checked, self._write_checked_at = False, None  # checked again before the next step

    def save_snapshot(self) -> Optional[str]:
        """Write the power EMAs' snapshot at the samples of the last update (rank 0 only) and return its path;
        nothing is written before the first update, with snapshots disabled, or again for the samples of the
        snapshot written last. A file of this run of that name is replaced (an attempt abandoned by a resume from
        an earlier state wrote it); ``snapshot_dir`` is checked first."""
        if self.samples_at_update == 0 or not self.snapshots_enabled:
            return None
        assert self.snapshot_dir is not None
        path = snapshot_path(self.snapshot_dir, self.samples_at_update)
        if self._written_at != self.samples_at_update:
            self.check_directory()  # a snapshot of another run refuses the write
            self._write()
        return str(path)

    def _write(self) -> None:
        """Write the snapshot at the samples of the last update (rank 0, with snapshots enabled), over a file of the
        same name."""
        if self.snapshots_enabled and _is_rank_zero():
            assert self.snapshot_dir is not None
            averages = [state.averages_state_dict() for state in self.states]
            path = write_snapshot(
                self.snapshot_dir, self.samples_at_update, self.sigma_rels, averages, run_id=self.run_id
            )
            signature = _signature(path)
            if signature is not None:
                self._ours[path.name] = signature
        self._written_at = self.samples_at_update

    def state_dict(self) -> dict[str, Any]:
        """The averages of every power EMA, keyed by its ``sigma_rel`` (as a string), live tensors; the clock; and
        the run's id (``"run_id"``, absent for a run resumed from a state saved before run ids)."""
        averages = {repr(sigma): state.averages_state_dict() for sigma, state in zip(self.sigma_rels, self.states)}
        state: dict[str, Any] = {"power_ema": averages, "samples_at_update": self.samples_at_update}
        if self.run_id is not None:
            state["run_id"] = self.run_id
        return state

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        if "run_id" in state and (not isinstance(state["run_id"], str) or not state["run_id"]):
            raise ValueError(
                f"The saved post-hoc EMA state has run_id={state['run_id']!r}; a non-empty str (the id its snapshots"
                " carry) is allowed, or no run_id (a state saved before run ids)"
            )
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
        self._new_run(state.get("run_id"))  # the run resumed, and the snapshots it wrote; checked before the next step


def _new_run_id() -> str:
    """A random id for a new run (32 hex digits), the same kind of value on every platform (a str, for
    ``torch.load(weights_only=True)``)."""
    return uuid.uuid4().hex


def _signature(path: Path) -> Optional[tuple[int, int, int]]:
    """What tells a file changed since it was read (inode, size, modification time); ``None`` once it is gone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _is_rank_zero() -> bool:
    """Whether this process writes files: the only one, or rank 0 of a torch.distributed group."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0
