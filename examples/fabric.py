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
import math

import lightning as L
import torch
from emascale_examples.data import synthetic
from emascale_examples.tracing import parse_schedule
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import SampleClockLR, ScaledEMA, WarmupCosine


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
    everything = synthetic(args.samples + 1024, dim=16).tensors  # the same on every rank
    train = TensorDataset(*(t[: args.samples] for t in everything))
    held_out = TensorDataset(*(t[args.samples :] for t in everything))
    base = args.schedule[min(args.schedule)] * fabric.world_size  # the global batch the hyperparameters are for
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped, optimizer = fabric.setup(model, optimizer)
    ema = ScaledEMA(
        model, optimizer, momentum=0.99, base_batch_size=base, optimizer_rule="sgd",
        # global samples per run: DistributedSampler pads every rank to an equal share of the dataset
        total_samples=args.epochs * math.ceil(len(train) / fabric.world_size) * fabric.world_size,
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
    if torch.distributed.is_initialized():  # a clean exit: gloo can abort at shutdown with a live process group
        fabric.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
