"""The ResNet-8 classifier and the noisy generated images of the supervised studies (supervised.py, post_hoc_study.py)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset

from emascale_examples.data import pattern_images
from lightning_emascale import SampleClockLR, WarmupCosine


class Block(nn.Module):
    """A ResNet basic block."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), channels: int = 3) -> nn.Sequential:
    """A ResNet-8 for small images (32x32, or Fashion-MNIST's 28x28 with ``channels=1``): a stem, one basic block per
    stage, global pooling, a linear head."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
    ]  # fmt: skip
    for index, width in enumerate(widths):
        layers.append(Block(widths[max(index - 1, 0)], width, stride=1 if index == 0 else 2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


class Classifier(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float = 5e-4, warmup: float = 0.1, channels: int = 3) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup
        self.net = small_resnet(channels=channels)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        # Warm-up and cosine decay on samples seen: they end at the same sample counts at every batch size
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=self.warmup, final=0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def generated_data(n_train: int, n_val: int, label_noise: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Noisy shifted patterns, with ``label_noise`` of the training labels replaced at random (where EMA helps)."""
    x, y = pattern_images(n_train, noise=1.25, seed=0)
    flip = torch.rand(n_train, generator=torch.Generator().manual_seed(2)) < label_noise
    y = torch.where(flip, torch.randint(0, 10, (n_train,), generator=torch.Generator().manual_seed(3)), y)
    val_x, val_y = pattern_images(n_val, noise=1.25, seed=1)
    return TensorDataset(x, y), TensorDataset(val_x, val_y)
