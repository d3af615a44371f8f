"""Wrote the 0.1.0 checkpoints under tests/data with lightning-emascale 0.1.0 (commit 10d0ccb), kept for the
compatibility test: a checkpoint written by 0.1.0 must load and resume to the same weights that 0.1.0 reached.

    git checkout 10d0ccb && python tests/data/make_v0_1_checkpoints.py tests/data

Each case saves ``<case>.ckpt`` after one epoch (mid-``update_every`` window, so a pending decay is stored) and
``<case>_resumed.pt``: the raw weights and the EMA that 0.1.0 reached when it resumed that checkpoint to epoch 2.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import TinyModel, make_trainer

from lightning_emascale import EMAScalingCallback

CALLBACK = dict(momentum=0.9, base_batch_size=2, optimizer_rule="sgd", update_every=2, warmup=True)


def run(max_epochs, ckpt_path=None):
    L.seed_everything(3)
    model = TinyModel(n_samples=20, batch_size=4)
    callback = EMAScalingCallback(**CALLBACK)
    trainer = make_trainer([callback], max_epochs=max_epochs, accumulate_grad_batches=2)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, callback


def main(out: Path) -> None:
    trainer, _, _ = run(1)
    trainer.save_checkpoint(out / "v0_1_polyak.ckpt")
    _, model, callback = run(2, ckpt_path=out / "v0_1_polyak.ckpt")
    torch.save(
        {
            "raw": {k: v.clone() for k, v in model.state_dict().items()},
            "ema": {k: v.clone() for k, v in callback.ema_state_dict().items()},
            "samples_seen": callback.samples_seen,
            "optimizer_steps": callback.optimizer_steps,
        },
        out / "v0_1_polyak_resumed.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
