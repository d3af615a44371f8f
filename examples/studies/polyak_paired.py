"""A Polyak EMA of the small ResNet at kappa x the base batch, with the EMA Scaling Rule and without it: paired seeds.

    python examples/studies/polyak_paired.py [--fashion-mnist [DIR]] [--base-batch 32] [--kappas 2,4,8,16]
        [--seeds 3] [--epochs 4] [--train-samples 12288] [--val-samples 2048] [--record-every 4096]
        [--momentum 0.99] [--lr 0.05] [--out-dir polyak_paired]

The paired-seed version of ``supervised.py``, for real images: Fashion-MNIST with ``--fashion-mnist`` (a seed's
random subset of the training split to train on, and of the test split to measure on), else the generated
patterns (the same images for every seed). The model is the ResNet-8 of ``supervised.py`` (one input channel on
Fashion-MNIST), SGD with momentum, a warm-up and a cosine on samples seen; EMA momentum rho at the base batch B. A
seed fixes the initial weights, the data order and (on Fashion-MNIST) the images of every arm. Per seed:

* ``base``: batch B; ``floor``: the base with another data order;

and at every kappa K, batch K x B:

* ``rule``: ``EMAScalingCallback(base_batch_size=B, optimizer_rule="sgd")``: lr x K and rho^K;
* ``no rule``: lr x K set by hand and rho per step (what an EMA tool that ignores the batch size does). Both arms
  train the same raw model (bit for bit with K a power of two, which the script requires): only the EMA differs.

Recorded at the start and every ``--record-every`` samples (the same samples seen in every arm), on the held-out
images: the EMA's and the raw model's accuracy, the EMA's predictions, and its lag ||EMA - raw weights||. Per arm,
paired with its seed's base run: the EMA accuracy gap (mean over records of |arm - base|) against the noise floor F
(the floor runs' gap) with F's per-seed interval and the verdicts of ``emascale_examples.paired`` (decided before
any run); the raw accuracy gap against the raw floor (the optimizer's share); the EMA's disagreement with the base
EMA's predictions; the lag over the base run's lag. Writes ``polyak_paired.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# examples/ on the path, so that `python examples/studies/polyak_paired.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from emascale_examples.paired import floor_summary, gap_summary, mean_gap, verdict_text
from emascale_examples.resnet import Classifier, generated_data
from emascale_examples.study import (
    add_data_arguments,
    check_fashion_mnist_sizes,
    ema_and_raw_outputs,
    kappa_sweep_parser,
    save_figure,
    write_results,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback


class Recorder(L.Callback):
    """At the start and whenever the samples seen reach a multiple of ``every``: the EMA's and the raw model's
    accuracy on the held-out images, the EMA's predictions, and its lag ||EMA - raw weights|| (parameters)."""

    def __init__(self, ema: EMAScalingCallback, held_out: TensorDataset, every: int) -> None:
        self.ema, self.held_out, self.every = ema, held_out, every
        self.records: dict[str, list] = {"samples": [], "ema_accuracy": [], "raw_accuracy": [], "lag": []}
        self.predictions: list[torch.Tensor] = []

    @torch.no_grad()
    def record(self, module: L.LightningModule) -> None:
        x, y = self.held_out.tensors
        averaged, raw = ema_and_raw_outputs(self.ema, module, x)
        self.predictions.append(averaged.argmax(1))
        weights = self.ema.ema_state_dict()
        names = [name for name, _ in module.named_parameters()]
        ema_flat = torch.cat([weights[name].flatten().float() for name in names])
        raw_flat = torch.cat([parameter.detach().flatten().float() for parameter in module.parameters()])
        self.records["samples"].append(self.ema.samples_seen)
        self.records["ema_accuracy"].append(float((self.predictions[-1] == y).float().mean()))
        self.records["raw_accuracy"].append(float((raw.argmax(1) == y).float().mean()))
        self.records["lag"].append(float((ema_flat - raw_flat).norm()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema.samples_seen % self.every == 0 and self.ema.samples_seen > self.records["samples"][-1]:
            self.record(pl_module)


def seed_data(args: argparse.Namespace, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The seed's training and held-out images: Fashion-MNIST subsets, or the generated patterns."""
    if args.fashion_mnist:
        from emascale_examples import fashion_mnist

        x, y, _ = fashion_mnist.subset("train", args.train_samples, seed, args.fashion_mnist)
        x_val, y_val, _ = fashion_mnist.subset("test", args.val_samples, seed, args.fashion_mnist)
        return TensorDataset(x, y), TensorDataset(x_val, y_val)
    return generated_data(args.train_samples, args.val_samples)


def fit(arm: str, kappa: int, seed: int, data: tuple[TensorDataset, TensorDataset], args: argparse.Namespace) -> dict:
    """One run; ``arm`` is "base", "floor", "rule" or "no rule"."""
    train, held_out = data
    batch, rule = kappa * args.base_batch, arm != "no rule"
    torch.manual_seed(seed)  # the seed's initial weights, in every arm
    model = Classifier(lr=args.lr if rule else kappa * args.lr, channels=train.tensors[0].shape[1])
    ema = EMAScalingCallback(
        momentum=args.momentum,
        base_batch_size=args.base_batch if rule else batch,  # no rule: every batch is the base, so rho per step
        optimizer_rule="sgd" if rule else "none",
        evaluate_with_ema=False,
        total_samples=args.epochs * args.train_samples,
    )
    recorder = Recorder(ema, held_out, args.record_every)
    order = seed + (1000 if arm == "floor" else 0)
    loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(order))  # fmt: skip
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[ema, recorder], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    records = recorder.records
    assert records["samples"][-1] == args.epochs * args.train_samples, records["samples"]
    print(f"seed {seed} {arm:>8} kappa {kappa:>2}: batch {batch:>4}, {ema.optimizer_steps:>4} steps,"
          f" rho-hat {ema.ema_momentum:.6f}, EMA accuracy {records['ema_accuracy'][-1]:.4f},"
          f" raw {records['raw_accuracy'][-1]:.4f}, {seconds:.0f} s", flush=True)  # fmt: skip
    return {"arm": arm, "kappa": kappa, "seed": seed, "batch": batch, "rho_hat": ema.ema_momentum,
            "seconds": seconds, **records, "predictions": recorder.predictions}  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    """Per arm: the paired gaps to the base against the floors, with their intervals; the disagreement with the
    base EMA's predictions; the lag over the base's; per seed, whether the rule's EMA gap is below the no-rule one."""
    base = {run["seed"]: run for run in runs if run["arm"] == "base"}
    for run in runs:
        pairs = zip(run["predictions"], base[run["seed"]]["predictions"])
        run["disagreement"] = [float((ours != theirs).float().mean()) for ours, theirs in pairs]
    for run in runs:
        del run["predictions"]
    floors = [run for run in runs if run["arm"] == "floor"]
    floor = {key: floor_summary([mean_gap(run, base[run["seed"]], key) for run in floors])
             for key in ("ema_accuracy", "raw_accuracy")}  # fmt: skip
    disagreement_floor = floor_summary([statistics.fmean(run["disagreement"]) for run in floors])
    summary: dict[str, Any] = {"floor": floor, "disagreement_floor": disagreement_floor, "arms": []}
    for kappa, arm in dict.fromkeys((run["kappa"], run["arm"]) for run in runs):
        chosen = [run for run in runs if run["arm"] == arm and run["kappa"] == kappa]
        cell: dict[str, Any] = {"kappa": kappa, "arm": arm, "rho_hat": chosen[0]["rho_hat"]}
        for key in ("ema_accuracy", "raw_accuracy"):
            finals = [run[key][-1] for run in chosen]
            cell[f"{key}_final"] = {"mean": statistics.fmean(finals), "min": min(finals), "max": max(finals)}
        lag_ratios = [statistics.fmean(run["lag"]) / statistics.fmean(base[run["seed"]]["lag"]) for run in chosen]
        cell["lag_over_base"] = {"mean": statistics.fmean(lag_ratios), "min": min(lag_ratios), "max": max(lag_ratios)}
        if arm != "base":
            for key in ("ema_accuracy", "raw_accuracy"):
                gaps = [mean_gap(run, base[run["seed"]], key) for run in chosen]
                cell[f"{key}_gap"] = gap_summary(gaps, floor[key]["mean"], (floor[key]["min"], floor[key]["max"]))
            cell["disagreement"] = gap_summary([statistics.fmean(run["disagreement"]) for run in chosen],
                                               disagreement_floor["mean"],
                                               (disagreement_floor["min"], disagreement_floor["max"]))  # fmt: skip
        summary["arms"].append(cell)
    by = {(run["seed"], run["kappa"], run["arm"]): run for run in runs}
    summary["rule_closer_per_seed"] = {
        str(kappa): [
            mean_gap(by[seed, kappa, "rule"], base[seed], "ema_accuracy")
            < mean_gap(by[seed, kappa, "no rule"], base[seed], "ema_accuracy")
            for seed in sorted(base)
        ]
        for kappa in sorted({run["kappa"] for run in runs if run["kappa"] > 1})
    }
    return summary


def print_summary(summary: dict, records: int) -> None:
    floor = summary["floor"]

    def span(interval: dict) -> str:
        return f"{interval['mean']:.4f} ({interval['min']:.4f}-{interval['max']:.4f})"

    print(
        f"\nNoise floors F, the mean over seeds of the floor run's gap (per-seed range): EMA accuracy"
        f" {span(floor['ema_accuracy'])}, raw accuracy {span(floor['raw_accuracy'])}, disagreement with the base"
        f" EMA {span(summary['disagreement_floor'])}. Gaps are means over the {records} records of |arm - base|."
    )
    print("Kept: gap <= 1.5 F; separated: > 3 F; inconclusive between; 'fragile': the verdict changes within F's"
          " range. Gap / F (range over F's interval) verdict.")  # fmt: skip
    header = ("kappa", "arm", "rho-hat", "EMA acc gap / F", "raw acc gap / F", "disagree / F", "lag / base",
              "final EMA", "final raw")  # fmt: skip
    print("{:>5} {:>8} {:>8} {:>30} {:>30} {:>30} {:>16} {:>9} {:>9}".format(*header))
    for cell in summary["arms"]:
        lag = cell["lag_over_base"]
        gaps = ["", "", ""] if cell["arm"] == "base" else [
            verdict_text(cell[key]) for key in ("ema_accuracy_gap", "raw_accuracy_gap", "disagreement")
        ]  # fmt: skip
        print(f"{cell['kappa']:>5} {cell['arm']:>8} {cell['rho_hat']:>8.5f} {gaps[0]:>30} {gaps[1]:>30}"
              f" {gaps[2]:>30} {lag['mean']:>5.2f} ({lag['min']:.2f}-{lag['max']:.2f})"
              f" {cell['ema_accuracy_final']['mean']:>9.4f} {cell['raw_accuracy_final']['mean']:>9.4f}")  # fmt: skip
    print("The rule's EMA accuracy gap below the no-rule one, per seed:", summary["rule_closer_per_seed"])


def plot(runs: list[dict], kappas: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(kappas), figsize=(4 * len(kappas), 6.5), sharex=True, sharey="row", squeeze=False)
    for column, kappa in enumerate(kappas):
        for run in runs:
            if run["seed"] != 0 or run["kappa"] not in (1, kappa):
                continue
            if run["kappa"] == 1:
                style = {"color": "k", "ls": "-" if run["arm"] == "base" else ":", "lw": 1.5}
            else:
                style = {"color": "C0" if run["arm"] == "rule" else "C3", "lw": 1.2}
            axes[0, column].plot(run["samples"], run["ema_accuracy"], label=run["arm"], **style)
            axes[1, column].plot(run["samples"], run["lag"], label=run["arm"], **style)
        axes[0, column].set_title(f"kappa {kappa} (seed 0)")
        axes[1, column].set_xlabel("samples seen")
    axes[0, 0].set_ylabel("EMA accuracy, held-out images")
    axes[1, 0].set_ylabel("EMA lag ||EMA - raw weights||")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    save_figure(fig, path, title)


def main() -> None:
    parser = kappa_sweep_parser(__doc__, epochs=4, lr=0.05, out_dir="polyak_paired")
    add_data_arguments(parser)
    parser.set_defaults(kappas=[2, 4, 8, 16], train_samples=12288)
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds")
    parser.add_argument("--record-every", type=int, default=4096, help="samples between records")
    args = parser.parse_args()
    largest = max(args.kappas) * args.base_batch
    for name in ("train_samples", "record_every"):
        if getattr(args, name) % largest:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of the largest batch {largest},"
                         f" got {getattr(args, name)}")  # fmt: skip
    if any(k < 1 or k & (k - 1) for k in args.kappas):
        parser.error(f"--kappas must be powers of two (every arm then sees whole batches and the same records),"
                     f" got {args.kappas}")  # fmt: skip
    if (args.epochs * args.train_samples) % args.record_every:
        parser.error(f"--record-every must divide the run's {args.epochs * args.train_samples} samples"
                     f" (--epochs x --train-samples), got {args.record_every}")  # fmt: skip
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    check_fashion_mnist_sizes(parser, args)
    if args.cifar10:
        parser.error("--cifar10: this study takes --fashion-mnist or the generated patterns")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        data = seed_data(args, seed)
        runs += [fit("base", 1, seed, data, args), fit("floor", 1, seed, data, args)]
        runs += [fit(arm, kappa, seed, data, args) for kappa in args.kappas for arm in ("rule", "no rule")]
    summary = summarize(runs)
    print_summary(summary, len(runs[0]["samples"]))
    name = "Fashion-MNIST" if args.fashion_mnist else "generated patterns"
    title = f"ResNet-8 on {name}: Polyak EMA, base batch {args.base_batch}, rho {args.momentum}"
    plot(runs, args.kappas, args.out_dir / "polyak_paired.png", title)
    write_results(args, "polyak_paired.png", summary=summary, runs=runs)


if __name__ == "__main__":
    main()
