"""Generated data, so that the examples run offline (no download), CIFAR-10 if asked, and the classifier datamodule."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split


def pattern_images(
    n: int, classes: int = 10, size: int = 32, noise: float = 0.15, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images in [0, 1], (n, 3, size, size), and their labels.

    Each class is a fixed random low-frequency colour pattern (the same for every ``seed``, so train and
    validation splits share them), shown at a random cyclic shift with Gaussian pixel noise of std ``noise``.
    """
    g = torch.Generator().manual_seed(1234)
    patterns = torch.nn.functional.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randint(0, size, (n, 2), generator=g)
    images = torch.stack([patterns[y].roll(tuple(s.tolist()), dims=(1, 2)) for y, s in zip(labels, shifts)])
    return (images + noise * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), labels


def synthetic(n: int = 8192, dim: int = 64, seed: int = 0) -> TensorDataset:
    """Ten Gaussian clusters in ``dim`` dimensions with label noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, dim, generator=g) * 1.5
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g) * 2.0
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, 10, (n,), generator=g), y)
    return TensorDataset(x, y)


def cifar10(root: str) -> tuple[TensorDataset, int]:  # pragma: no cover - needs a download
    import torchvision

    data = torchvision.datasets.CIFAR10(root, train=True, download=True)
    x = torch.tensor(data.data).permute(0, 3, 1, 2).float().div(255)
    return TensorDataset(x, torch.tensor(data.targets)), 3 * 32 * 32


class Data(L.LightningDataModule):
    """The synthetic 10-class problem of quickstart.py (or CIFAR-10), 90% train and 10% validation."""

    def __init__(self, batch_size: int = 32, samples: int = 8192, cifar10_root: str | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size  # ProgressiveBatchCallback sets this, as BatchSizeFinder would
        dataset = cifar10(cifar10_root)[0] if cifar10_root else synthetic(n=samples)
        self.train, self.val = random_split(dataset, [0.9, 0.1], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=512)
