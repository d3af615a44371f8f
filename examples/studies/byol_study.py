"""A small BYOL study: base batch against kappa x base, with and without the EMA Scaling Rule, and progressive.

    python examples/studies/byol_study.py [--base-batch 32] [--kappa 4] [--epochs 8] [--train-samples 1024]
        [--knn-samples 512] [--grow-at 2] [--out-dir byol_study] [--cifar10 ROOT]

The model is ``examples/byol.py``'s (``emascale_examples.selfsup.BYOL``: lightly's BYOL example, ResNet-18)
with its teacher moved by ``EMAScalingCallback``: momentum 0.99 -> 1 on a cosine of samples seen. Every run
starts from the same weights and sees the same number of samples. Runs:

* ``base``: batch B, SGD lr 0.06, teacher momentum rho(s);
* ``base, seed 1``: the same with other data order and augmentations: how far two equivalent runs differ;
* ``kappa K, rule``: batch K x B from the start, K x lr and rho(s)^K (the callback's SGD rule and EMA rule);
* ``kappa K, no rule``: batch K x B, K x lr set by hand, rho(s) unchanged (a teacher update that ignores
  the batch size, as lightly's ``update_momentum`` does);
* ``kappa K, progressive``: batch B until epoch ``--grow-at``, then K x B, with both rules (the paper's
  progressive scaling: start at the base batch through the optimizer's early phase, then grow).

At the start and after every epoch it measures the kNN accuracy (k=20) of the online backbone on held-out
images; the loss, the global batch, the teacher momentum and the teacher's lag ||teacher - online|| are
recorded per step. Prints the table and writes ``byol_study.png`` (kNN accuracy, loss, the teacher's decay per
base batch of samples and its lag, all against samples seen) and ``results.json`` to ``--out-dir``. About 25 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# examples/ on the path, so that `python examples/studies/byol_study.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from emascale_examples.selfsup import BYOL, BYOL_TEACHERS, ImageData, knn_accuracy
from emascale_examples.study import write_results

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback


@torch.no_grad()
def teacher_lag(model: BYOL) -> float:
    """||teacher - online|| over the parameters the teacher averages (backbone and projection head)."""
    squares = [
        (teacher - online).pow(2).sum()
        for online_name, teacher_name in BYOL_TEACHERS.items()
        for online, teacher in zip(getattr(model, online_name).parameters(), getattr(model, teacher_name).parameters())
    ]
    return float(torch.stack(squares).sum().sqrt())


class Curves(L.Callback):
    """Per optimizer step: samples seen after it, loss, global batch, rho-hat, teacher lag; per epoch: kNN accuracy."""

    def __init__(self, ema: EMAScalingCallback, data: ImageData) -> None:
        self.ema, self.data = ema, data
        self.steps: list[tuple[int, float, float, float]] = []
        self.knn: list[tuple[int, float]] = []
        self._step = 0

    def on_train_start(self, trainer, pl_module):
        self.knn.append((0, knn_accuracy(pl_module.backbone, self.data)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:
            before = self.steps[-1][0] if self.steps else 0
            samples = self.ema.samples_seen
            lag = teacher_lag(pl_module)
            self.steps.append((samples, float(outputs["loss"]), samples - before, self.ema.ema_momentum, lag))

    def on_train_epoch_end(self, trainer, pl_module):
        self.knn.append((self.ema.samples_seen, knn_accuracy(pl_module.backbone, self.data)))


def fit(name: str, schedule: dict[int, int], args: argparse.Namespace, rule: bool = True, seed: int = 0) -> dict:
    """One BYOL run on ``schedule`` (epoch -> batch); ``rule=False`` scales the LR by hand and leaves rho alone.

    Every run starts from the same initial weights; ``seed`` draws the data order and the augmentations.
    """
    L.seed_everything(0, verbose=False)
    first = schedule[0]
    kappa = first // args.base_batch
    data = ImageData(
        "byol", batch_size=first, n_train=args.train_samples, n_val=args.knn_samples, cifar10_root=args.cifar10
    )
    model = BYOL(lr=0.06 if rule else kappa * 0.06)
    torch.manual_seed(1000 + seed)
    ema = EMAScalingCallback(
        momentum=0.99,
        momentum_schedule="cosine",
        final_momentum=1.0,
        base_batch_size=args.base_batch if rule else first,
        optimizer_rule="sgd" if rule else "none",
        teachers=BYOL_TEACHERS,
    )
    curves = Curves(ema, data)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[ProgressiveBatchCallback(schedule), ema, curves],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    teacher = knn_accuracy(model.backbone_momentum, data)
    print(
        f"{name:>22}: {ema.optimizer_steps:>4} steps, kNN backbone {curves.knn[-1][1]:.4f},"
        f" momentum backbone {teacher:.4f}",
        flush=True,
    )
    return {
        "name": name,
        "schedule": schedule,
        "rule": rule,
        "seed": seed,
        "optimizer_steps": ema.optimizer_steps,
        "samples": ema.samples_seen,
        "knn": curves.knn,
        "knn_teacher": teacher,
        "steps": curves.steps,
    }


def smooth(values: list[float], width: int) -> list[float]:
    """A trailing moving average over ``width`` points (fewer at the start)."""
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]


def plot(runs: list[dict], base_batch: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    axes = axes.flat
    for index, run in enumerate(runs):
        if run["name"].startswith("base"):
            style = {"color": "k", "ls": "-" if run["seed"] == 0 else ":", "label": run["name"]}
        else:
            style = {"color": f"C{index - 2}", "label": run["name"]}
        samples, loss, batch, momentum, lag = zip(*run["steps"])
        width = max(1, len(samples) // 16)
        axes[0].plot(*zip(*run["knn"]), marker="o", ms=3, **style)
        axes[1].plot(samples, smooth(list(loss), width), **style)
        # The decay per base batch of samples: rho-hat^(B / batch). Equal curves = the same teacher in samples.
        axes[2].plot(samples, [1 - m ** (base_batch / b) for m, b in zip(momentum, batch)], **style)
        axes[3].plot(samples, lag, **style)
    axes[0].set(ylabel="kNN accuracy of the backbone (k=20)")
    axes[1].set(ylabel="BYOL loss (trailing mean over 1/16 of the steps)")
    axes[2].set(xlabel="samples seen", ylabel="teacher decay per base batch, 1 - rho-hat^(B/batch)", yscale="log")
    axes[3].set(xlabel="samples seen", ylabel="teacher lag ||teacher - online||")
    axes[0].legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--kappa", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--knn-samples", type=int, default=512, help="held-out images the kNN accuracy is measured on")
    parser.add_argument("--grow-at", type=int, default=2, help="the epoch where the progressive run grows the batch")
    parser.add_argument("--out-dir", type=Path, default=Path("byol_study"))
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    args = parser.parse_args()
    big = args.kappa * args.base_batch
    if args.train_samples % big:
        parser.error(f"--train-samples must be a multiple of kappa x base batch = {big}, got {args.train_samples}")
    if not 0 < args.grow_at < args.epochs:
        parser.error(f"--grow-at must be an epoch in [1, {args.epochs - 1}], got {args.grow_at}")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    k = args.kappa
    runs = [
        fit("base", {0: args.base_batch}, args),
        fit("base, seed 1", {0: args.base_batch}, args, seed=1),
        fit(f"kappa {k}, rule", {0: big}, args),
        fit(f"kappa {k}, no rule", {0: big}, args, rule=False),
        fit(f"kappa {k}, progressive", {0: args.base_batch, args.grow_at: big}, args),
    ]
    base = runs[0]["knn"]
    print(f"\nkNN accuracy (k=20) after {runs[0]['samples']} samples, base batch {args.base_batch}, kappa {k}:")
    header = ("run", "steps", "backbone", "teacher", "mean |kNN - base|", "mean teacher lag")
    print("{:>22} {:>6} {:>9} {:>9} {:>17} {:>16}".format(*header))
    for run in runs:
        run["mean_knn_gap"] = sum(abs(a[1] - b[1]) for a, b in zip(run["knn"], base)) / len(base)
        # the lag averaged over samples seen (each step weighted by its batch), comparable across batch sizes
        run["mean_teacher_lag"] = sum(step[2] * step[4] for step in run["steps"]) / run["samples"]
        print(
            f"{run['name']:>22} {run['optimizer_steps']:>6} {run['knn'][-1][1]:>9.4f} {run['knn_teacher']:>9.4f}"
            f" {run['mean_knn_gap']:>17.4f} {run['mean_teacher_lag']:>16.4f}"
        )
    data = "CIFAR-10" if args.cifar10 else "generated images"
    title = f"BYOL (ResNet-18) on {data}: base batch {args.base_batch} against {big}, teacher 0.99 -> 1 on samples"
    plot(runs, args.base_batch, args.out_dir / "byol_study.png", title)
    write_results(args, "byol_study.png", runs=runs)


if __name__ == "__main__":
    main()
