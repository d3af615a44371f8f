"""Paired-seed comparisons of the studies: an arm's gap to the base run, the noise floor, and the verdict."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_gap(run: dict, base: dict, key: str) -> float:
    """Mean over the records of |run[key] - base[key]|; both runs recorded at the same samples seen."""
    assert run["samples"] == base["samples"], (run.get("arm"), run["samples"], base["samples"])
    return statistics.fmean(abs(a - b) for a, b in zip(run[key], base[key]))


def verdict(gap: float, floor: float) -> str:
    """Decided before running: *kept* if the gap is at most 1.5 x the floor, *separated* above 3 x."""
    return "kept" if gap <= 1.5 * floor else "separated" if gap > 3 * floor else "inconclusive"


def gap_summary(gaps: Sequence[float], floor: float) -> dict:
    """The mean of per-seed gaps, their range, the mean over the floor and the verdict."""
    mean = statistics.fmean(gaps)
    return {
        "mean": mean,
        "min": min(gaps),
        "max": max(gaps),
        "over_floor": mean / floor if floor else 0.0 if mean == 0 else math.inf,
        "verdict": verdict(mean, floor),
    }
