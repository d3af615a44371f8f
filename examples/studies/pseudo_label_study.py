"""Pseudo-labelling with an EMA teacher at kappa x the base batch: with the rule, without it, progressively.

    python examples/studies/pseudo_label_study.py [--base-batch 32] [--kappas 2,4,8] [--seeds 3] [--epochs 8]
        [--momentum 0.99] [--lr 0.05] [--target 0.85] [--unlabeled 4096] [--out-dir pseudo_label_study]
        [--fashion-mnist [DIR] [--labeled 1000] [--val-samples 2048]]

The task (``emascale_examples.pseudo``): overlapping Gaussian clusters, 4 labels per class, ``--unlabeled``
points; or with ``--fashion-mnist``, ``--labeled`` training images (the same number per class), ``--unlabeled``
other training images and ``--val-samples`` test images, as standardized pixel vectors; the student (an MLP, SGD) trains on the labelled batch plus the EMA teacher's confident pseudo-labels
on the unlabelled batch; κ is counted on the unlabelled stream. On this task the labels alone reach ~0.76
validation accuracy and pseudo-labels ~0.91 (``python examples/pseudo_label.py``); docs/results.md gives the
Fashion-MNIST run's setting. A seed fixes the data, the
initial weights and the data order of every arm. Per seed:

* ``base``: unlabelled batch B; ``floor``: the base with another data order and augmentation noise;

and at every kappa, unlabelled batch K x B (labelled K x B / 4):

* ``rule``: ``optimizer_rule="sgd"`` (lr x K) and rho^K;
* ``no EMA rule``: lr x K, rho per step (``momentum=rho^(1/K)``): isolates the EMA rule;
* ``no rule``: lr x K set by hand, rho per step (what a tool that ignores the batch size does; the same
  training as ``no EMA rule``, so it checks the isolation);

and at the largest kappa ``progressive``: the rule, batch B through the warm-up (the first epoch), then K x B
(the paper's Algorithm 1).

Recorded at the start and after every epoch (the same unlabelled samples seen in every arm): the teacher's
pseudo-label accuracy on the whole unlabelled pool, its validation accuracy. Per arm: the paired gap of the
pseudo-label accuracy curve to the base (mean over records of |arm - base|) against the noise floor F (the
floor runs' gap), with the verdicts decided in advance (kept <= 1.5 F, separated > 3 F); the area under the
pseudo-label accuracy curve (per sample, so 1.0 is perfect from the start); the samples seen until it first
reaches ``--target``; the final teacher accuracy. Writes ``pseudo_label_study.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

# examples/ on the path, so that `python examples/studies/pseudo_label_study.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emascale_examples.fashion_mnist import DEBIAN_FOLDER
from emascale_examples.paired import floor_summary, gap_summary, mean_gap, verdict_text
from emascale_examples.pseudo import few_label_clusters, few_label_fashion_mnist, fit_pseudo_labeler
from emascale_examples.study import kappa_sweep_parser, save_figure, write_results

from lightning_emascale import ProgressiveBatchCallback

ARMS = ("rule", "no EMA rule", "no rule")


def run_arm(arm: str, kappa: int, seed: int, data: tuple, args: argparse.Namespace) -> dict:
    base, rho = args.base_batch, args.momentum
    batch, lr, callbacks = kappa * base, args.lr, ()
    options: dict[str, Any] = {"momentum": rho, "base_batch_size": base, "optimizer_rule": "sgd"}
    if arm == "no EMA rule":
        options["momentum"] = rho ** (1 / kappa)  # raised to the kappa-th power by the callback: rho per step
    if arm == "no rule":
        options = {"momentum": rho ** (1 / kappa), "base_batch_size": base, "optimizer_rule": None}
        lr = kappa * args.lr  # the LR scaled by hand, as a user without the rule would
    if arm == "progressive":
        batch, callbacks = base, (ProgressiveBatchCallback({0: base, 1: kappa * base}),)
    order = seed + (1000 if arm == "floor" else 0)
    ema, probe = fit_pseudo_labeler(data, batch, args.epochs, options, lr, seed=seed, order=order, callbacks=callbacks)
    records = probe.records
    print(
        f"seed {seed} {arm:>12} kappa {kappa}: {ema.optimizer_steps:>4} steps, rho-hat {ema.ema_momentum:.5f},"
        f" pseudo-label acc {records['pseudo_acc'][-1]:.4f}, teacher acc {records['teacher_acc'][-1]:.4f}",
        flush=True,
    )
    return {"arm": arm, "kappa": kappa, "seed": seed, "rho_hat": ema.ema_momentum, **records}


def area(run: dict) -> float:
    """The area under pseudo-label accuracy against samples seen, over the samples seen (trapezoids)."""
    s, a = run["samples"], run["pseudo_acc"]
    return sum((s[i + 1] - s[i]) * (a[i + 1] + a[i]) / 2 for i in range(len(s) - 1)) / s[-1]


def samples_to(run: dict, target: float) -> Optional[int]:
    """The samples seen at the first record where pseudo-label accuracy reaches ``target`` (None: never)."""
    return next((s for s, a in zip(run["samples"], run["pseudo_acc"]) if a >= target), None)


def _after_first_epoch(run: dict) -> dict:
    """The records after the first epoch: the progressive arm trains exactly as the base until then, so its
    gap over every record would count that shared prefix (by construction, not a result) as agreement."""
    return {"samples": run["samples"][2:], "pseudo_acc": run["pseudo_acc"][2:]}


def summarize(runs: list[dict], cells: list[tuple[int, str]], seeds: int, target: float) -> dict:
    base = {run["seed"]: run for run in runs if run["arm"] == "base"}
    late = {run["seed"]: _after_first_epoch(run) for run in runs if run["arm"] == "base"}
    floors = [run for run in runs if run["arm"] == "floor"]
    floor_interval = floor_summary([mean_gap(run, base[run["seed"]], "pseudo_acc") for run in floors])
    late_interval = floor_summary([mean_gap(_after_first_epoch(run), late[run["seed"]], "pseudo_acc")
                                   for run in floors])  # fmt: skip
    floor, late_floor = floor_interval["mean"], late_interval["mean"]
    summary: dict[str, Any] = {"floor": floor, "late_floor": late_floor, "floor_interval": floor_interval,
                               "late_floor_interval": late_interval, "arms": []}  # fmt: skip
    for kappa, arm in [(1, "base"), (1, "floor"), *cells]:
        chosen = [run for run in runs if run["arm"] == arm and run["kappa"] == kappa]
        reached = [samples_to(run, target) for run in chosen]
        cell = {
            "kappa": kappa,
            "arm": arm,
            "rho_hat": chosen[0]["rho_hat"],
            "area": statistics.fmean(area(run) for run in chosen),
            "samples_to_target": reached,
            "final_teacher_acc": statistics.fmean(run["teacher_acc"][-1] for run in chosen),
            "final_pseudo_acc": statistics.fmean(run["pseudo_acc"][-1] for run in chosen),
        }
        if arm != "base":
            gaps = [mean_gap(run, base[run["seed"]], "pseudo_acc") for run in chosen]
            cell["gap"] = gap_summary(gaps, floor, (floor_interval["min"], floor_interval["max"]))
            late_gaps = [mean_gap(_after_first_epoch(run), late[run["seed"]], "pseudo_acc") for run in chosen]
            cell["late_gap"] = gap_summary(late_gaps, late_floor, (late_interval["min"], late_interval["max"]))
        summary["arms"].append(cell)
    return summary


def plot(runs: list[dict], kappas: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kappas), figsize=(5 * len(kappas), 4), sharey=True, squeeze=False)
    colours = {"rule": "C0", "no EMA rule": "C1", "no rule": "C3", "progressive": "C2"}
    for axis, kappa in zip(axes[0], kappas):
        for run in runs:
            if run["seed"] != 0 or run["kappa"] not in (1, kappa):
                continue
            if run["kappa"] == 1:
                style = {"color": "k", "ls": "-" if run["arm"] == "base" else ":", "lw": 1.5}
            else:
                style = {"color": colours[run["arm"]], "lw": 1.2, "ls": "--" if run["arm"] == "no rule" else "-"}
            axis.plot(run["samples"], run["pseudo_acc"], label=run["arm"], **style)
        axis.set_title(f"kappa {kappa} (seed 0)")
        axis.set_xlabel("unlabelled samples seen")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("teacher pseudo-label accuracy on the unlabelled pool")
    axes[0, -1].legend(fontsize=7)
    save_figure(fig, path, title)


def main() -> None:
    parser = kappa_sweep_parser(__doc__, epochs=8, lr=0.05, out_dir="pseudo_label_study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.85, help="pseudo-label accuracy for samples-to-target")
    parser.add_argument("--unlabeled", type=int, default=4096)
    parser.add_argument("--labeled", type=int, default=1000, help="labelled images per seed (Fashion-MNIST)")
    parser.add_argument("--val-samples", type=int, default=2048, help="held-out images per seed (Fashion-MNIST)")
    parser.add_argument("--fashion-mnist", nargs="?", const=str(DEBIAN_FOLDER), metavar="DIR",
                        help=f"real images: Fashion-MNIST's IDX files from DIR (default {DEBIAN_FOLDER}); the labelled"
                             " images and the pool from its training split, the held-out ones from its test split;"
                             " without it, the generated clusters")  # fmt: skip
    args = parser.parse_args()
    if args.unlabeled % (max(args.kappas) * args.base_batch):
        parser.error(f"--unlabeled must be a multiple of the largest batch {max(args.kappas) * args.base_batch}")
    if args.fashion_mnist and not (0 < args.labeled and args.labeled + args.unlabeled <= 60_000):
        parser.error(f"--labeled and --unlabeled must be positive and together at most Fashion-MNIST's 60000 training"
                     f" images, got {args.labeled} and {args.unlabeled}")  # fmt: skip
    if args.fashion_mnist and not 0 < args.val_samples <= 10_000:
        parser.error(f"--val-samples must be in [1, 10000] (Fashion-MNIST's test split), got {args.val_samples}")
    if args.seeds < 1 or args.epochs < 2:
        parser.error("--seeds must be at least 1 and --epochs at least 2 (the progressive arm grows after one)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cells = [(kappa, arm) for kappa in args.kappas for arm in ARMS] + [(max(args.kappas), "progressive")]
    runs = []
    for seed in range(args.seeds):
        data = (few_label_fashion_mnist(seed, args.labeled, args.unlabeled, args.val_samples, args.fashion_mnist)
                if args.fashion_mnist else few_label_clusters(seed, unlabeled=args.unlabeled))  # fmt: skip
        runs += [run_arm("base", 1, seed, data, args), run_arm("floor", 1, seed, data, args)]
        runs += [run_arm(arm, kappa, seed, data, args) for kappa, arm in cells]
    summary = summarize(runs, cells, args.seeds, args.target)

    interval, late_interval = summary["floor_interval"], summary["late_floor_interval"]
    print(
        f"\nNoise floor F (mean over {args.seeds} seeds of the floor run's pseudo-label accuracy gap, and the per-seed"
        f" range): {interval['mean']:.4f} ({interval['min']:.4f}-{interval['max']:.4f}) over every record,"
        f" {late_interval['mean']:.4f} ({late_interval['min']:.4f}-{late_interval['max']:.4f}) after the first"
        " epoch (the late gap, where the progressive arm no longer shares the base's run). Kept: gap <= 1.5 F;"
        " separated: > 3 F; fragile: the verdict changes within F's range."
    )
    header = ("kappa", "arm", "rho-hat", "gap", "(min-max)", "/ F (F's range) verdict", "late: the same", "area",
              "to target", "teacher acc")  # fmt: skip
    print("{:>5} {:>12} {:>8} {:>8} {:>15} {:>34} {:>34} {:>7} {:>22} {:>11}".format(*header))
    for cell in summary["arms"]:
        gap, late_gap = cell.get("gap"), cell.get("late_gap")
        numbers = (
            f"{gap['mean']:>8.4f} {gap['min']:.4f}-{gap['max']:.4f} {verdict_text(gap):>34}"
            f" {verdict_text(late_gap):>34}"
            if gap and late_gap
            else f"{'':>8} {'':>15} {'':>34} {'':>34}"
        )
        reached = ",".join("never" if s is None else str(s) for s in cell["samples_to_target"])
        print(
            f"{cell['kappa']:>5} {cell['arm']:>12} {cell['rho_hat']:>8.5f} {numbers} {cell['area']:>7.4f}"
            f" {reached:>22} {cell['final_teacher_acc']:>11.4f}"
        )
    data = "Fashion-MNIST, " if args.fashion_mnist else ""
    title = f"Pseudo-labelling with an EMA teacher: {data}base batch {args.base_batch}, rho {args.momentum}"
    plot(runs, args.kappas, args.out_dir / "pseudo_label_study.png", title)
    write_results(args, "pseudo_label_study.png", summary=summary, runs=runs)


if __name__ == "__main__":
    main()
