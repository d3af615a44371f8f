"""Run by test_ddp.py in a subprocess: progressive batch growth under 2-process CPU (gloo) ddp_spawn.

``full``: an uninterrupted run that checkpoints every 2 steps; ``resumed``: a fresh run resumed from one of
those checkpoints. Rank 0 writes its per-step log, raw weights and EMA to ``<out>/<name>.pt``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback

SCHEDULE = {0: 2, 1: 4, 2: 8}  # per device; x 2 devices = global 4, 8, 16


class RankCheck(L.Callback):
    """Checks on every rank inside the hooks (a failed assert fails the run) and writes rank 0's results."""

    def __init__(self, ema: EMAScalingCallback, out: Path) -> None:
        self.ema, self.out = ema, out
        self.rows: list[tuple] = []
        self.epoch_ids: dict[int, list[float]] = {}
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.epoch_ids.setdefault(trainer.current_epoch, []).extend(batch[0][:, 0].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert trainer.world_size == 2
        assert trainer.global_step > self._step
        per_device = SCHEDULE[trainer.current_epoch]
        assert len(batch[0]) == per_device
        assert self.ema.kappa == per_device * 2 / 4, (trainer.current_epoch, self.ema.kappa)
        row = (trainer.current_epoch, self.ema.samples_seen, self.ema.kappa, self.ema.ema_momentum)
        self.rows.append(row)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        ids = torch.tensor(self.epoch_ids[epoch])
        if len(ids) != 16:
            return  # a resumed, partial epoch (the same on both ranks, so the collectives stay matched)
        gathered = trainer.strategy.all_gather(ids)  # (2, 16): each rank's samples this epoch
        assert gathered.shape == (2, 16), gathered.shape
        assert not set(gathered[0].tolist()) & set(gathered[1].tolist()), "ranks must see disjoint samples"
        assert len(set(gathered.flatten().tolist())) == 32
        if epoch > 0 and len(self.epoch_ids[epoch - 1]) == 16:
            # Lightning's DistributedSampler keeps shuffling per epoch across the dataloader rebuilds
            assert self.epoch_ids[epoch] != self.epoch_ids[epoch - 1]
            assert sorted(self.epoch_ids[epoch]) != sorted(self.epoch_ids[epoch - 1]), "same rank split"

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save(
                {
                    "rows": self.rows,
                    "raw": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "ema": {k: v.detach().clone() for k, v in self.ema.ema_state_dict().items()},
                    "epoch_ids": self.epoch_ids,
                    "batch_size": pl_module.hparams.batch_size,
                },
                self.out,
            )


def run(out_dir: Path, name: str, ckpt_path=None, lightning_sampler=False) -> None:
    L.seed_everything(0)
    # "shuffled": a torch DataLoader, to which Lightning adds a DistributedSampler(shuffle=True) reseeded per
    # epoch. "full"/"resumed": torchdata's StatefulDataLoader, which restores its position when the loader is
    # first built, before Lightning sets its sampler's epoch; the model's own DistributedSampler is seeded with
    # the epoch at build time, so the shuffled order survives a mid-epoch resume.
    model = TinyModel(
        n_samples=32,
        batch_size=2,
        lr=0.02,
        scheduler="sample_clock",
        loader="plain" if lightning_sampler else "stateful",
        shuffle=True,
        own_sampler=not lightning_sampler,
    )
    ema = EMAScalingCallback(
        momentum=0.9, base_batch_size=4, optimizer_rule="sgd", momentum_schedule="cosine", final_momentum=0.99
    )
    callbacks = [ProgressiveBatchCallback(SCHEDULE), ema, RankCheck(ema, out_dir / f"{name}.pt")]
    if ckpt_path is None and not lightning_sampler:
        callbacks.append(ModelCheckpoint(dirpath=out_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}"))
    trainer = make_trainer(
        callbacks,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=3,
        enable_checkpointing=True,
        use_distributed_sampler=lightning_sampler,
    )
    trainer.fit(model, ckpt_path=ckpt_path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run(out, "shuffled", lightning_sampler=True)
    run(out, "full")
    run(out, "resumed", ckpt_path=str(out / "step=10.ckpt"))  # mid-epoch 1, after the 4 -> 8 transition
