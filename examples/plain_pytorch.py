"""The EMA Scaling Rule in a plain PyTorch loop: no Trainer, no Fabric, no Lightning import at all.

    python examples/plain_pytorch.py                        # batch 64 = kappa 2 x base 32
    python examples/plain_pytorch.py --batch-size 32 --accumulate 4

``ScaledEMA`` hooks the optimizer: tell it the global size of every micro-batch, call ``optimizer.step()``,
and the step runs with the SGD rule (lr x kappa), then the EMA moves with rho^kappa. Prints kappa, rho-hat and
the learning rate the step used, then the EMA's and the raw model's accuracy on held-out data.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import ScaledEMA, half_life_from_momentum


def make_data(samples: int, seed: int = 0) -> TensorDataset:
    """A 4-class Gaussian problem in 16 dimensions, 10 % of the labels flipped (kept here: no Lightning import)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.randint(0, 4, (samples,), generator=generator)
    x = centers[labels] + torch.randn(samples, 16, generator=generator) * 2
    noisy = torch.rand(samples, generator=generator) < 0.1
    labels[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=generator)
    return TensorDataset(x, labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--base-batch-size", type=int, default=32, help="the batch the momentum and lr were tuned at")
    parser.add_argument("--momentum", type=float, default=0.99, help="the EMA momentum at the base batch")
    parser.add_argument("--lr", type=float, default=0.05, help="the SGD learning rate at the base batch")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    train, held_out = make_data(4096), make_data(1024, seed=1)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ema = ScaledEMA(
        model, optimizer, momentum=args.momentum, base_batch_size=args.base_batch_size, optimizer_rule="sgd"
    )
    world_size = 1  # under DDP: torch.distributed.get_world_size()
    half_life = half_life_from_momentum(args.momentum, args.base_batch_size)
    print(f"EMA half-life: {half_life:.0f} samples at any batch size")
    print(f"{'step':>5} {'samples':>8} {'batch':>6} {'kappa':>6} {'rho-hat':>9} {'lr':>7}")
    for epoch in range(args.epochs):
        for index, (x, y) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y) / args.accumulate
            loss.backward()
            ema.count_samples(len(x) * world_size)  # every micro-batch: its global size
            if (index + 1) % args.accumulate == 0 or index + 1 == len(loader):
                optimizer.step()  # the rule for this step only; then the EMA moves with rho^kappa
                optimizer.zero_grad()
                if ema.optimizer_steps % 16 == 1 or index + 1 == len(loader):
                    print(
                        f"{ema.optimizer_steps:>5} {ema.samples_seen:>8} {ema.global_batch_size:>6}"
                        f" {ema.kappa:>6g} {ema.ema_momentum:>9.6f} {ema.step_lrs[0][0]:>7.4f}"
                    )
        raw = accuracy(model, held_out)
        with ema.swapped():  # evaluate the EMA weights; the raw ones come back exactly
            averaged = accuracy(model, held_out)
        print(f"epoch {epoch}: held-out accuracy raw {raw:.3f}, EMA {averaged:.3f}")
    print(f"total: {ema.samples_seen} samples in {ema.optimizer_steps} optimizer steps")


if __name__ == "__main__":
    main()
