"""Post-hoc EMA on the sample clock: the snapshot files, and the reconstruction of an EMA of any length from them.

A post-hoc :class:`~lightning_emascale.ScaledEMA` (``sigma_rels=...``) or
:class:`~lightning_emascale.PostHocEMACallback` tracks power-function EMAs and writes their snapshots every
``snapshot_every_samples`` samples seen; :func:`reconstruct_post_hoc` combines the snapshots into the EMA of another
length after training (Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion Models*, 2024).
No Lightning import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning_emascale._checks import as_int, check_positive
from lightning_emascale.post_hoc_math import Profile, check_sigma_rel, gamma_from_sigma_rel, least_squares_weights

__all__ = ["PostHocReconstruction", "reconstruct_post_hoc"]

_FORMAT = 1
_NAME = re.compile(r"^post_hoc-(\d+)\.pt$")


def snapshot_path(directory: Union[str, os.PathLike], samples: int) -> Path:
    """Where the snapshot taken after ``samples`` samples seen is written."""
    return Path(directory) / f"post_hoc-{samples:015d}.pt"


def write_snapshot(
    directory: Union[str, os.PathLike], samples: int, sigma_rels: Sequence[float], averages: Any
) -> Path:
    """Save the power EMAs (``averages``: one state dict per ``sigma_rel``) taken after ``samples`` samples."""
    path = snapshot_path(directory, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save({"format": _FORMAT, "samples": samples, "sigma_rels": list(sigma_rels), "averages": averages}, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a truncated snapshot under the final name
    return path


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

    Raises:
        ValueError: no snapshots, both or neither target, a target out of range, or ``at_samples`` outside the
            snapshots (before the first one or after the last one).
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
    used = [(samples, path) for samples, path in index if samples <= at_samples]
    loaded = [(samples, _load_snapshot(path)) for samples, path in used]
    _check_alike([(path, snap) for (_, path), (_, snap) in zip(used, loaded)])
    columns = [
        (samples, rel, averages)
        for samples, snap in loaded
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


def _check_alike(snapshots: list[tuple[Path, dict[str, Any]]]) -> None:
    """Every snapshot holds the same finite tensors of the same shapes as the last one (one run, one model)."""
    last_path, last_snap = snapshots[-1]
    last = last_snap["averages"][0]
    for path, snap in snapshots:
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
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{where} has a non-finite {name!r}: it is corrupt")


def _load_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot file, checked: readable, this format, and its keys (the error names the file)."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"The snapshot {os.fspath(path)!r} cannot be read ({error}): it is corrupt") from error
    if not isinstance(snap, dict) or snap.get("format") != _FORMAT:
        found = snap.get("format") if isinstance(snap, dict) else type(snap).__name__
        raise ValueError(f"The snapshot {os.fspath(path)!r} has format {found!r}; this version reads format {_FORMAT}")
    missing = [key for key in ("samples", "sigma_rels", "averages") if key not in snap]
    if missing or len(snap["sigma_rels"]) != len(snap["averages"]):
        raise ValueError(f"The snapshot {os.fspath(path)!r} lacks {missing or 'one EMA per sigma_rel'}: it is corrupt")
    return snap


def _snapshots(directory: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a path (str or os.PathLike), got {directory!r}")
    folder = Path(directory)
    found = sorted(
        (int(match.group(1)), path)
        for path in (folder.iterdir() if folder.is_dir() else [])
        if (match := _NAME.match(path.name))
    )
    if not found:
        raise ValueError(
            f"no post-hoc snapshots (post_hoc-<samples>.pt) in {os.fspath(directory)!r}: train with a post-hoc EMA"
            " (`sigma_rels=`, `snapshot_dir=`) first"
        )
    return found
