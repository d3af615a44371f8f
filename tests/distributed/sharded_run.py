"""Run by test_sharded.py in a subprocess: 2-process CPU (gloo) fits under ModelParallelStrategy (FSDP2
``fully_shard``, or tensor parallelism), results written by rank 0 as torch files.

``python sharded_run.py MODE OUT_DIR [PRECISION] [CKPT]``, MODE one of:

- ``fsdp2``: a fit with validation on the EMA, the gathered raw weights recorded after every step, a full and a
  distributed checkpoint written after step 4 (each rank's EMA shards recorded beside them);
- ``resume``: the same fit resumed from CKPT; each rank's EMA shards recorded when training starts again;
- ``shrink``: the fit on one process (FSDP2 on a 1-rank mesh, per-device batches of 4: the same global batches)
  resumed from CKPT, written on 2 ranks; when training starts again, the EMA and the weights recorded and a
  distributed checkpoint written (what it loaded, in its own layout, for ``resume`` to read on 2 ranks);
- ``tp``: tensor parallelism on 2 ranks (dp = 1): one sample stream, counted once;
- ``teacher``: teacher mode, the teacher sharded with ``reshard_after_forward=False``;
- ``fsdp1``, ``resume1``, ``shrink1``, ``teacher1``: the same under FSDPStrategy (FSDP1, ``use_orig_params=True``),
  through a test-only subclass that runs FSDP1 on the CPU (Lightning allows it on GPUs only);
- ``manual1``: FSDP1 wrapped by hand in ``configure_model`` (Lightning then leaves the root unwrapped).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_emascale import EMAScalingCallback

N_SAMPLES, PER_DEVICE, BASE, MOMENTUM = 16, 2, 2, 0.9


def make_net(mode: str = "fsdp2") -> torch.nn.Sequential:
    if mode == "tp":  # column-wise then row-wise parallel: the hidden features are split over the 2 ranks
        return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    # 5 rows over 2 ranks: uneven shards (3 and 2); the last layer's single row: one rank holds nothing
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(N_SAMPLES, 6, generator=generator), torch.randn(N_SAMPLES, 1, generator=generator))


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on the CPU, for tests only: FSDP1 gets ``device_id=cpu`` and the barrier no device ids."""

    def _setup_model(self, model):
        if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            model = FullyShardedDataParallel(
                module=model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
            )
        return model

    def barrier(self, name=None):
        torch.distributed.barrier()


class ShardedModel(L.LightningModule):
    """The model of the tests: unsharded when run on one process (the reference), sharded in ``configure_model``."""

    def __init__(self, mode: str = "fsdp2", batch_size: int = PER_DEVICE) -> None:
        super().__init__()
        self.mode, self.batch_size = mode, batch_size
        torch.manual_seed(0)
        self.net = make_net(mode)
        self.register_buffer("scale", torch.tensor([1.5]))  # a float buffer: tracked, never sharded
        if mode.startswith("teacher"):
            self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.teacher_checks = 0

    def configure_model(self) -> None:
        if self.mode == "manual1" and torch.distributed.is_initialized():
            if not isinstance(self.net, FullyShardedDataParallel):  # each Linear a unit, the rest in the net's
                wrap = {"device_id": torch.device("cpu"), "use_orig_params": True}
                for index in (0, 3):
                    self.net[index] = FullyShardedDataParallel(self.net[index], **wrap)
                self.net = FullyShardedDataParallel(self.net, **wrap)
            return
        if self._device_mesh is None or isinstance(self.net[0].weight, DTensor):
            return  # one process (the reference), or sharded already
        if self.mode == "tp":
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        if self.mode == "teacher":  # the teacher stays gathered after its no-grad forward
            fully_shard(self.teacher[0], mesh=mesh, reshard_after_forward=False)
            fully_shard(self.teacher, mesh=mesh, reshard_after_forward=False)
            self.teacher_shards = dict(self.teacher.named_parameters())

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x) * self.scale, y)
        if self.mode == "teacher1":  # FSDP1 reshards each unit after its forward: a plain teacher forward
            with torch.no_grad():
                target = self.teacher(x)
            self.teacher_checks += 1
            loss = loss + 0.1 * torch.nn.functional.mse_loss(self.net(x), target)
        if self.mode == "teacher":
            with torch.no_grad():
                # The teacher's forward must see its latest shards: compare with a plain copy of the shards gathered
                # first (through the sharded parameters kept since setup: the module's own attributes and its
                # state_dict() would reshard a module left unsharded, hiding a stale gathered copy).
                plain = make_net()
                plain.load_state_dict({name: _full(p) for name, p in self.teacher_shards.items()})
                target = self.teacher(x)
                torch.testing.assert_close(target, plain(x), rtol=0, atol=1e-6)
                self.teacher_checks += 1
            loss = loss + 0.1 * torch.nn.functional.mse_loss(self.net(x), target)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x) * self.scale, y), sync_dist=True)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def _loader(self) -> DataLoader:
        # in order (the Trainer runs with use_distributed_sampler=False): rank r of n takes samples r, r + n, ...,
        # so one optimizer step sees the same samples on 2 data-parallel ranks as on one process
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {"num_replicas": 1, "rank": 0}
        sampler = DistributedSampler(data(), shuffle=False, **kwargs)
        return DataLoader(data(), batch_size=self.batch_size, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _fsdp1(trainer: L.Trainer) -> bool:
    return any(isinstance(module, FullyShardedDataParallel) for module in trainer.strategy.model.modules())


def _gathered(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The module's whole state on every rank (a collective): DTensors gathered, or FSDP1's full state dict."""
    root = trainer.strategy.model
    if _fsdp1(trainer):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        config = FullStateDictConfig(rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            return {name: value.detach().clone() for name, value in root.state_dict().items()}
    return {name: _full(value).detach().clone() for name, value in module.state_dict().items()}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Recorder(L.Callback):
    """After every optimizer step: the gathered raw weights and the EMA's numbers. Checks the raw shards survive
    each validation bit for bit. Saves both checkpoint kinds after step ``save_at``, and a distributed one when
    training starts (``save_on_start``)."""

    def __init__(self, ema: EMAScalingCallback, out: Path, save_at: int = 0, save_on_start: bool = False) -> None:
        self.ema, self.out, self.save_at, self.save_on_start = ema, out, save_at, save_on_start
        self.rows: list[tuple[int, float, float, int]] = []
        self.raw: list[dict[str, torch.Tensor]] = []
        self.before_validation: dict[str, torch.Tensor] = {}
        self.validations = 0
        self.swapped_save_error = ""
        self.total_samples, self.progress = 0, 0.0

    def on_train_end(self, trainer, pl_module):
        self.total_samples, self.progress = self.ema.resolved_total_samples, self.ema.progress

    def on_train_start(self, trainer, pl_module):
        initial = _gathered(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save(initial, self.out / "initial.pt")
        if self.ema._options.teachers:
            return
        shards = {name: _local(value).clone() for name, value in self.ema.ema_state_dict().items()}
        torch.save(shards, self.out / f"start_shards_rank{trainer.global_rank}.pt")
        if self.save_on_start:  # what this run loaded, in its own layout
            _write_kind(trainer, distributed=True)
            trainer.save_checkpoint(self.out / "distributed.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ema = self.ema
        self.rows.append((ema.optimizer_steps, ema.kappa, ema.ema_momentum, ema.samples_seen))
        self.raw.append(_gathered(trainer, pl_module))
        # the raw shards before a validation swaps the EMA in
        self.before_validation = {name: _local(p).detach().clone() for name, p in pl_module.named_parameters()}
        if trainer.global_step == self.save_at:
            shards = {name: _local(value).clone() for name, value in ema.ema_state_dict().items()}
            torch.save(shards, self.out / f"saved_shards_rank{trainer.global_rank}.pt")
            for kind, distributed in (("full", False), ("distributed", True)):  # the strategy's two kinds
                _write_kind(trainer, distributed)
                trainer.save_checkpoint(self.out / f"{kind}.ckpt")
                # saved while the EMA is swapped in (FSDP2), or refused with a message (FSDP1)
                try:
                    with ema.ema_weights():
                        trainer.save_checkpoint(self.out / f"swapped_{kind}.ckpt")
                except RuntimeError as err:
                    self.swapped_save_error = str(err)
            assert (self.out / "full.ckpt").is_file() and (self.out / "distributed.ckpt").is_dir()

    def on_validation_end(self, trainer, pl_module):
        if not self.before_validation or trainer.state.fn != "fit":
            return  # (a validation from a checkpoint evaluates the checkpoint's weights)
        for name, p in pl_module.named_parameters():  # restored bit for bit after the EMA callback swapped out
            assert torch.equal(_local(p), self.before_validation[name]), name
        self.validations += 1


def _write_kind(trainer: L.Trainer, distributed: bool) -> None:
    """Make the strategy write a distributed (sharded) checkpoint, or a full one."""
    if isinstance(trainer.strategy, FSDPStrategy):
        trainer.strategy._state_dict_type = "sharded" if distributed else "full"
    else:
        trainer.strategy._save_distributed_checkpoint = distributed


def main(mode: str, out: Path, precision: str = "32-true", ckpt: str = "") -> None:
    L.seed_everything(0)
    tp = mode == "tp"
    one = mode.startswith("shrink")  # one process, the global batch of 2 ranks on it
    if mode == "manual1":
        strategy = CPUFSDPStrategy()  # the module wraps itself
    elif mode.endswith("1"):  # FSDP1: each Linear its own unit (the rest in the root), or each Sequential for a teacher
        policy = ModuleWrapPolicy({torch.nn.Sequential if mode == "teacher1" else torch.nn.Linear})
        strategy = CPUFSDPStrategy(auto_wrap_policy=policy)
    else:
        strategy = ModelParallelStrategy(data_parallel_size=1 if tp or one else 2, tensor_parallel_size=2 if tp else 1)
    teachers = {"net": "teacher"} if mode.startswith("teacher") else None
    callback = EMAScalingCallback(momentum=MOMENTUM, base_batch_size=BASE, optimizer_rule="sgd", teachers=teachers)
    recorder = Recorder(callback, out, save_at=4 if mode in ("fsdp2", "fsdp1") else 0, save_on_start=one)
    # the EMA callback first: the recorder's validation hooks then run after its swaps
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if one else 2, strategy=strategy, precision=precision, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback, recorder], limit_val_batches=0 if mode in ("tp", "teacher", "teacher1") else None,
        use_distributed_sampler=False,
    )  # fmt: skip
    model = ShardedModel(mode, batch_size=PER_DEVICE * 2 if tp or one else PER_DEVICE)
    trainer.fit(model, ckpt_path=ckpt or None)
    val_loss = float(trainer.callback_metrics.get("val_loss", float("nan")))  # the last validation of the fit
    ema_full = {}
    if not mode.startswith("teacher"):
        if _fsdp1(trainer):  # FSDP1: through its full state dict
            with callback.ema_weights():
                ema_full = _gathered(trainer, model)
        else:  # the EMA's own DTensor views, gathered in the EMA's dtype
            ema_full = {name: _full(value).clone() for name, value in callback.ema_state_dict().items()}
    final_raw = _gathered(trainer, model)
    # evaluation from a checkpoint written after step 4 (its model entries hold the EMA): on this Trainer and on a
    # new Trainer with a new callback. FSDP2 only: Lightning does not wrap an FSDP1 module again after its fit.
    validated = {}
    if mode == "fsdp2" and precision == "32-true":
        for kind in ("full", "distributed"):
            validated[kind] = trainer.validate(model, ckpt_path=out / f"{kind}.ckpt", verbose=False)[0]["val_loss"]
        fresh = L.Trainer(
            accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            callbacks=[EMAScalingCallback(momentum=MOMENTUM, base_batch_size=BASE)],
        )  # fmt: skip
        validated["fresh"] = fresh.validate(model, ckpt_path=out / "distributed.ckpt", verbose=False)[0]["val_loss"]
    if trainer.is_global_zero:
        torch.save(
            {
                "rows": recorder.rows,
                "raw": recorder.raw,
                "ema": ema_full,
                "final_raw": final_raw,
                "val_loss": val_loss,
                "validations": recorder.validations,
                "teacher_checks": model.teacher_checks,
                "replicas": callback._replicas,
                "validated": validated,
                "swapped_save_error": recorder.swapped_save_error,
                "total_samples": recorder.total_samples,
                "progress": recorder.progress,
            },
            out / f"{mode}.pt",
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise abort the interpreter


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
