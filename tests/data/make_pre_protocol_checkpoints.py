"""Wrote the checkpoints ``tests/data/pre_protocol_<mode>.ckpt`` with the code before the averager/store redesign
(commit c225bd3), one per mode (Polyak, teacher, post-hoc), kept for the compatibility test: a checkpoint that
code wrote must load and resume to the very weights and EMA that it reached itself.

    git checkout c225bd3 && python tests/data/make_pre_protocol_checkpoints.py tests/data

Each case saves ``<mode>.ckpt`` after one epoch and ``<mode>_resumed.pt``: the raw weights, the EMA (Polyak: the
callback's EMA; teacher: the teacher submodules; post-hoc: every power EMA) and the clock that the code reached
when it resumed that checkpoint to epoch 2. The Polyak case stops mid-``update_every`` window (a pending decay is
stored) with warm-up and skip_non_finite; the teacher case has a cosine schedule and a momentum attribute.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import PAIRS, TinyBYOL, TinyModel, make_trainer

from lightning_emascale import EMAScalingCallback, PostHocEMACallback

MODES = ("polyak", "teacher", "post_hoc")


def callback_for(mode: str, directory: Path) -> EMAScalingCallback:
    if mode == "polyak":
        return EMAScalingCallback(
            momentum=0.9, base_batch_size=2, optimizer_rule="sgd", update_every=2, warmup=True, skip_non_finite=True
        )
    if mode == "teacher":
        return EMAScalingCallback(
            momentum=0.95, final_momentum=1.0, momentum_schedule="cosine", base_batch_size=4, optimizer_rule="sgd",
            teachers=PAIRS, momentum_attributes={"criterion.center_momentum": 0.9},
        )  # fmt: skip
    return PostHocEMACallback(
        sigma_rels=(0.05, 0.2), snapshot_every_samples=16, directory=directory, base_batch_size=4, optimizer_rule="sgd"
    )


def run(mode: str, max_epochs: int, directory: Path, ckpt_path=None):
    """Fit ``mode``'s model for ``max_epochs`` (resuming ``ckpt_path``); snapshots (post-hoc) go to ``directory``."""
    L.seed_everything(3)
    model = TinyBYOL(n_samples=24, batch_size=4) if mode == "teacher" else TinyModel(n_samples=20, batch_size=4)
    callback = callback_for(mode, directory)
    accumulate = 1 if mode == "teacher" else 2
    trainer = make_trainer([callback], max_epochs=max_epochs, accumulate_grad_batches=accumulate)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, callback


def reached(mode: str, model: L.LightningModule, callback: EMAScalingCallback) -> dict:
    """What a run reached: its raw weights, its EMA in the mode's own form, and its clock."""
    if mode == "polyak":
        ema = {k: v.clone() for k, v in callback.ema_state_dict().items()}
    elif mode == "teacher":
        ema = {k: v.clone() for k, v in model.state_dict().items() if "_momentum." in k}
    else:
        power = callback.scaled_ema.state_dict()["power_ema"]
        ema = {f"{sigma}/{k}": v.clone() for sigma, averages in power.items() for k, v in averages.items()}
    return {
        "raw": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": ema,
        "samples_seen": callback.samples_seen,
        "optimizer_steps": callback.optimizer_steps,
        "ema_updates": callback.ema_updates,
    }


def main(out: Path) -> None:
    for mode in MODES:
        with tempfile.TemporaryDirectory() as directory:
            trainer, _, _ = run(mode, 1, Path(directory))
            trainer.save_checkpoint(out / f"pre_protocol_{mode}.ckpt")
            _, model, callback = run(mode, 2, Path(directory), ckpt_path=out / f"pre_protocol_{mode}.ckpt")
            torch.save(reached(mode, model, callback), out / f"pre_protocol_{mode}_resumed.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
