"""Run by test_ddp.py in a subprocess: DINO's centre under 2-process CPU (gloo) ddp_spawn, a global batch of 16 per
step. ``accumulate``: 2 micro-batches of 4 per rank with `center_momenta`; ``whole``: one batch of 8 per rank and
lightly's own centre update (one per step, all-reduced over the ranks: the large-batch run); ``plain``: 2
micro-batches of 4 per rank and lightly's own update (two per step). Rank 0 saves the model's
final state; every micro-batch checks that the centre is the same on both ranks."""

import sys

import lightning as L
import torch
from helpers import DINO_PAIRS, TinyDINO, make_trainer

from lightning_emascale import EMAScalingCallback


class CenterSameOnEveryRank(L.Callback):
    def __init__(self, out: str) -> None:
        self.out, self.checks = out, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gathered = trainer.strategy.all_gather(pl_module.criterion.center.detach().flatten())
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])
        self.checks += 1

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"checks": self.checks, "state": state}, self.out)


if __name__ == "__main__":
    accumulate = sys.argv[2] in ("accumulate", "plain")
    L.seed_everything(0)
    model = TinyDINO(n_samples=64, batch_size=4 if accumulate else 8)
    centers = {"center_momenta": {"criterion": 0.9}} if sys.argv[2] == "accumulate" else {}
    ema = EMAScalingCallback(momentum=0.99, base_batch_size=16, teachers=DINO_PAIRS, **centers)
    trainer = make_trainer(
        [ema, CenterSameOnEveryRank(sys.argv[1])],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        accumulate_grad_batches=2 if accumulate else 1,
    )
    trainer.fit(model)
