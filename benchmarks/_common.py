"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 3, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin so that machine noise hits all alike.

    Each timing covers ``inner`` calls back to back between two device syncs (on a GPU, so that the launches of
    one call overlap the kernels of the last, as in training, and the sync's own cost is spread out).
    """
    times = interleaved_times(candidates, repeats, warmup, inner)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 3, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in every round (see :func:`interleaved_medians`)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) / inner)
    return times


def paired_ratio(
    fn: Callable[[], None], floor: Callable[[], None], repeats: int, inner: int = 1
) -> tuple[float, float]:
    """The median over rounds of (time of ``fn`` / time of ``floor``) measured back to back in the same round (a
    drift of the machine's speed between rounds cancels in each ratio; a ratio of medians keeps it), and the
    floor's median seconds."""
    times = interleaved_times({"floor": floor, "fn": fn}, repeats, inner=inner)
    ratio = statistics.median(a / b for a, b in zip(times["fn"], times["floor"]))
    return ratio, statistics.median(times["floor"])


def print_table(title: str, medians: dict[str, float], floor: str, notes: dict[str, str]) -> None:
    print(f"\n{title}")
    print(f"{'candidate':<44} {'median ms':>10} {'x floor':>8}")
    for name, seconds in medians.items():
        print(f"{name:<44} {seconds * 1e3:>10.2f} {seconds / medians[floor]:>8.2f}")
    for name, note in notes.items():
        print(f"{name:<44} {'fails':>10}   {note}")
