"""Run by test_ddp.py in a subprocess: teacher mode under 2-process CPU (gloo) ddp_spawn."""

import sys

import lightning as L
import torch
from helpers import PAIRS, TinyBYOL, make_trainer

from lightning_emascale import EMAScalingCallback


class SameOnEveryRank(L.Callback):
    """After every optimizer step, gathers the teachers from both ranks and asserts they are identical."""

    def __init__(self, out: str) -> None:
        self.out, self.checks = out, 0

    def on_train_start(self, trainer, pl_module):
        self.initial = pl_module.head_momentum.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        teachers = [pl_module.get_submodule(path) for path in PAIRS.values()]
        flat = torch.cat([p.detach().flatten() for teacher in teachers for p in teacher.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])
        self.checks += 1

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            moved = not torch.equal(pl_module.head_momentum.weight, self.initial)
            torch.save({"checks": self.checks, "moved": moved}, self.out)


if __name__ == "__main__":
    L.seed_everything(0)
    model = TinyBYOL(n_samples=32, batch_size=4)
    ema = EMAScalingCallback(momentum=0.9, base_batch_size=8, teachers=PAIRS, optimizer_rule="sgd")
    trainer = make_trainer([ema, SameOnEveryRank(sys.argv[1])], strategy="ddp_spawn", devices=2, max_epochs=2)
    trainer.fit(model)
