"""Generated 32x32 image-classification data, so that the examples run offline (no download)."""

from __future__ import annotations

import torch


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
