"""The Markdown tables of docs/results.md, written from recorded ``results.json`` files (not read off a figure).

    python examples/studies/evidence_tables.py docs/evidence/fashion-mnist/polyak [more study folders ...]
    python examples/studies/evidence_tables.py --summary docs/evidence/fashion-mnist/{polyak,pseudo-label,byol,dino}

Each folder holds one study's ``results.json``; the study is recognised by its arguments. The test suite checks
that every table printed here for the committed results appears in docs/results.md as printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# examples/ on the path, so that `python examples/studies/evidence_tables.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emascale_examples.paired import mean_gap


def ratio(gap: dict) -> str:
    """``1.3 (0.9–2.1), kept``; a verdict that changes within F's interval reads ``kept, fragile``."""
    low, high = gap["over_floor_range"]
    fragile = "" if gap["robust"] else ", fragile"
    return f"{gap['over_floor']:.1f} ({low:.1f}–{high:.1f}), {gap['verdict']}{fragile}"


def span(values: dict, digits: int = 4) -> str:
    """``mean (min–max)`` of a ``{"mean", "min", "max"}`` record."""
    return f"{values['mean']:.{digits}f} ({values['min']:.{digits}f}–{values['max']:.{digits}f})"


def rule_against_no_rule(result: dict, key: str, closer: bool = True) -> str:
    """Per pair of arms that differ only in the EMA rule (``X, no EMA rule`` and its partner), on how many seeds the
    arm with the rule is closer to the base run in ``key`` (the mean over records of |arm - base|), or with
    ``closer=False`` has the higher final ``key``. Counted from the recorded runs."""
    runs = {(run["seed"], run["kappa"], run["arm"]): run for run in result["runs"]}
    seeds = sorted({run["seed"] for run in result["runs"]})
    counts = []
    for kappa, arm in dict.fromkeys((run["kappa"], run["arm"]) for run in result["runs"]):
        if "no EMA rule" not in arm:
            continue
        partner = next(name for name in (arm.replace("no EMA rule", "rule"), arm.replace(", no EMA rule", ""))
                       if (seeds[0], kappa, name) in runs)  # fmt: skip
        wins = 0
        for seed in seeds:
            rule, plain, base = runs[seed, kappa, partner], runs[seed, kappa, arm], runs[seed, 1, "base"]
            if closer:
                wins += mean_gap(rule, base, key) < mean_gap(plain, base, key)
            else:
                wins += rule[key] > plain[key]
        counts.append(f"{partner} (κ = {kappa}) {wins} of {len(seeds)}")
    return "; ".join(counts)


def polyak(result: dict) -> str:
    summary = result["summary"]
    floor = summary["floor"]
    lines = [
        "F (the per-seed range): EMA accuracy " + span(floor["ema_accuracy"]) + "; raw accuracy "
        + span(floor["raw_accuracy"]) + "; disagreement with the base EMA " + span(summary["disagreement_floor"]) + ".",
        "",
        "| κ | arm | ρ̂ | EMA acc.: gap, gap / F | raw acc.: gap, gap / F | disagreement, / F | lag / base lag | final EMA acc. | final raw acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for cell in summary["arms"]:
        gaps = ["", "", ""] if cell["arm"] == "base" else [
            f"{cell[key]['mean']:.3f}: {ratio(cell[key])}" for key in ("ema_accuracy_gap", "raw_accuracy_gap", "disagreement")
        ]  # fmt: skip
        lines.append(f"| {cell['kappa']} | {cell['arm']} | {cell['rho_hat']:.4f} | {' | '.join(gaps)} |"
                     f" {span(cell['lag_over_base'], 2)} | {span(cell['ema_accuracy_final'])} |"
                     f" {span(cell['raw_accuracy_final'])} |")  # fmt: skip
    closer = ", ".join(f"κ = {kappa}: {sum(seeds)} of {len(seeds)}" for kappa, seeds in
                       summary["rule_closer_per_seed"].items())  # fmt: skip
    lines += ["", f"Seeds on which the rule's EMA accuracy gap is smaller than the no-rule arm's: {closer}."]
    return "\n".join(lines)


def adam_rule(result: dict) -> str:
    summary = result["summary"]
    floor = summary["floor_interval"]
    lines = [
        f"F (the per-seed range): EMA CE {span(floor['ema_ce'])}; raw CE {span(floor['raw_ce'])}. Base peak EMA"
        f" accuracy {summary['base_peak_ema_acc']:.3f}.",
        "",
        "| κ | arm | ρ̂ | EMA CE gap, mean (min–max over seeds) | EMA CE gap / F | raw CE gap / F | peak EMA acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in summary["arms"]:
        ema = cell["ema_ce"]
        lines.append(f"| {cell['kappa']} | {cell['arm']} | {cell['rho_hat']:.4f} | {ema['mean']:.3f} ({ema['min']:.3f}–"
                     f"{ema['max']:.3f}) | {ratio(ema)} | {ratio(cell['raw_ce'])} | {cell['peak_ema_acc']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def pseudo_label(result: dict) -> str:
    summary, target = result["summary"], result["args"]["target"]
    lines = [
        "F (the per-seed range): " + span(summary["floor_interval"]) + " over every record; "
        + span(summary["late_floor_interval"]) + " after the first epoch (late).",
        "",
        f"| κ | arm | ρ̂ | gap (min–max) | gap / F | late gap / F | area | samples to {target} (per seed) |"
        " final teacher acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for cell in summary["arms"]:
        reached = ", ".join("never" if s is None else f"{s / 1000:.1f}k" for s in cell["samples_to_target"])
        if "gap" in cell:
            gap = cell["gap"]
            gaps = f"{gap['mean']:.4f} ({gap['min']:.4f}–{gap['max']:.4f}) | {ratio(gap)} | {ratio(cell['late_gap'])}"
        else:
            gaps = " | | "
        lines.append(f"| {cell['kappa']} | {cell['arm']} | {cell['rho_hat']:.4f} | {gaps} | {cell['area']:.3f} |"
                     f" {reached} | {cell['final_teacher_acc']:.4f} |")  # fmt: skip
    lines += ["", "Seeds on which the arm with the EMA rule is closer to the base run than the same arm without it:"
              f" {rule_against_no_rule(result, 'pseudo_acc')}."]  # fmt: skip
    return "\n".join(lines)


def self_supervised(result: dict, metrics: tuple[str, ...], names: dict[str, str]) -> str:
    summary = result["summary"]
    floors = "; ".join(
        f"{names[key]} {span(summary['floor_interval'][key])} (late {span(summary['late_floor_interval'][key])})"
        for key in metrics
    )
    probes = "; ".join(f"{key.replace('_', ' ')} probe {span(value)}"
                       for key, value in summary["probe_floor_interval"].items())  # fmt: skip
    lines = [
        f"F (the per-seed range): {floors}; {probes}; 1 − CKA {span(summary['cka_floor_interval'])}.",
        "",
        "| κ | arm | " + " | ".join(f"{names[key]} gap / F" for key in metrics)
        + " | linear probe, online | linear probe, teacher | teacher probe gap / F | 1 − CKA / F |"
        + (" RankMe / entropy / batch-mean entropy at the end |" if "rankme" in metrics else ""),
        "|---|---|" + "---|" * (len(metrics) + 4 + ("rankme" in metrics)),
    ]  # fmt: skip
    for cell in summary["arms"]:
        probes = f"{span(cell['linear_online'])} | {span(cell['linear_teacher'])}"
        ends = (
            " "
            + " / ".join(f"{cell[f'{key}_final']['mean']:.2f}" for key in ("rankme", "entropy", "mean_entropy"))
            + " |"
            if "rankme" in metrics
            else ""
        )
        if cell["arm"] == "base":
            lines.append(f"| {cell['kappa']} | base | " + " | " * len(metrics) + f"{probes} | | |{ends}")
            continue
        late = cell["shares_base_prefix"]  # the base run until it grows: judged on the records after that
        gaps = " | ".join(ratio(cell[f"{key}_late_gap" if late else f"{key}_gap"]) for key in metrics)
        name = cell["arm"] + (" (late)" if late else "")
        lines.append(f"| {cell['kappa']} | {name} | {gaps} | {probes} | {ratio(cell['linear_teacher_gap'])} |"
                     f" {ratio(cell['cka_gap'])} |{ends}")  # fmt: skip
    lines += ["", "Seeds on which the arm with the EMA rule, against the same arm without it, has the teacher's kNN"
              f" accuracy closer to the base run's: {rule_against_no_rule(result, 'knn_teacher')}; the higher"
              f" teacher linear probe: {rule_against_no_rule(result, 'linear_teacher', closer=False)}; the higher"
              f" online linear probe: {rule_against_no_rule(result, 'linear_online', closer=False)}."]  # fmt: skip
    if result.get("pilot"):
        pilot = result["pilot"]
        lines += ["", f"Pilot (seed 0): untrained backbone kNN {pilot['untrained_knn']:.4f}, linear probe"
                      f" {pilot['untrained_linear']:.4f}; trained with labels kNN {pilot['supervised_knn']:.4f},"
                      f" linear probe {pilot['supervised_linear']:.4f}."]  # fmt: skip
    return "\n".join(lines)


def _verdict(gap: dict) -> str:
    """``kept (1.3)``, or ``kept (1.3, fragile)``."""
    return f"{gap['verdict']} ({gap['over_floor']:.1f}{'' if gap['robust'] else ', fragile'})"


#: The growths of the self-supervised studies at their largest κ = K: (description, BYOL's arm, DINO's arm).
GROWTHS = (
    ("KB from the start, rule", "rule", "KB, rule"),
    ("KB from the start, no EMA rule", "no EMA rule", "KB, no EMA rule"),
    ("sharp jump to KB, rule", "sharp, rule", "sharp, rule"),
    ("sharp jump to KB, no EMA rule", "sharp, no EMA rule", "sharp, no EMA rule"),
    ("grown to KB, rule", "progressive", "progressive, rule"),
    ("grown to KB, no EMA rule", "progressive, no EMA rule", "progressive, no EMA rule"),
)
#: The summary's rows per study: (use, the arm's description, its arm name, the metric's summary key, the metric);
#: K in a description or an arm name stands for the study's largest κ.
SUMMARY_ROWS = {
    "polyak": [
        ("Polyak EMA, SGD", "lr × κ and ρ^κ", "rule", "ema_accuracy_gap", "EMA test acc."),
        ("Polyak EMA, SGD", "lr × κ, ρ per step", "no rule", "ema_accuracy_gap", "EMA test acc."),
    ],
    "pseudo-label": [
        ("pseudo-labelling teacher", "lr × κ and ρ^κ", "rule", "gap", "pseudo-label acc."),
        ("pseudo-labelling teacher", "lr × κ, ρ per step", "no EMA rule", "gap", "pseudo-label acc."),
        ("pseudo-labelling teacher", "grown to KB, rule", "progressive", "late_gap", "pseudo-label acc., late"),
    ],
    "byol": [
        ("BYOL teacher", name, arm, key, metric)
        for name, arm, _ in GROWTHS
        for key, metric in (("knn_teacher_gap", "teacher kNN"), ("linear_teacher_gap", "teacher linear probe"))
    ],
    "dino": [
        ("DINO teacher", name, arm, key, metric)
        for name, _, arm in GROWTHS
        for key, metric in (("linear_teacher_gap", "teacher linear probe"), ("rankme_gap", "RankMe"))
    ],
}


def summary(folders: list[Path]) -> str:
    """One table of the headline verdicts of the studies in ``folders`` (named as under docs/evidence/fashion-mnist).
    An arm that is the base run until its batch grows is judged on its late gap, as in its study's table; a row
    whose arm the study did not run raises."""
    kappas = [2, 4, 8, 16]
    lines = ["| use | arm | metric | " + " | ".join(f"κ = {k}" for k in kappas) + " |",
             "|---|---|---|" + "---|" * len(kappas)]  # fmt: skip
    for folder in folders:
        result = json.loads((folder / "results.json").read_text())
        top = max(result["args"]["kappas"])
        cells = {(cell["kappa"], cell["arm"]): cell for cell in result["summary"]["arms"]}
        for use, name, arm, key, metric in SUMMARY_ROWS[kind(result)]:
            arm, name = arm.replace("KB", f"{top}B"), name.replace("KB", f"{top}B" if "KB" in arm else "κB")
            row, metric_name = [], metric
            for kappa in kappas:
                cell = cells.get((kappa, arm))
                if cell is None:
                    row.append("")
                    continue
                late = cell.get("shares_base_prefix") and key.replace("_gap", "_late_gap") in cell
                row.append(_verdict(cell[key.replace("_gap", "_late_gap") if late else key]))
                metric_name = metric + (", late" if late and "late" not in metric else "")
            if not any(row):
                raise ValueError(f"{folder}/results.json has no arm {arm!r} at any of κ = {kappas}")
            lines.append(f"| {use} | {name} | {metric_name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def kind(result: dict) -> str:
    """Which study wrote ``result``: "polyak", "pseudo-label", "dino" or "byol" (by the keys of its summary)."""
    keys = {key for cell in result["summary"]["arms"] for key in cell}
    for name, key in (("polyak", "lag_over_base"), ("pseudo-label", "samples_to_target"), ("dino", "rankme_gap"),
                      ("byol", "knn_online_gap"), ("adam-rule", "ema_ce")):  # fmt: skip
        if key in keys:
            return name
    raise ValueError(f"a results.json of {result['args'].get('out_dir')} is not a study these tables know")


def table(folder: Path) -> str:
    """The Markdown table(s) of the study recorded in ``folder``."""
    result: dict[str, Any] = json.loads((folder / "results.json").read_text())
    study = kind(result)
    if study == "polyak":
        return polyak(result)
    if study == "pseudo-label":
        return pseudo_label(result)
    if study == "adam-rule":
        return adam_rule(result)
    if study == "dino":
        return self_supervised(result, ("knn_teacher", "rankme", "entropy", "mean_entropy"),
                               {"knn_teacher": "kNN teacher", "rankme": "RankMe", "entropy": "entropy",
                                "mean_entropy": "batch-mean entropy"})  # fmt: skip
    return self_supervised(
        result, ("knn_teacher", "knn_online"), {"knn_teacher": "kNN teacher", "knn_online": "kNN online"}
    )


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--summary":
        print(summary([Path(folder) for folder in sys.argv[2:]]))
        return
    for folder in sys.argv[1:]:
        print(f"<!-- {folder} -->\n{table(Path(folder))}\n")


if __name__ == "__main__":
    main()
