"""Progressive batch growth with both callbacks: the paper's Algorithm 1 on data this script generates.

    python examples/progressive.py [--schedule 0:32,2:64,4:256] [--mode batch_size|accumulation] [--epochs 6]
                                   [--out progressive.png] [--cifar10 ROOT]

A small MLP is trained on a synthetic 10-class problem (or on CIFAR-10 with --cifar10, which needs torchvision
and a download). The datamodule's ``batch_size`` grows on the schedule; ``--mode accumulation`` keeps the
per-device batch at the first value and grows gradient accumulation instead. Every schedule runs on the sample
clock: the LR warms up over the first 10% of the samples and then follows a cosine, and the EMA momentum
follows a cosine from 0.99 to 0.999, both evaluated at samples seen / total samples. After that, rho^kappa and
the SGD rule (LR x kappa) are applied. The script writes a PNG of batch size, kappa, rho-hat and LR against
samples seen, and prints every transition and the raw and EMA validation accuracy.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from quickstart import Classifier, cifar10, synthetic
from torch.utils.data import DataLoader, random_split

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback, SampleClockLR, WarmupCosine


class Data(L.LightningDataModule):
    def __init__(self, dataset, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size  # ProgressiveBatchCallback sets this, as BatchSizeFinder would
        self.train, self.val = random_split(dataset, [0.9, 0.1], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=512)


class ScheduledClassifier(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        # LR(s) = lr x WarmupCosine(samples seen / total samples); the EMA callback is the clock
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.05))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Trace(L.Callback):
    """Per optimizer step: samples seen before it, global batch, kappa, rho-hat and the LR the step used."""

    def __init__(self, ema: EMAScalingCallback) -> None:
        self.ema = ema
        self.rows: list[tuple[int, int, float, float, float, int]] = []
        self._before, self._lr, self._step = 0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._lr = optimizer.param_groups[0]["lr"]  # inside the step: already scaled by kappa

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:
            batch = self.ema.samples_seen - self._before
            row = (self._before, batch, self.ema.kappa, self.ema.ema_momentum, self._lr, trainer.current_epoch)
            self.rows.append(row)
            self._before = self.ema.samples_seen


def parse_schedule(text: str) -> dict[int, int]:
    return {int(epoch): int(size) for epoch, size in (item.split(":") for item in text.split(","))}


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [row[0] for row in rows]  # the short last batch of each epoch shows as a dip
    fig, axes = plt.subplots(4, 1, figsize=(7, 9), sharex=True)
    for axis, column, label in zip(
        axes, (1, 2, 3, 4), ("global batch", "kappa", "EMA momentum rho-hat", "learning rate (scaled)")
    ):
        axis.step(samples, [row[column] for row in rows], where="post", label="used at the step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    # Undo the scaling: what is left is the base-batch schedule of samples seen, smooth across transitions
    axes[2].plot(samples, [row[3] ** (1 / row[2]) for row in rows], "--", label="rho-hat^(1/kappa)")
    axes[3].plot(samples, [row[4] / row[2] for row in rows], "--", label="LR / kappa")
    for axis in axes[2:]:
        axis.legend(loc="lower left", fontsize=8)
    axes[1].set_yscale("log", base=2)
    axes[-1].set_xlabel("samples seen")
    fig.suptitle("Progressive batch growth on the sample clock")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", type=parse_schedule, default=parse_schedule("0:32,2:64,4:256"))
    parser.add_argument("--mode", choices=["batch_size", "accumulation"], default="batch_size")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--out", default="progressive.png")
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    args = parser.parse_args()

    L.seed_everything(0)
    dataset, features = cifar10(args.cifar10) if args.cifar10 else (synthetic(n=args.samples), 64)
    base = args.schedule[min(args.schedule)]
    ema = EMAScalingCallback(
        momentum=0.99,
        momentum_schedule="cosine",
        final_momentum=0.999,
        base_batch_size=base,
        optimizer_rule="sgd",
        evaluate_with_ema=False,
    )
    trace = Trace(ema)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[ProgressiveBatchCallback(args.schedule, mode=args.mode), ema, trace],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ScheduledClassifier(features, lr=args.lr), datamodule=Data(dataset, batch_size=base))

    print("first step of each epoch (rho-hat^(1/kappa) and LR/kappa are the base-batch schedules at that sample):")
    header = ("epoch", "samples seen", "global batch", "kappa", "rho-hat", "rho-hat^(1/kappa)", "LR", "LR/kappa")
    print("{:>5} {:>12} {:>12} {:>6} {:>9} {:>17} {:>8} {:>8}".format(*header))
    epoch = -1
    for samples, batch, kappa, momentum, lr, row_epoch in trace.rows:
        if row_epoch != epoch:
            epoch = row_epoch
            unscaled = momentum ** (1 / kappa)
            print(
                f"{epoch:>5} {samples:>12} {batch:>12} {kappa:>6g} {momentum:>9.6f} {unscaled:>17.6f}"
                f" {lr:>8.5f} {lr / kappa:>8.5f}"
            )
    print(f"total: {ema.samples_seen} samples in {ema.optimizer_steps} optimizer steps, progress {ema.progress:.3f}")
    m = trainer.callback_metrics
    print(f"validation accuracy: raw {m['val_acc_raw']:.4f}, EMA {m['val_acc_ema']:.4f}")
    plot(trace.rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
