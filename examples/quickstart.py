"""A small supervised fit with EMAScalingCallback on data this script generates.

    python examples/quickstart.py [--batch-size 64] [--accumulate 2] [--base-batch-size 32] [--epochs 3]

Trains a small MLP on a synthetic 10-class problem (or CIFAR-10 with --cifar10, which needs torchvision and
a download) with SGD at ``batch-size x accumulate`` samples per step, while the EMA and the learning rate
are scaled from ``base-batch-size``. Prints kappa, the momentum used and the raw-vs-EMA validation accuracy.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from emascale_examples.data import cifar10, synthetic
from emascale_examples.models import Classifier
from torch.utils.data import DataLoader, random_split

from lightning_emascale import EMAScalingCallback, half_life_from_momentum, scale_ema_momentum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    args = parser.parse_args()

    L.seed_everything(0)
    dataset, features = cifar10(args.cifar10) if args.cifar10 else (synthetic(), 64)
    train, val = random_split(dataset, [0.9, 0.1], generator=torch.Generator().manual_seed(0))
    ema = EMAScalingCallback(
        momentum=args.momentum, base_batch_size=args.base_batch_size, optimizer_rule="sgd", evaluate_with_ema=False
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=1,
    )
    trainer.fit(
        Classifier(features),
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=512),
    )
    m = trainer.callback_metrics
    full = args.batch_size * args.accumulate / args.base_batch_size
    print(
        f"\nfull step: global batch {args.batch_size * args.accumulate} = kappa {full:g} x base {args.base_batch_size}"
    )
    print(
        f"momentum {args.momentum} tuned at the base batch -> rho^kappa = {scale_ema_momentum(args.momentum, full):.6f}"
    )
    print(f"last step (short batch at the epoch end): kappa {ema.kappa:.4g}, rho^kappa = {ema.ema_momentum:.6f}")
    print(
        f"EMA half-life: {half_life_from_momentum(args.momentum, args.base_batch_size):.0f} samples at any batch size"
    )
    print(f"samples seen {ema.samples_seen} in {ema.optimizer_steps} optimizer steps")
    print(f"validation accuracy: raw {m['val_acc_raw']:.4f}, EMA {m['val_acc_ema']:.4f}")


if __name__ == "__main__":
    main()
