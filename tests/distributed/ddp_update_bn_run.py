"""Run by test_ddp.py in a subprocess: `update_bn_at_end` under 2-process CPU (gloo) ddp_spawn. Each rank saves the
BatchNorm statistics of its EMA, and those that update_bn computes over its own shard of the data alone."""

import sys

import lightning as L
import torch
from helpers import TinyModel, make_trainer

from lightning_emascale import EMAScalingCallback, update_bn


class Save(L.Callback):
    def __init__(self, out: str, callback: EMAScalingCallback) -> None:
        self.out, self.callback = out, callback

    def on_fit_end(self, trainer, pl_module):
        ema = self.callback.ema_state_dict()
        stats = {key: ema[key].clone() for key in ("net.1.running_mean", "net.1.running_var")}
        update_bn(trainer.train_dataloader, self.callback)  # this rank's shard alone, for comparison
        own = {key: ema[key].clone() for key in stats}
        torch.save({"averaged": stats, "own": own}, f"{self.out}.{trainer.global_rank}")


if __name__ == "__main__":
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=4, lr=0.02)
    callback = EMAScalingCallback(momentum=0.9, update_bn_at_end=True)
    trainer = make_trainer([callback, Save(sys.argv[1], callback)], strategy="ddp_spawn", devices=2, max_epochs=1)
    trainer.fit(model)
