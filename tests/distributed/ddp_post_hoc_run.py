"""Run by test_ddp.py in a subprocess: PostHocEMACallback under 2-process CPU ddp_spawn (gloo).

Every rank records which process wrote snapshots, and checks at the end that both ranks hold the same power EMAs.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers import TinyModel, make_trainer

import lightning_emascale._power as power
from lightning_emascale import PostHocEMACallback


class Check(L.Callback):
    def __init__(self, ema, out_dir):
        self.ema, self.out_dir = ema, out_dir

    def setup(self, trainer, pl_module, stage):
        write = power.write_snapshot

        def recording(*args, **kwargs):  # who writes: rank 0 only
            with open(self.out_dir / f"writer-{trainer.global_rank}.txt", "a") as log:
                log.write(f"{args[1]}\n")
            return write(*args, **kwargs)

        power.write_snapshot = recording

    def on_train_end(self, trainer, pl_module):
        assert trainer.world_size == 2 and self.ema.kappa == 2.0, self.ema.kappa
        first = self.ema.scaled_ema.averager.states[0].averages[0]
        gathered = trainer.strategy.all_gather(first)
        assert torch.equal(gathered[0], gathered[1])


def main(out_dir: str) -> None:
    out = Path(out_dir)
    L.seed_everything(0)
    model = TinyModel(n_samples=24, batch_size=3)
    ema = PostHocEMACallback(snapshot_every_samples=12, directory=out / "snapshots", base_batch_size=6)
    trainer = make_trainer(
        [ema, Check(ema, out)], strategy="ddp_spawn", devices=2, accumulate_grad_batches=2, max_epochs=2
    )
    trainer.fit(model)


if __name__ == "__main__":
    main(sys.argv[1])
