"""A sharded model's EMA: FSDP2 (``fully_shard``) under ModelParallelStrategy, each rank averaging its own shards.

    python examples/sharded.py                      # 2 CPU processes (gloo), FSDP2 over both
    python examples/sharded.py --tensor-parallel    # 2 CPU processes, tensor parallel: one sample stream
    python examples/sharded.py --accelerator gpu --devices 4   # on GPUs (NCCL)

An MLP classifier on generated data. ``configure_model`` shards every block and the root with ``fully_shard`` (or,
with ``--tensor-parallel``, splits each block's two layers column- then row-wise over the ranks). The callback
keeps the EMA of each rank's shards only, counts κ from the data-parallel replicas (2 with FSDP2, 1 with tensor
parallelism: both ranks see the same samples), validates on the EMA and writes a full checkpoint at the end, whose
``state_dict`` is the gathered EMA. Prints, from rank 0: κ and ρ̂ of the last step, the EMA's memory on each rank
against its parameter shard, the validation accuracy of the EMA, and that the checkpoint loads as a plain model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from emascale_examples.data import synthetic
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, random_split

from lightning_emascale import EMAScalingCallback


class Residual(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Classifier(L.LightningModule):
    def __init__(self, dim: int = 16, width: int = 256, blocks: int = 4, classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        residuals = [Residual(width) for _ in range(blocks)]
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, width), *residuals, torch.nn.Linear(width, classes))
        self.tensor_parallel = False

    def configure_model(self) -> None:
        if self._device_mesh is None or isinstance(self.net[0].weight, DTensor):
            return  # one process, or sharded already (configure_model runs again for each Trainer call)
        if self.tensor_parallel:
            mesh = self.device_mesh["tensor_parallel"]
            for residual in self.net[1:-1]:
                parallelize_module(residual.block, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.net[1:-1]:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # through the root FSDP module, which gathers what the blocks do not hold

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tensor-parallel", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64, help="per data-parallel rank")
    parser.add_argument("--out", default="sharded.ckpt")
    args = parser.parse_args()

    L.seed_everything(0)
    train, val = random_split(synthetic(args.samples, dim=16), [0.9, 0.1], torch.Generator().manual_seed(0))
    replicas = 1 if args.tensor_parallel else args.devices
    strategy = ModelParallelStrategy(
        data_parallel_size=replicas,
        tensor_parallel_size=args.devices // replicas,
        save_distributed_checkpoint=False,  # one full file: its state_dict is the gathered EMA
    )
    ema = EMAScalingCallback(momentum=0.99, base_batch_size=args.batch_size, optimizer_rule="sgd")
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        callbacks=[ema], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = Classifier()
    model.tensor_parallel = args.tensor_parallel
    # The Trainer gives each data-parallel rank its share of the samples (tensor-parallel ranks get the same one).
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True),
        DataLoader(val, batch_size=256),
    )
    state = ema.scaled_ema.averager
    ema_bytes = sum(a.numel() * a.element_size() for a in state.averages)
    shard_bytes = sum(t.numel() * t.element_size() for t in state.tracked)
    sizes = trainer.strategy.all_gather(torch.tensor([ema_bytes, shard_bytes]))
    accuracy = float(trainer.callback_metrics["val_acc"])
    trainer.save_checkpoint(args.out)  # every rank takes part: the EMA is gathered into rank 0's file
    if trainer.is_global_zero:
        print(f"last step: global batch {ema.global_batch_size}, kappa {ema.kappa:g}, rho-hat {ema.ema_momentum:.6f}")
        for rank, (ema_size, shard_size) in enumerate(sizes.tolist()):
            print(f"rank {rank}: EMA {ema_size / 2**20:.2f} MiB, parameter shard {shard_size / 2**20:.2f} MiB")
        print(f"validation accuracy of the EMA: {accuracy:.3f}")
        plain = Classifier.load_from_checkpoint(Path(args.out), map_location="cpu")
        x, y = (torch.stack(t) for t in zip(*[val[i] for i in range(len(val))]))
        with torch.no_grad():
            loaded = (plain(x).argmax(dim=1) == y).float().mean().item()
        print(f"checkpoint loaded as a plain model (the EMA): accuracy {loaded:.3f}")


if __name__ == "__main__":
    main()
