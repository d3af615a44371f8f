"""Tiny LightningModules (supervised, BYOL-shaped) and a Trainer factory shared by the end-to-end tests, and a
small plain-PyTorch model with a training step shared by the core's tests in unit/."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_emascale import SampleClockLR, ScaledEMA, WarmupCosine

SAMPLE_CLOCK_LR = WarmupCosine(warmup=0.2, final=0.1)


class TinyModel(L.LightningModule):
    """Linear -> BatchNorm -> Linear regression on fixed random data (BatchNorm gives float and int buffers)."""

    def __init__(
        self,
        n_samples: int = 32,
        batch_size: int = 4,
        optimizer: str = "sgd",
        lr: float = 0.1,
        scheduler: str | None = None,
        loader: str = "plain",
        shuffle: bool = False,
        own_sampler: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n_samples, 6, generator=generator)
        self.y = torch.randn(n_samples, 1, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        # "stateful" (torchdata) lets Lightning resume mid-epoch at the exact batch; a plain DataLoader restarts
        # the interrupted epoch's data from its first batch.
        cls = StatefulDataLoader if self.hparams.loader == "stateful" else DataLoader
        dataset = TensorDataset(self.x, self.y)
        if self.hparams.own_sampler:
            # With Trainer(use_distributed_sampler=False): seeded by the epoch *before* a stateful loader
            # restores its position, so a shuffled DDP order survives a mid-epoch resume.
            trainer = self.trainer
            sampler = DistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=True, seed=0)
            sampler.set_epoch(trainer.current_epoch)
            return cls(dataset, batch_size=self.hparams.batch_size, sampler=sampler)
        return cls(dataset, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=4)

    def configure_optimizers(self) -> Any:
        name, lr = self.hparams.optimizer, self.hparams.lr
        if name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        elif name == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
        schedulers = {
            None: None,
            "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
            "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9),
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=100),
            "sample_clock": lambda: SampleClockLR(optimizer, SAMPLE_CLOCK_LR),
        }
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = schedulers[self.hparams.scheduler]()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ReleaseProcessGroup(L.Callback):
    """Destroys the gloo process group when fit ends in each worker.

    Lightning registers no exit handler for gloo (only NCCL), and a worker that exits with a live gloo group
    aborts now and then ("terminate called without an active exception"), failing a run that had succeeded.
    Callbacks' ``teardown`` runs after the strategy's, and nothing collective follows it.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def make_trainer(callbacks: list, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    if "ddp" in str(defaults.get("strategy", "")):
        callbacks = [*callbacks, ReleaseProcessGroup()]
    return L.Trainer(callbacks=callbacks, **defaults)


class StepRecorder(L.Callback):
    """Records the raw weights after every optimizer step (run after the EMA callback)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.batch_sizes: list[int] = []
        self._samples = 0
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._samples += len(batch[0])
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:
            state = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
            self.weights.append({k: v.detach().clone() for k, v in state.items()})
            self.batch_sizes.append(self._samples * trainer.world_size)
            self._samples = 0


def reference_ema(initial: dict[str, torch.Tensor], recorder: StepRecorder, momentum: float, base: int) -> dict:
    """Algorithm-level reference: zeta <- rho^kappa zeta + (1 - rho^kappa) theta after each step, in float64."""
    ema = {k: v.double() for k, v in initial.items()}
    for weights, batch in zip(recorder.weights, recorder.batch_sizes):
        rho = momentum ** (batch / base)
        for k, v in weights.items():
            ema[k] = rho * ema[k] + (1 - rho) * v.double() if v.is_floating_point() else v.double()
    return ema


PAIRS = {"backbone": "backbone_momentum", "head": "head_momentum"}


class Center:
    """Stands in for lightly's DINOLoss: a momentum attribute read on every forward."""

    def __init__(self) -> None:
        self.center_momentum = 0.9
        self.seen: list[float] = []


class TinyBYOL(L.LightningModule):
    """A BYOL-shaped module: online backbone + head, frozen momentum twins that feed the loss."""

    def __init__(self, n_samples: int = 32, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 4)
        self.predictor = torch.nn.Linear(4, 4)
        self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(False)
        self.head_momentum = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = Center()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_samples, 6, generator=generator)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.criterion.seen.append(self.criterion.center_momentum)
        online = self.predictor(self.head(self.backbone(x + 0.1 * x.roll(1, dims=1))))  # a fixed "view"
        with torch.no_grad():
            target = self.head_momentum(self.backbone_momentum(x))
        return -torch.nn.functional.cosine_similarity(online, target).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


DINO_DIM = 16
DINO_PAIRS = {"backbone": "backbone_momentum", "head": "head_momentum"}


class TinyDINO(L.LightningModule):
    """A DINO-shaped module: student backbone + head, frozen teacher twins, lightly's DINOLoss with its centre.

    No BatchNorm, and micro-batches of equal size, so that accumulation (each micro-batch's mean loss / 4) gives the
    gradient of one batch: everything but the centre matches the large-batch run with or without the fix.
    """

    def __init__(self, n_samples: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU())
        self.head = torch.nn.Linear(8, DINO_DIM)
        self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(False)
        self.head_momentum = copy.deepcopy(self.head).requires_grad_(False)
        from lightly.loss import DINOLoss  # lightly is in the test extra; imported here for the tests that use it

        self.criterion = DINOLoss(output_dim=DINO_DIM, teacher_temp=0.1, center_momentum=0.9)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_samples, 6, generator=generator)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        views = [x, 0.5 * x + x.roll(1, dims=1)]  # two fixed "views"
        with torch.no_grad():
            teacher_out = [self.head_momentum(self.backbone_momentum(v)) for v in views]
        student_out = [self.head(self.backbone(v)) for v in views]
        return self.criterion(teacher_out, student_out)

    def validation_step(self, batch, batch_idx):  # the loss in eval mode: lightly's own centre update
        self.log("val_loss", self.training_step(batch, batch_idx))

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:16]), batch_size=8)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def no_warning_matching(record: list[warnings.WarningMessage], text: str) -> bool:
    """Whether none of the warnings caught by ``warnings.catch_warnings(record=True)`` contains ``text``."""
    return not any(text in str(warning.message) for warning in record)


# ------------------------------------------------------------------------------- plain PyTorch (the core's tests)
class Annealed(torch.nn.Module):
    """A generator, a discriminator and an annealed temperature that is not in the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.discriminator = torch.nn.Linear(4, 1)
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.generator(x)) / self.temperature


def step(ema: ScaledEMA, model: torch.nn.Module, optimizer: torch.optim.Optimizer, size: int = 4) -> None:
    """One training step of ``size`` random samples of :class:`Annealed`, counted on the EMA's clock."""
    model(torch.randn(size, 3)).pow(2).mean().backward()
    ema.count_samples(size)
    optimizer.step()
    optimizer.zero_grad()


def trained() -> tuple[ScaledEMA, dict]:
    """A ScaledEMA of :class:`Annealed` with ``skip_non_finite`` after one step, and a copy of its saved state."""
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, skip_non_finite=True)
    step(ema, model, optimizer)
    return ema, copy.deepcopy(ema.state_dict())
