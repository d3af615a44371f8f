"""Paired-seed comparisons of the studies: an arm's gap to the base run, the noise floor with its interval, and the
verdict.

The rule, decided before any run and the same in every study:

* a seed's *gap* is the mean over the records of |arm - base| on that seed (for an end-point metric, the one
  difference); an arm's gap is the mean of its seeds' gaps;
* the noise floor F is the mean over seeds of the *floor* run's gap (the base run with another data order and
  other augmentations); its interval is the smallest and the largest of those per-seed floor gaps;
* *kept* if the gap is at most 1.5 F, *separated* if it is above 3 F, *inconclusive* between;
* the verdict is *fragile* when judging against the ends of F's interval instead of F gives another verdict, and
  *robust* otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Optional


def mean_gap(run: dict, base: dict, key: str) -> float:
    """Mean over the records of |run[key] - base[key]|; both runs recorded at the same samples seen."""
    assert run["samples"] == base["samples"], (run.get("arm"), run["samples"], base["samples"])
    return statistics.fmean(abs(a - b) for a, b in zip(run[key], base[key]))


def verdict(gap: float, floor: float) -> str:
    """Decided before running: *kept* if the gap is at most 1.5 x the floor, *separated* above 3 x."""
    return "kept" if gap <= 1.5 * floor else "separated" if gap > 3 * floor else "inconclusive"


def floor_summary(floor_gaps: Sequence[float]) -> dict:
    """F (the mean of the per-seed floor gaps) and its interval (their smallest and largest)."""
    return {"mean": statistics.fmean(floor_gaps), "min": min(floor_gaps), "max": max(floor_gaps),
            "per_seed": list(floor_gaps)}  # fmt: skip


def _ratio(gap: float, floor: float) -> float:
    return gap / floor if floor else 0.0 if gap == 0 else math.inf


def gap_summary(gaps: Sequence[float], floor: float, floor_range: Optional[Sequence[float]] = None) -> dict:
    """The mean of per-seed gaps, their range, the mean over the floor and the verdict; with ``floor_range`` (F's
    smallest and largest per-seed value) also the ratio over that interval and whether the verdict is robust to it."""
    mean = statistics.fmean(gaps)
    summary = {"mean": mean, "min": min(gaps), "max": max(gaps), "over_floor": _ratio(mean, floor),
               "verdict": verdict(mean, floor)}  # fmt: skip
    if floor_range is not None:
        low, high = min(floor_range), max(floor_range)
        summary["over_floor_range"] = [_ratio(mean, high), _ratio(mean, low)]
        verdicts = [verdict(mean, high), verdict(mean, low)]
        summary["verdict_range"] = verdicts
        summary["robust"] = verdicts == [summary["verdict"]] * 2
    return summary


def verdict_text(summary: dict) -> str:
    """``"1.3 kept"``, or with a floor interval ``"1.3 (0.9-2.1) kept, fragile"``."""
    text = f"{summary['over_floor']:.1f}"
    if "over_floor_range" in summary:
        low, high = summary["over_floor_range"]
        text += f" ({low:.1f}-{high:.1f})"
    text += f" {summary['verdict']}"
    if "robust" in summary and not summary["robust"]:
        text += ", fragile"
    return text
