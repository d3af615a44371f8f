"""Polyak-Ruppert EMA of a small ResNet at kappa x the base batch, with the EMA Scaling Rule and without it.

    python examples/studies/supervised.py [--base-batch 32] [--kappas 2,4,8] [--epochs 16] [--train-samples 4096]
        [--momentum 0.99] [--lr 0.05] [--out-dir supervised] [--cifar10 ROOT]

Every run starts from the same initial weights and sees the same number of samples; all schedules run on
samples seen (``SampleClockLR`` with a warm-up and cosine decay). Runs:

* ``base``: batch B, EMA momentum rho, SGD lr;
* ``base, seed 1``: the same with another data order, which shows how far two equivalent runs drift apart;
* ``kappa K, rule``: batch K x B through ``EMAScalingCallback(base_batch_size=B, optimizer_rule="sgd")``:
  K x lr and rho^K;
* ``kappa K, no rule``: batch K x B with K x lr set by hand and rho unchanged (what an EMA tool that
  ignores the batch size does).

At the start and after every epoch it records, against samples seen: the EMA and the raw model's validation
accuracy; the fraction of validation images where the run's EMA model and the base run's predict different
classes; the EMA's lag ||EMA - raw weights||; and the weight-space distance from the run's EMA to the base
run's, relative to how far the base EMA has moved from the initial weights (between separately trained
networks that distance is dominated by run-to-run noise, which ``base, seed 1`` measures). Prints the table and
writes ``supervised.png`` and ``results.json`` to ``--out-dir``. The images are generated (ten noisy shifted
colour patterns, 20 % of the training labels replaced at random) unless ``--cifar10`` points to CIFAR-10.
About 20 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# examples/ on the path, so that `python examples/studies/supervised.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from emascale_examples.resnet import Classifier, generated_data
from emascale_examples.study import (
    add_data_arguments,
    check_train_samples,
    ema_and_raw_outputs,
    kappa_sweep_parser,
    save_figure,
    write_results,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback


class Probe(L.Callback):
    """At the start and after every epoch: samples seen, EMA and raw validation accuracy and predictions, the EMA's
    distance to the raw weights (its lag), and the flat EMA weights."""

    def __init__(self, ema: EMAScalingCallback, val: TensorDataset) -> None:
        self.ema, self.val = ema, val
        self.samples: list[int] = []
        self.ema_accuracy: list[float] = []
        self.raw_accuracy: list[float] = []
        self.lag: list[float] = []
        self.predictions: list[torch.Tensor] = []
        self.ema_weights: list[torch.Tensor] = []

    @torch.no_grad()
    def record(self, pl_module: L.LightningModule) -> None:
        x, y = self.val.tensors
        ema_logits, raw_logits = ema_and_raw_outputs(self.ema, pl_module, x)
        self.samples.append(self.ema.samples_seen)
        self.predictions.append(ema_logits.argmax(1))
        self.ema_accuracy.append(float((self.predictions[-1] == y).float().mean()))
        self.raw_accuracy.append(float((raw_logits.argmax(1) == y).float().mean()))
        weights = self.ema.ema_state_dict()
        names = [name for name, _ in pl_module.named_parameters()]
        self.ema_weights.append(torch.cat([weights[name].flatten().float() for name in names]))
        raw = torch.cat([parameter.detach().flatten().float() for parameter in pl_module.parameters()])
        self.lag.append(float((self.ema_weights[-1] - raw).norm()))

    def on_train_start(self, trainer, pl_module):
        self.record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.record(pl_module)


def cifar10(root: str, n_train: int) -> tuple[TensorDataset, TensorDataset]:  # pragma: no cover - downloads
    import torchvision

    def load(train: bool, n: int) -> TensorDataset:
        data = torchvision.datasets.CIFAR10(root, train=train, download=True)
        x = torch.tensor(data.data[:n]).permute(0, 3, 1, 2).float().div(255)
        return TensorDataset(x, torch.tensor(data.targets[:n]))

    return load(True, n_train), load(False, 10_000)


def fit(
    name: str,
    train: TensorDataset,
    val: TensorDataset,
    args: argparse.Namespace,
    kappa: int = 1,
    rule: bool = True,
    seed: int = 0,
) -> dict:
    """One run at ``kappa`` x the base batch; ``rule=False`` scales the LR by hand and leaves rho alone."""
    batch = kappa * args.base_batch
    torch.manual_seed(0)  # the same initial weights in every run
    model = Classifier(lr=args.lr if rule else kappa * args.lr)
    ema = EMAScalingCallback(
        momentum=args.momentum,
        base_batch_size=args.base_batch if rule else batch,
        optimizer_rule="sgd" if rule else "none",
        evaluate_with_ema=False,
    )
    probe = Probe(ema, val)
    loader = DataLoader(
        train, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[ema, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    print(
        f"{name:>18}: batch {batch:>4}, {ema.optimizer_steps:>5} steps, rho-hat {ema.ema_momentum:.6f},"
        f" EMA accuracy {probe.ema_accuracy[-1]:.4f}, raw {probe.raw_accuracy[-1]:.4f}",
        flush=True,
    )
    return {
        "name": name,
        "kappa": kappa,
        "rule": rule,
        "batch": batch,
        "momentum": ema.ema_momentum,
        "samples": probe.samples,
        "ema_accuracy": probe.ema_accuracy,
        "raw_accuracy": probe.raw_accuracy,
        "lag": probe.lag,
        "predictions": probe.predictions,
        "weights": probe.ema_weights,
    }


def add_distances(runs: list[dict]) -> None:
    """Per run and record, against the base run's EMA at the same samples seen:

    * ``disagreement``: the fraction of validation images where the two EMA models predict different classes;
    * ``distance``: ||EMA - base EMA|| / ||base EMA - initial weights|| in weight space.
    """
    base = runs[0]
    start = base["weights"][0]
    for run in runs:
        assert run["samples"] == base["samples"], (run["name"], run["samples"], base["samples"])
        pairs = list(zip(run["weights"], base["weights"]))
        run["distance"] = [float((ours - theirs).norm() / (theirs - start).norm()) for ours, theirs in pairs[1:]]
        run["distance"].insert(0, 0.0)
        run["disagreement"] = [
            float((ours != theirs).float().mean()) for ours, theirs in zip(run["predictions"], base["predictions"])
        ]


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    kappas = sorted({run["kappa"] for run in runs if run["kappa"] > 1})
    panels = (
        ("ema_accuracy", "EMA model validation accuracy"),
        ("raw_accuracy", "raw model validation accuracy"),
        ("disagreement", "EMA predictions differing from the base EMA's"),
        ("lag", "EMA lag ||EMA - raw weights||"),
    )
    for run in runs:
        if run["kappa"] == 1:
            style = {"color": "k", "ls": "-" if run["name"] == "base" else ":", "lw": 1.5}
        else:
            style = {"color": f"C{kappas.index(run['kappa'])}", "ls": "-" if run["rule"] else "--", "lw": 1.2}
        for axis, (key, _) in zip(axes.flat, panels):
            if key != "disagreement" or run["name"] != "base":
                axis.plot(run["samples"], run[key], label=run["name"], **style)
    for axis, (_, label) in zip(axes.flat, panels):
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("samples seen")
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, path, title)


def print_milestones(runs: list[dict], marks: tuple[int, ...], level: float) -> None:
    """Per run, read off its records (and stored in it): the EMA's and the raw model's accuracy at each of the
    ``marks`` (samples seen; each must be a record), and the samples seen at the first record where the EMA's and the
    raw model's accuracy reach ``level`` (None: never)."""
    print(f"\nAt {', '.join(map(str, marks))} samples, and the samples seen until the accuracy first reaches {level}:")
    for run in runs:
        index = [run["samples"].index(mark) for mark in marks]
        run["ema_accuracy_at"] = {str(mark): run["ema_accuracy"][i] for mark, i in zip(marks, index)}
        run["raw_accuracy_at"] = {str(mark): run["raw_accuracy"][i] for mark, i in zip(marks, index)}
        for key in ("ema_accuracy", "raw_accuracy"):
            reached = next((s for s, a in zip(run["samples"], run[key]) if a >= level), None)
            run[f"{key.split('_')[0]}_samples_to_{level}"] = reached
        at = " ".join(f"EMA {run['ema_accuracy_at'][str(m)]:.3f} raw {run['raw_accuracy_at'][str(m)]:.3f}" for m in marks)
        print(f"{run['name']:>18}: {at}; to {level}: EMA {run[f'ema_samples_to_{level}']},"
              f" raw {run[f'raw_samples_to_{level}']}")


def main() -> None:
    parser = kappa_sweep_parser(__doc__, epochs=16, lr=0.05, out_dir="supervised")
    add_data_arguments(parser, fashion_mnist=False)
    args = parser.parse_args()
    check_train_samples(parser, args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    if args.cifar10:
        train, val = cifar10(args.cifar10, args.train_samples)
    else:
        train, val = generated_data(args.train_samples, args.val_samples)

    runs = [fit("base", train, val, args), fit("base, seed 1", train, val, args, seed=1)]
    for kappa in args.kappas:
        runs.append(fit(f"kappa {kappa}, rule", train, val, args, kappa=kappa))
        runs.append(fit(f"kappa {kappa}, no rule", train, val, args, kappa=kappa, rule=False))
    add_distances(runs)

    n = len(runs[0]["samples"])
    print(
        f"\nAfter {runs[0]['samples'][-1]} samples (base batch {args.base_batch}, rho {args.momentum}). The last four"
    )
    print(
        f"columns are means over the {n} records (the start and every epoch); all but the lag compare with the base run:"
    )
    header = ("run", "batch", "rho-hat", "EMA acc", "raw acc", "|EMA acc - base|", "disagree", "lag", "weight dist")
    print("{:>18} {:>6} {:>9} {:>8} {:>8} {:>16} {:>9} {:>8} {:>11}".format(*header))
    for run in runs:
        run["mean_accuracy_gap"] = sum(abs(a - b) for a, b in zip(run["ema_accuracy"], runs[0]["ema_accuracy"])) / n
        run["mean_disagreement"] = sum(run["disagreement"]) / n
        run["mean_lag"] = sum(run["lag"]) / n
        run["mean_distance"] = sum(run["distance"][1:]) / (n - 1)
        print(
            f"{run['name']:>18} {run['batch']:>6} {run['momentum']:>9.6f} {run['ema_accuracy'][-1]:>8.4f}"
            f" {run['raw_accuracy'][-1]:>8.4f} {run['mean_accuracy_gap']:>16.4f} {run['mean_disagreement']:>9.4f}"
            f" {run['mean_lag']:>8.3f} {run['mean_distance']:>11.4f}"
        )
    total = runs[0]["samples"][-1]  # a quarter and half of the run, where those are records (16384 and 32768 by default)
    print_milestones(runs, tuple(m for m in (total // 4, total // 2) if m in runs[0]["samples"]), level=0.5)
    data = "CIFAR-10" if args.cifar10 else "generated patterns"
    title = f"ResNet-8 on {data}: Polyak EMA, base batch {args.base_batch}, rho {args.momentum}"
    plot(runs, args.out_dir / "supervised.png", title)
    for run in runs:
        del run["weights"], run["predictions"]
    write_results(args, "supervised.png", runs=runs)


if __name__ == "__main__":
    main()
