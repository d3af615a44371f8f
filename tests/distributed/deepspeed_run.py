"""Run by test_deepspeed.py in a subprocess: 2-process CPU (gloo) fits under Lightning's DeepSpeedStrategy, through
a test-only subclass that runs it on the CPU (Lightning allows DeepSpeed on CUDA GPUs only). Rank 0 writes results
into OUT_DIR as torch files.

``python deepspeed_run.py MODE OUT_DIR STAGE DTYPE``, MODE one of:

- ``fit``: 3 epochs with validation on the EMA and gradient accumulation over 2 micro-batches; after every optimizer
  step a reference EMA of the full training weights is kept by hand (ZeRO-3: the gathered fp32 masters), and a
  DeepSpeed checkpoint is written after step 4; the forward at validation start (during fit, and in a
  ``trainer.validate`` after it) is recorded against a plain model holding the reference EMA;
- ``resume``: the same fit resumed from that checkpoint; the EMA pieces and the training weights at the end are
  recorded, to be compared with ``fit``'s bit for bit;
- ``consolidate`` (one process): the checkpoint directory consolidated into one file (the EMA as the weights, and
  a second one with the training weights), loaded with ``load_from_checkpoint``;
- ``reshard`` (ZeRO-3): a fit on 1 process resumed from the file with the training weights
  (``load_full_weights=True``): the EMA when training starts again is recorded;
- ``refuse``: the same from the file whose state_dict is the EMA, which is refused (the message is recorded);
- ``ragged``: epochs that end inside an accumulation window, and a second fit on the same Trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from deepspeed_cpu import CPUDeepSpeedStrategy  # first: DeepSpeed on the CPU, without its shared-memory op build
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_emascale import EMAScalingCallback, ScaledEMA
from lightning_emascale._zero import gather_partitions

N_SAMPLES, PER_DEVICE, ACCUMULATE, BASE, MOMENTUM, EPOCHS = 32, 2, 2, 4, 0.8, 3
CHECKPOINT_STEP = 4  # the end of the first epoch (a mid-epoch resume would replay its batches)


def make_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 1))


def data(samples: int = N_SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(samples, 9, generator=generator), torch.randn(samples, 1, generator=generator))


PROBE = torch.randn(5, 9, generator=torch.Generator().manual_seed(99))


class Model(L.LightningModule):
    def __init__(self, dtype: str = "fp32", samples: int = N_SAMPLES) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net()

    def forward(self, x):
        return self.net(x.to(next(self.net.parameters()).dtype if self.hparams.dtype == "bf16" else x.dtype))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def _loader(self) -> DataLoader:
        kwargs = self.trainer.strategy.distributed_sampler_kwargs
        dataset = data(self.hparams.samples)
        return DataLoader(dataset, batch_size=PER_DEVICE, sampler=DistributedSampler(dataset, shuffle=False, **kwargs))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def full_weights(module: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).clone().float() for name, p in module.named_parameters()}
    return {name: p.detach().clone().float() for name, p in module.named_parameters()}


def gathered(pieces: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {name: t.detach().clone() for name, t in pieces.items()})
    return gather_partitions(everyone, layout["shapes"] if layout else {})


def plain_forward(weights: dict[str, torch.Tensor], dtype: str) -> torch.Tensor:
    precision = torch.bfloat16 if dtype == "bf16" else torch.float32
    plain = make_net().to(precision)
    plain.load_state_dict({name.removeprefix("net."): t.to(precision) for name, t in weights.items()})
    with torch.no_grad():
        return plain(PROBE.to(precision)).float()


class Recorder(L.Callback):
    """Keeps the reference EMA by hand and records what the EMA callback did."""

    def __init__(self, ema: EMAScalingCallback, stage: int, dtype: str, out: Path, mode: str) -> None:
        self.ema, self.stage, self.dtype, self.out, self.mode = ema, stage, dtype, out, mode
        self.reference: dict[str, torch.Tensor] = {}
        self.rows: list[tuple[int, int, float]] = []
        self.validation: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.engine_steps = 0

    def on_train_start(self, trainer, pl_module):
        self.engine_steps = trainer.strategy.deepspeed_engine.global_steps
        if not self.reference:
            self.reference = full_weights(pl_module, self.stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = trainer.strategy.deepspeed_engine.global_steps
        if steps == self.engine_steps:
            return  # a micro-batch accumulated into the next step
        self.engine_steps = steps
        ema = self.ema.scaled_ema
        self.rows.append((ema.optimizer_steps, ema.samples_seen, ema.kappa))
        momentum = MOMENTUM**ema.kappa
        for name, value in full_weights(pl_module, self.stage).items():
            self.reference[name].lerp_(value, 1 - momentum)
        if self.mode == "fit" and ema.optimizer_steps == CHECKPOINT_STEP:
            trainer.save_checkpoint(self.out / "mid")
            state = ema.state_dict()
            full = gathered(state["ema"], state.get("zero3_partitions"))
            from deepspeed.utils import safe_get_full_fp32_param

            masters = {name: safe_get_full_fp32_param(p).clone() for name, p in pl_module.named_parameters()}
            if trainer.is_global_zero:
                saved = {"ema": full, "reference": dict(self.reference), "masters": masters}
                torch.save(saved, self.out / "mid_ema.pt")

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            out = pl_module(PROBE).float()
        self.validation.append((out, plain_forward(self.reference, self.dtype)))


class StartRecorder(L.Callback):
    """Records the EMA when training starts again (after the checkpoint was loaded), then stops the fit."""

    def __init__(self, ema: EMAScalingCallback) -> None:
        self.ema, self.start = ema, None

    def on_train_start(self, trainer, pl_module):
        scaled = self.ema.scaled_ema
        self.start = {
            "ema": {name: t.detach().clone() for name, t in scaled.ema_state_dict().items()},
            "samples_seen": scaled.samples_seen,
            "layout": scaled.state_dict().get("zero3_partitions"),
        }
        trainer.should_stop = True


def reshard(out: Path, config: dict, ema: EMAScalingCallback, dtype: str, name: str, mode: str) -> None:
    """Resume on 1 process, from a consolidated file of the 2-process fit (ZeRO-3 reads it whole)."""
    started = StartRecorder(ema)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(config=config, load_full_weights=True),
        max_epochs=EPOCHS, precision="bf16-true" if dtype == "bf16" else "32-true",
        accumulate_grad_batches=ACCUMULATE, callbacks=[ema, started], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, use_distributed_sampler=False, limit_val_batches=0,
    )  # fmt: skip
    try:
        trainer.fit(Model(dtype), ckpt_path=out / name)
        torch.save(started.start, out / f"{mode}.pt")
    except ValueError as error:
        torch.save({"error": str(error)}, out / f"{mode}.pt")
    dist.destroy_process_group()


def ragged(out: Path, config: dict, ema: EMAScalingCallback, recorder: Recorder, dtype: str) -> None:
    """5 micro-batches an epoch with accumulation over 2 (DeepSpeed's windows run across epochs), DeepSpeed's default
    persistence threshold, then a second fit on the same Trainer (a new engine, new fp32 masters)."""
    config = {**config, "zero_optimization": {"stage": config["zero_optimization"]["stage"]}}
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(config=config), max_epochs=3,
        precision="bf16-true" if dtype == "bf16" else "32-true", accumulate_grad_batches=ACCUMULATE,
        callbacks=[ema, recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    model = Model(dtype, samples=20)  # 10 samples a rank, 5 micro-batches of 2
    trainer.fit(model)
    first_fit = len(recorder.rows)
    trainer.fit_loop.max_epochs = 5
    trainer.fit(model)  # again, on the same Trainer
    state = ema.scaled_ema.state_dict()
    full = gathered(state["ema"], state.get("zero3_partitions"))
    if trainer.is_global_zero:
        torch.save({"rows": recorder.rows, "first_fit": first_fit, "ema": full, "reference": recorder.reference},
                   out / "ragged.pt")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def ema_key() -> str:
    return EMAScalingCallback(momentum=MOMENTUM).state_key


def main() -> None:
    mode, out, stage, dtype = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode == "consolidate":
        from lightning_emascale import consolidate_deepspeed_checkpoint

        consolidate_deepspeed_checkpoint(out / "mid", out / "consolidated.ckpt")
        consolidate_deepspeed_checkpoint(out / "mid", out / "training_weights.ckpt", ema_as_weights=False)
        model = Model.load_from_checkpoint(out / "consolidated.ckpt")
        checkpoint = torch.load(out / "consolidated.ckpt", weights_only=False)
        plain = ScaledEMA(Model(dtype), None, momentum=MOMENTUM, base_batch_size=BASE)  # one device, no DeepSpeed
        plain.load_state_dict(checkpoint["callbacks"][ema_key()])
        torch.save(
            {
                "state_dict": {n: t.float() for n, t in model.state_dict().items()},
                "checkpoint": checkpoint,
                "plain_ema": {n: t.clone() for n, t in plain.ema_state_dict().items()},
            },
            out / "consolidated.pt",
        )
        return
    config = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": PER_DEVICE,
    }
    ema = EMAScalingCallback(momentum=MOMENTUM, base_batch_size=BASE, optimizer_rule="sgd")
    recorder = Recorder(ema, stage, dtype, out, mode)
    if mode == "ragged":
        ragged(out, config, ema, recorder, dtype)
        return
    if mode in ("reshard", "refuse"):  # one process, from a consolidated file
        reshard(out, config, ema, dtype, "training_weights.ckpt" if mode == "reshard" else "consolidated.ckpt", mode)
        return
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(config=config), max_epochs=EPOCHS,
        precision="bf16-true" if dtype == "bf16" else "32-true", accumulate_grad_batches=ACCUMULATE,
        callbacks=[ema, recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        use_distributed_sampler=False, limit_val_batches=2, num_sanity_val_steps=0,
    )  # fmt: skip
    model = Model(dtype)
    if mode == "resume":
        saved = torch.load(out / "mid_ema.pt", weights_only=False)
        recorder.reference = saved["reference"]
    trainer.fit(model, ckpt_path=out / "mid" if mode == "resume" else None)
    fit_validations = len(recorder.validation)
    engine_steps = trainer.strategy.deepspeed_engine.global_steps  # validate replaces the engine by an inference one
    trainer.validate(model)  # after fit, on a new inference engine: still the EMA
    scaled = ema.scaled_ema
    state = scaled.state_dict()
    pieces = {name: t.detach().clone() for name, t in state["ema"].items()}
    full = gathered(pieces, state.get("zero3_partitions"))
    weights = full_weights(model, stage)
    if trainer.is_global_zero:
        torch.save(
            {
                "rows": recorder.rows,
                "ema": full,
                "reference": recorder.reference,
                "weights": weights,
                "validation": recorder.validation[:fit_validations],
                "validate_after_fit": recorder.validation[fit_validations:],
                "pieces_rank0": pieces,
                "layout": state.get("zero3_partitions"),
                "engine_steps": engine_steps,
                "global_step": trainer.global_step,
            },
            out / f"{mode}.pt",
        )
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo's threads otherwise abort the interpreter now and then


if __name__ == "__main__":
    main()
