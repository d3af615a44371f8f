"""Post-hoc EMA on the sample clock: the snapshot files, and the reconstruction of an EMA of any length from them.

A post-hoc :class:`~lightning_emascale.ScaledEMA` (``sigma_rels=...``) or
:class:`~lightning_emascale.PostHocEMACallback` tracks power-function EMAs and writes their snapshots every
``snapshot_every_samples`` samples seen; :func:`reconstruct_post_hoc` combines the snapshots into the EMA of another
length after training (Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion Models*, 2024).
No Lightning import.

A snapshot ``post_hoc-<samples>.pt`` is a dict that loads with ``torch.load(weights_only=True)``: ``format`` (1),
``samples`` (as in its name), ``sigma_rels`` (ascending), ``averages`` (one state dict per ``sigma_rel``, in that
order) and ``run_id``, the id of the run that wrote it (a str; absent from snapshots written before run ids, and from
those of a run resumed from a state saved before them). One directory holds the snapshots of one run.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning_emascale._checks import as_int, check_positive
from lightning_emascale.post_hoc_math import (
    MAX_SIGMA_REL,
    Profile,
    check_sigma_rel,
    gamma_from_sigma_rel,
    least_squares_weights,
)

__all__ = ["PostHocReconstruction", "reconstruct_post_hoc"]

_FORMAT = 1
_NAME = re.compile(r"^post_hoc-(\d+)\.pt$")
_TAG = re.compile(r"^[0-9A-Za-z_-]{1,64}$")  # a run id that may stand in a file name
_TOKEN_BYTES = 8  # the random part of a temporary file's name: 16 hex digits


def snapshot_path(directory: Union[str, os.PathLike], samples: int) -> Path:
    """Where the snapshot taken after ``samples`` samples seen is written."""
    return Path(directory) / f"post_hoc-{samples:015d}.pt"


def snapshot_files(directory: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """The snapshots in ``directory`` as ``(samples in the name, path)``, in order; none where it is no directory."""
    return scan_directory(directory)[0]


def scan_directory(
    directory: Union[str, os.PathLike], run_id: Optional[str] = None
) -> tuple[list[tuple[int, Path]], list[Path]]:
    """One listing of ``directory``: its snapshots (as :func:`snapshot_files`) and the temporary files that writes of
    the run ``run_id`` left there (killed before their rename; none for a run id that no name carries)."""
    folder = Path(directory)
    if not folder.is_dir():
        return [], []
    tag = _tag(run_id)
    leftover = re.compile(rf"^post_hoc-\d+-{re.escape(tag)}-[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp$") if tag else None
    snapshots, temporary = [], []
    for path in folder.iterdir():
        if match := _NAME.match(path.name):
            snapshots.append((int(match.group(1)), path))
        elif leftover is not None and leftover.match(path.name):
            temporary.append(path)
    return sorted(snapshots), sorted(temporary)


def _tag(run_id: Optional[str]) -> Optional[str]:
    """The run id as it stands in a temporary file's name: ``None`` for none, or one that is no plain name (a state
    edited by hand: letters, digits, ``_`` and ``-`` only, at most 64)."""
    return run_id if run_id is not None and _TAG.match(run_id) else None


def describe_run(run_id: Optional[str]) -> str:
    """A run id in words, for messages."""
    return f"run {run_id}" if run_id is not None else "no run id: written before run ids"


def write_snapshot(
    directory: Union[str, os.PathLike],
    samples: int,
    sigma_rels: Sequence[float],
    averages: Any,
    run_id: Optional[str] = None,
) -> Path:
    """Save the power EMAs (``averages``: one state dict per ``sigma_rel``) taken after ``samples`` samples, by the run
    ``run_id``.

    With a run id the EMAs are written in ascending ``sigma_rel`` (what :func:`reconstruct_post_hoc` checks); without
    one (a run resumed from a state saved before run ids) in the given order, as that run's earlier snapshots. The
    file is written through a temporary file created exclusively in the same directory (with the permissions a plain
    ``torch.save`` gives: 0o666 less the umask), then renamed over ``post_hoc-<samples>.pt`` (replacing a file there
    atomically): a crash mid-write never leaves a truncated snapshot under the final name, and two writers never
    share a temporary file. The temporary file, ``post_hoc-<samples>-<run id>-<random>.tmp``, is removed on failure;
    one that a killed process left is found by :func:`scan_directory` with the run's id.
    """
    path = snapshot_path(directory, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = list(zip(sigma_rels, averages))
    if run_id is not None:
        pairs.sort(key=lambda pair: pair[0])
    snapshot: dict[str, Any] = {
        "format": _FORMAT,
        "samples": samples,
        "sigma_rels": [sigma_rel for sigma_rel, _ in pairs],
        "averages": [average for _, average in pairs],
    }
    if run_id is not None:
        snapshot["run_id"] = run_id
    descriptor, partial = _create_exclusively(path, _tag(run_id))
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(snapshot, stream)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _create_exclusively(path: Path, tag: Optional[str]) -> tuple[int, Path]:
    """A new temporary file beside ``path`` (``<stem>-<tag>-<random>.tmp``, or ``<stem>-<random>.tmp`` without a
    tag), created exclusively (``O_EXCL``) with mode 0o666 less the umask, and its open descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    prefix = f"{path.stem}-{tag}-" if tag else f"{path.stem}-"
    for _ in range(100):
        partial = path.with_name(f"{prefix}{secrets.token_hex(_TOKEN_BYTES)}.tmp")
        try:
            return os.open(partial, flags, 0o666), partial
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {os.fspath(path)!r} after 100 tries")  # pragma: no cover


def load_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot file, checked: readable, this format, its keys and its run id (the error names the file)."""
    where = f"The snapshot {os.fspath(path)!r}"
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{where} cannot be read ({error}): it is corrupt") from error
    if not isinstance(snap, dict) or snap.get("format") != _FORMAT:
        found = snap.get("format") if isinstance(snap, dict) else type(snap).__name__
        raise ValueError(f"{where} has format {found!r}; this version reads format {_FORMAT}")
    missing = [key for key in ("samples", "sigma_rels", "averages") if key not in snap]
    if missing:
        raise ValueError(f"{where} lacks {missing}: it is corrupt")
    run_id = snap.get("run_id")
    if "run_id" in snap and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"{where} has run_id={run_id!r}; a non-empty str (or none, before run ids) is allowed")
    return snap


def _check_fields(path: Path, samples: int, snap: dict[str, Any]) -> None:
    """One snapshot's fields agree with its name and with each other: ``samples``, the ``sigma_rels`` (distinct
    lengths, ascending where a run id says this version wrote it), one dict of tensors per length, floats averaged
    and integers copied alike into every EMA."""
    where = f"The snapshot {os.fspath(path)!r}"
    if as_int(snap["samples"]) != samples:
        raise ValueError(
            f"{where} holds samples={snap['samples']!r}, but its name says {samples}: it was renamed or is corrupt"
            " (a snapshot keeps the name it was written under, post_hoc-<samples>.pt)"
        )
    rels, averages = snap["sigma_rels"], snap["averages"]
    numbers = isinstance(rels, list) and all(type(rel) in (int, float) for rel in rels)
    in_range = numbers and all(0.0 < rel <= MAX_SIGMA_REL + 1e-12 for rel in rels)
    if not in_range or not rels or len(set(rels)) != len(rels):
        raise ValueError(
            f"{where} has sigma_rels={rels!r}; a list of distinct floats in (0, {MAX_SIGMA_REL:.6f}] is allowed:"
            " it is corrupt"
        )
    if "run_id" in snap and rels != sorted(rels):
        raise ValueError(
            f"{where} lists sigma_rels {rels} out of the ascending order this version writes them in: its labels"
            " were changed (swapped?), so which EMA has which length is unknown"
        )
    if not isinstance(averages, list) or len(averages) != len(rels):
        found = len(averages) if isinstance(averages, list) else type(averages).__name__
        raise ValueError(
            f"{where} holds {found} EMAs for sigma_rels {rels}; one per sigma_rel is allowed: it is corrupt"
        )
    first = averages[0]
    for rel, average in zip(rels, averages):
        if not isinstance(average, dict) or not all(isinstance(t, torch.Tensor) for t in average.values()):
            raise ValueError(f"{where} holds an EMA of sigma_rel {rel} that is no dict of tensors: it is corrupt")
        for name, tensor in average.items():
            other = first.get(name)
            if other is None or tensor.dtype == other.dtype:
                continue
            raise ValueError(
                f"{where} stores {name!r} as {tensor.dtype} in the EMA of sigma_rel {rel} and as {other.dtype} in"
                f" that of {rels[0]}: one EMA's tensor was converted, the file is corrupt"
            )
    for name, tensor in first.items():
        if tensor.is_floating_point() or tensor.is_complex():
            continue
        for rel, average in zip(rels[1:], averages[1:]):
            if name in average and average[name].shape == tensor.shape and not torch.equal(average[name], tensor):
                raise ValueError(
                    f"{where} stores {name!r} as {tensor.dtype}, but its EMAs of sigma_rel {rels[0]} and {rel}"
                    " differ: an averaged (floating-point) tensor was stored as an integer (integer buffers are"
                    " copied, the same in every EMA). The file is corrupt"
                )


def _check_one_run(directory: Union[str, os.PathLike], snapshots: list[tuple[Path, dict[str, Any]]]) -> None:
    """The snapshots come from one run: one run id (or none in any), the same ``sigma_rels`` in the same order."""
    first_path, first = snapshots[0]
    for path, snap in snapshots[1:]:
        if snap.get("run_id") != first.get("run_id"):
            raise ValueError(
                f"The snapshots {os.fspath(first_path)!r} ({describe_run(first.get('run_id'))}) and"
                f" {os.fspath(path)!r} ({describe_run(snap.get('run_id'))}) in {os.fspath(directory)!r} are of two"
                " runs: a reconstruction would combine them. Move one run's snapshots to a directory of their own"
            )
        if snap["sigma_rels"] != first["sigma_rels"]:
            raise ValueError(
                f"The snapshots {os.fspath(first_path)!r} and {os.fspath(path)!r} track sigma_rels"
                f" {first['sigma_rels']} and {snap['sigma_rels']}: their labels were changed, or two runs were mixed"
                " (one directory holds the snapshots of one run)"
            )


class PostHocReconstruction(dict):
    """The reconstructed state dict (load it with ``module.load_state_dict``), with how it was made.

    Attributes:
        residual: ``||sum_i w_i p_i - target|| / ||target||`` over the weight profiles: 0 is exact, 0.01 is a
            close match, above ~0.1 the snapshots represent the target poorly.
        at_samples: the samples seen that the target profile ends at.
        weights: ``(samples, sigma_rel, weight)`` of every snapshot used.
    """

    residual: float
    at_samples: int
    weights: list[tuple[int, float, float]]


def reconstruct_post_hoc(
    directory: Union[str, os.PathLike],
    sigma_rel: Optional[float] = None,
    half_life_samples: Optional[float] = None,
    at_samples: Optional[int] = None,
) -> PostHocReconstruction:
    r"""The EMA of another length, reconstructed from the post-hoc snapshots in ``directory``.

    Give exactly one target: ``sigma_rel`` (a power EMA of that length, EDM2's parametrisation) or
    ``half_life_samples`` (an exponential EMA, :math:`\rho = 0.5^{B/H}` at any batch size :math:`B`, approximated
    by the snapshots' power profiles). It ends at ``at_samples`` (default: the last snapshot); snapshots taken
    later are not used. The weights are the least-squares combination of the snapshots' profiles; see
    :attr:`PostHocReconstruction.residual` for how close it is. Integer buffers come from the last snapshot used.

    Every snapshot in ``directory`` is checked first, and must come from one run: the same run id (snapshots written
    before run ids have none, and pass as one run if none has one), the same ``sigma_rels``, one file per sample
    count, a ``samples`` field equal to the file's name, the same tensors, shapes and dtypes in every file, and
    integers only where every EMA holds the same (copied) values.

    Args:
        directory: the snapshot directory a :class:`~lightning_emascale.PostHocEMACallback` (or a post-hoc
            :class:`~lightning_emascale.ScaledEMA`) wrote.
        sigma_rel: the target length as a power EMA's relative standard deviation, in :math:`(0, 0.288675]`.
        half_life_samples: the target as an exponential EMA's half-life, in samples.
        at_samples: where the reconstructed EMA ends (samples seen); ``None``: the last snapshot.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        NotADirectoryError: ``directory`` is a file.
        ValueError: no snapshots, both or neither target, a target out of range, ``at_samples`` outside the
            snapshots (before the first one or after the last one), or a snapshot that is corrupt or does not
            belong with the others (the message names the file).
    """
    if (sigma_rel is None) == (half_life_samples is None):
        raise ValueError(
            f"give exactly one of `sigma_rel` and `half_life_samples`, got {sigma_rel!r} and {half_life_samples!r}"
        )
    index = _snapshots(directory)
    if at_samples is None:
        at_samples = index[-1][0]
    elif as_int(at_samples) is None or not index[0][0] <= at_samples <= index[-1][0]:
        raise ValueError(
            f"`at_samples` must be an integer between the first and the last snapshot ({index[0][0]} and"
            f" {index[-1][0]} samples in {os.fspath(directory)}), got {at_samples!r}"
        )
    target = (
        Profile(at_samples, gamma=gamma_from_sigma_rel(check_sigma_rel(sigma_rel)))
        if sigma_rel is not None
        else Profile(at_samples, half_life=check_positive(half_life_samples, "half_life_samples"))
    )
    snapshots = [(path, load_snapshot(path)) for _, path in index]  # all of them: one run in the directory
    for (samples, path), (_, snap) in zip(index, snapshots):
        _check_fields(path, samples, snap)
    _check_one_run(directory, snapshots)
    used = [(samples, snap) for (samples, _), (_, snap) in zip(index, snapshots) if samples <= at_samples]
    _check_alike(snapshots, finite_in=len(used))
    columns = [
        (samples, rel, averages)
        for samples, snap in used
        for rel, averages in zip(snap["sigma_rels"], snap["averages"])
    ]
    profiles = [Profile(samples, gamma=gamma_from_sigma_rel(rel)) for samples, rel, _ in columns]
    weights, residual = least_squares_weights(profiles, target)
    result = PostHocReconstruction()
    for name, last in columns[-1][2].items():
        if last.is_floating_point():
            total = torch.zeros_like(last, dtype=torch.float64)
            for weight, (_, _, averages) in zip(weights, columns):
                total += weight * averages[name].double()
            result[name] = total.to(last.dtype)
        else:
            result[name] = last.clone()
    result.residual = residual
    result.at_samples = int(at_samples)
    result.weights = [(samples, rel, weight) for (samples, rel, _), weight in zip(columns, weights)]
    return result


def _check_alike(snapshots: list[tuple[Path, dict[str, Any]]], finite_in: int) -> None:
    """Every snapshot holds the same tensors, of the same shapes and dtypes, as the last one (one run, one model);
    the first ``finite_in`` (those used) hold finite floats."""
    last_path, last_snap = snapshots[-1]
    last = last_snap["averages"][0]
    for index, (path, snap) in enumerate(snapshots):
        where = f"The snapshot {os.fspath(path)!r}"
        pair = f"The snapshots {os.fspath(path)!r} and {os.fspath(last_path)!r}"
        for averages in snap["averages"]:
            if set(averages) != set(last):
                only = {"first": sorted(set(averages) - set(last))[:3], "second": sorted(set(last) - set(averages))[:3]}
                raise ValueError(f"{pair} hold different tensors (only in each: {only}): were two runs mixed?")
            for name, tensor in averages.items():
                if tensor.shape != last[name].shape:
                    raise ValueError(
                        f"{pair} disagree on the shape of {name!r}: {tuple(tensor.shape)} and {tuple(last[name].shape)}"
                    )
                if tensor.dtype != last[name].dtype:
                    raise ValueError(
                        f"{pair} disagree on the dtype of {name!r}: {tensor.dtype} and {last[name].dtype}: one of them"
                        " was converted (an averaged tensor must stay floating-point), the file is corrupt"
                    )
                if index < finite_in and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{where} has a non-finite {name!r}: it is corrupt")


def _snapshots(directory: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """The snapshots in ``directory``, one per sample count; an error naming the path where there are none."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a path (str or os.PathLike), got {directory!r}")
    folder = Path(directory)
    if not folder.exists():
        raise FileNotFoundError(
            f"`directory`={os.fspath(directory)!r} does not exist: give the directory the post-hoc EMA wrote its"
            " snapshots to (`snapshot_dir=`, or the callback's `directory=`)"
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"`directory`={os.fspath(directory)!r} is a file, not a directory: give the directory that holds the"
            " snapshots (post_hoc-<samples>.pt), not one snapshot"
        )
    found = snapshot_files(folder)
    if not found:
        raise ValueError(
            f"no post-hoc snapshots (post_hoc-<samples>.pt) in {os.fspath(directory)!r}: train with a post-hoc EMA"
            " (`sigma_rels=`, `snapshot_dir=`) first"
        )
    if found[0][0] == 0:
        raise ValueError(
            f"The snapshot {os.fspath(found[0][1])!r} is named for 0 samples; a snapshot is taken after at least one"
            " sample: it is corrupt"
        )
    for (samples, first), (next_samples, second) in itertools.pairwise(found):
        if samples == next_samples:
            raise ValueError(
                f"The snapshots {os.fspath(first)!r} and {os.fspath(second)!r} are both named for {samples} samples:"
                " one is a copy under another name, or of another run. Keep one of them"
            )
    return found
