"""Run by test_ddp.py in a subprocess: fit under ddp_spawn (2 CPU processes), then evaluate in the main process."""

import sys

import lightning as L
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_emascale import EMAScalingCallback


class Synced(TinyModel):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)  # both ranks' halves


def main(out_dir: str) -> None:
    L.seed_everything(0)
    model = Synced(n_samples=24, batch_size=3)
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    checkpoint = ModelCheckpoint(dirpath=out_dir, save_last=True)
    trainer = make_trainer(
        [callback, checkpoint], strategy="ddp_spawn", devices=2, max_epochs=2, enable_checkpointing=True,
        limit_val_batches=None,
    )  # fmt: skip
    trainer.fit(model)
    try:
        callback.ema_state_dict()
        message = ""
    except RuntimeError as error:  # this process never held the EMA: the workers did
        message = str(error)
    clock = []
    for name in ("samples_seen", "kappa", "momentum_per_update"):
        try:
            clock.append(repr(getattr(callback, name)))  # not 0 or nan: the values are the workers'
        except RuntimeError as error:
            clock.append(str(error))
    validated = trainer.validate(model, verbose=False)[0]["val_loss"]
    # the reference: the EMA from the checkpoint (its state_dict), evaluated here on one process
    ema_model = TinyModel.load_from_checkpoint(f"{out_dir}/last.ckpt", n_samples=24, batch_size=3)
    ema_model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(ema_model(ema_model.x[:8]), ema_model.y[:8]).item()
        raw = torch.nn.functional.mse_loss(model.eval()(model.x[:8]), model.y[:8]).item()
    # Lightning's advice: test on one device; this process never held the EMA, the workers' file has it
    single = make_trainer([callback], limit_val_batches=None).validate(model, verbose=False)[0]["val_loss"]
    # weights loaded by hand after fit: the workers' EMA is stale, the loaded weights are evaluated
    model.load_state_dict({k: v + 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    stale = trainer.validate(model, verbose=False)[0]["val_loss"]
    with torch.no_grad():
        loaded = torch.nn.functional.mse_loss(model.eval()(model.x[:8]), model.y[:8]).item()
    torch.save(
        {
            "validated": validated,
            "single": single,
            "expected": expected,
            "raw": raw,
            "message": message,
            "clock": clock,
            "stale": stale,
            "loaded": loaded,
        },
        f"{out_dir}/out.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
