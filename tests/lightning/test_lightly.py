"""lightly's BYOL and DINO modules, minus their own momentum updates, on both Lightning packages' Trainers."""

from __future__ import annotations

import copy

import lightning
import pytest
import pytorch_lightning
import torch
from lightly.loss import DINOLoss, NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback, cosine_schedule

PACKAGES = {"lightning.pytorch": lightning.pytorch, "pytorch_lightning": pytorch_lightning}


def small_backbone() -> torch.nn.Module:
    # lightly's examples use a ResNet-18; a small CNN keeps the test fast and exercises BatchNorm the same way
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    )


def views(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)
    return DataLoader(TensorDataset(x0, x1), batch_size=4)


def byol_class(pl):
    class BYOL(pl.LightningModule):
        """lightly's BYOL example with its `update_momentum` and `cosine_schedule` lines deleted."""

        def __init__(self):
            super().__init__()
            self.backbone = small_backbone()
            self.projection_head = BYOLProjectionHead(8, 16, 8)
            self.prediction_head = BYOLPredictionHead(8, 16, 8)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)
            self.criterion = NegativeCosineSimilarity()

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

        def training_step(self, batch, batch_idx):
            x0, x1 = batch
            p0, z0 = self.forward(x0), self.forward_momentum(x0)
            p1, z1 = self.forward(x1), self.forward_momentum(x1)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.06)

    return BYOL


def dino_class(pl):
    class DINO(pl.LightningModule):
        """lightly's DINO example with its `update_momentum` and `cosine_schedule` lines deleted."""

        def __init__(self):
            super().__init__()
            self.student_backbone = small_backbone()
            self.student_head = DINOProjectionHead(8, 16, 8, 32, freeze_last_layer=1)
            self.teacher_backbone = copy.deepcopy(self.student_backbone)
            self.teacher_head = DINOProjectionHead(8, 16, 8, 32)
            self.teacher_head.load_state_dict(self.student_head.state_dict())
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)
            self.criterion = DINOLoss(output_dim=32, warmup_teacher_temp_epochs=1)

        def training_step(self, batch, batch_idx):
            views_ = list(batch)
            teacher_out = [self.teacher_head(self.teacher_backbone(v).flatten(1)) for v in views_]
            student_out = [self.student_head(self.student_backbone(v).flatten(1)) for v in views_]
            return self.criterion(teacher_out, student_out, epoch=self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return DINO


def spy_class(pl, pairs):
    class Spy(pl.Callback):
        def __init__(self, ema):
            self.ema, self.steps = ema, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step
            self.before = {t: copy.deepcopy(pl_module.get_submodule(t).state_dict()) for t in pairs.values()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # an accumulated micro-batch leaves the teacher alone (rho-hat = 1); a step moves it with its rho-hat
            rho = self.ema.ema_momentum if trainer.global_step > self.step else 1.0
            for online_path, teacher_path in pairs.items():
                online = dict(pl_module.get_submodule(online_path).named_parameters())
                for name, value in pl_module.get_submodule(teacher_path).named_parameters():
                    expected = rho * self.before[teacher_path][name] + (1 - rho) * online[name].detach()
                    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
            if trainer.global_step > self.step:
                self.steps.append(rho)

    return Spy


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize(
    ("make_module", "pairs", "extra"),
    [
        (byol_class, {"backbone": "backbone_momentum", "projection_head": "projection_head_momentum"}, {}),
        (
            dino_class,
            {"student_backbone": "teacher_backbone", "student_head": "teacher_head"},
            {"momentum_attributes": {"criterion.center_momentum": 0.9}},
        ),
    ],
    ids=["byol", "dino"],
)
def test_lightly_teacher_on_both_trainers(package, make_module, pairs, extra):
    pl = PACKAGES[package]
    pl.seed_everything(0)
    model = make_module(pl)()
    ema = EMAScalingCallback(
        momentum=0.99, base_batch_size=2, teachers=pairs, momentum_schedule="cosine", final_momentum=1.0, **extra
    )
    spy = spy_class(pl, pairs)(ema)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[ProgressiveBatchCallback({1: 8}, mode="accumulation"), ema, spy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, views())
    # 16 samples per epoch in batches of 4 against base 2: kappa 2, then 2 accumulated (kappa 4) in epoch 1;
    # the cosine runs on samples before the step / 32
    starts, kappas = [0, 4, 8, 12, 16, 24], [2, 2, 2, 2, 4, 4]
    expected = [cosine_schedule(s / 32, 0.99, 1.0) ** k for s, k in zip(starts, kappas)]
    assert spy.steps == pytest.approx(expected, rel=1e-12)
    if "momentum_attributes" in extra:
        assert model.criterion.center_momentum == 0.9
        assert trainer.callback_metrics["ema/criterion.center_momentum"] == pytest.approx(0.81)


def test_a_pytorch_lightning_gradient_accumulation_scheduler_is_recognised():
    pl = pytorch_lightning
    trainer = pl.Trainer(
        callbacks=[
            ProgressiveBatchCallback({1: 8}, mode="accumulation"),
            pl.callbacks.GradientAccumulationScheduler({1: 2}),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.raises(ValueError, match="remove the GradientAccumulationScheduler"):
        trainer.fit(byol_class(pl)(), views())
