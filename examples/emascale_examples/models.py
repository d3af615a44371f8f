"""The small classifier of quickstart.py, progressive.py and configs/supervised.yaml."""

from __future__ import annotations

import lightning as L
import torch

from lightning_emascale import EMAScalingCallback, SampleClockLR, WarmupCosine


class Classifier(L.LightningModule):
    def __init__(self, in_features: int, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(in_features, 256),
            torch.nn.BatchNorm1d(256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        ema = next(c for c in self.trainer.callbacks if isinstance(c, EMAScalingCallback))
        self.log("val_acc_raw", (self(x).argmax(1) == y).float().mean())
        self.log("val_acc_ema", (ema.functional_call(self, (x,)).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ScheduledClassifier(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        # LR(s) = lr x WarmupCosine(samples seen / total samples); the EMA callback is the clock
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.05))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
