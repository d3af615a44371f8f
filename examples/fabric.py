"""The EMA Scaling Rule in a Lightning Fabric loop, with the batch grown by hand and the LR on the sample clock.

    python examples/fabric.py                                   # one CPU process
    python examples/fabric.py --devices 2 --strategy ddp        # 2 CPU processes: kappa counts both

Algorithm 1 of *How to Scale Your EMA*: the batch grows on a schedule (32 -> 64 -> 128 per device here), every
step's kappa is measured from the batch actually seen, the EMA uses rho^kappa, SGD uses lr x kappa, and the
warm-up + cosine learning rate (``SampleClockLR``) runs on samples seen, so it ends at the same sample count
whatever the schedule. Prints, per epoch, the global batch, kappa, rho-hat, the learning rate and the raw and
EMA accuracy on held-out data.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import SampleClockLR, ScaledEMA, WarmupCosine


def make_data(samples: int, seed: int) -> TensorDataset:
    """A 4-class problem in 16 dimensions with 10 % of the labels flipped (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.randint(0, 4, (samples,), generator=generator)
    x = centers[labels] + torch.randn(samples, 16, generator=generator) * 2
    noisy = torch.rand(samples, generator=generator) < 0.1
    labels[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=generator)
    return TensorDataset(x, labels)


def parse_schedule(text: str) -> dict[int, int]:
    """``"0:32,2:64"`` -> ``{0: 32, 2: 64}``: epoch -> per-device batch size."""
    return {int(epoch): int(size) for epoch, size in (item.split(":") for item in text.split(","))}


@torch.no_grad()
def accuracy(fabric: L.Fabric, model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return fabric.all_reduce(torch.tensor(correct), reduce_op="mean").item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule", type=parse_schedule, default=parse_schedule("0:32,1:64,3:128"))
    parser.add_argument("--samples", type=int, default=4096)
    args = parser.parse_args()

    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy=args.strategy)
    fabric.launch()
    fabric.seed_everything(0)
    train, held_out = make_data(args.samples, seed=0), make_data(1024, seed=1)
    base = args.schedule[min(args.schedule)] * fabric.world_size  # the global batch the hyperparameters are for
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped, optimizer = fabric.setup(model, optimizer)
    ema = ScaledEMA(
        model, optimizer, momentum=0.99, base_batch_size=base, optimizer_rule="sgd",
        total_samples=args.epochs * len(train),  # global: every rank sees its share of the dataset each epoch
    )  # fmt: skip
    scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.05), clock=ema)
    batch_size = args.schedule[min(args.schedule)]
    for epoch in range(args.epochs):
        batch_size = args.schedule.get(epoch, batch_size)  # progressive growth, by hand
        loader = fabric.setup_dataloaders(DataLoader(train, batch_size=batch_size, shuffle=True))
        for x, y in loader:
            fabric.backward(torch.nn.functional.cross_entropy(wrapped(x), y))
            ema.count_samples(len(x) * fabric.world_size)  # the micro-batch's global size
            optimizer.step()  # lr x kappa for this step only, then the EMA moves with rho^kappa
            optimizer.zero_grad()
            scheduler.step()  # reads the sample clock
        raw = accuracy(fabric, model, held_out)
        with ema.swapped():
            averaged = accuracy(fabric, model, held_out)
        fabric.print(
            f"epoch {epoch}: batch {ema.global_batch_size} kappa {ema.kappa:g} rho-hat {ema.ema_momentum:.6f}"
            f" lr {ema.step_lrs[0][0]:.4f} samples {ema.samples_seen} progress {ema.progress:.3f}"
            f" | accuracy raw {raw:.3f} EMA {averaged:.3f}"
        )


if __name__ == "__main__":
    main()
