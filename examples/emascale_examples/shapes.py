"""Harder generated images for the self-supervised studies, and batched tensor augmentations for their views.

The classes are shapes; everything a random network picks up easily (the colours, the background, the position,
the scale) is drawn at random per image, so a kNN vote on untrained features is near chance while the shape is
learnable (the pilot in ``studies/byol_study.py --pilot`` measures both).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

SHAPES = ("disk", "square", "ring", "diamond", "plus", "cross", "triangle", "frame", "bars", "crescent")


def _masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(classes, n, size, size) boolean masks of every shape at the per-image coordinates ``u``, ``v``."""
    r, box, diamond = (u**2 + v**2).sqrt(), torch.maximum(u.abs(), v.abs()), u.abs() + v.abs()
    return torch.stack(
        [
            r < 0.9,
            box < 0.75,
            (r > 0.55) & (r < 0.95),
            diamond < 1.0,
            ((u.abs() < 0.28) | (v.abs() < 0.28)) & (box < 0.95),
            (((u - v).abs() < 0.35) | ((u + v).abs() < 0.35)) & (box < 0.85),
            (v > -0.75) & (v < 0.75) & (u.abs() < (v + 0.75) / 1.6),
            (box > 0.5) & (box < 0.85),
            ((v.abs() - 0.5).abs() < 0.2) & (u.abs() < 0.9),
            (r < 0.9) & ((u - 0.45) ** 2 + v**2 > 0.5),
        ]
    )


def shape_images(n: int, seed: int, size: int = 32, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images in [0, 1], (n, 3, size, size), of the ten ``SHAPES``, and their labels (balanced at random).

    Per image: a random shape colour and background colour (a background within 0.3 of the shape's colour is
    replaced by its complement), a small random rotation (up to 0.25 rad: a larger one would turn a plus into a
    cross), a random scale (the shape spans about 40-60 % of the side) and position, a random distractor disk,
    and Gaussian pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPES), (n,), generator=g)
    grid = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    angle = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * 0.25
    scale = 0.45 + 0.2 * torch.rand(n, 1, 1, generator=g)
    centre = (torch.rand(n, 2, 1, 1, generator=g) - 0.5) * 0.7
    dx, dy = x - centre[:, 0], y - centre[:, 1]
    u = (dx * angle.cos() + dy * angle.sin()) / scale
    v = (-dx * angle.sin() + dy * angle.cos()) / scale
    mask = _masks(u, v)[labels, torch.arange(n)].unsqueeze(1)
    foreground = torch.rand(n, 3, 1, 1, generator=g)
    background = torch.rand(n, 3, 1, 1, generator=g)
    apart = (foreground - background).norm(dim=1, keepdim=True).clamp_min(1e-6)
    background = torch.where(apart < 0.3, (1 - foreground), background)  # keep the shape visible
    distractor = (torch.rand(n, 2, 1, 1, generator=g) - 0.5) * 1.6
    blob = ((x - distractor[:, 0]) ** 2 + (y - distractor[:, 1]) ** 2 < 0.03).unsqueeze(1)
    blob_colour = torch.rand(n, 3, 1, 1, generator=g)
    images = torch.where(mask, foreground, background)
    images = torch.where(blob & ~mask, blob_colour, images)
    return (images + noise * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), labels


def random_crops(images: torch.Tensor, size: int, scale: tuple[float, float], flip: bool = True) -> torch.Tensor:
    """Random resized crops of a batch (area ``scale`` of the image, aspect 3/4 to 4/3), resampled to ``size``,
    with random horizontal flips: one ``affine_grid`` and one ``grid_sample`` for the whole batch."""
    n = len(images)
    area = torch.empty(n).uniform_(*scale)
    aspect = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    shift_x, shift_y = (torch.rand(n) * 2 - 1) * (1 - width), (torch.rand(n) * 2 - 1) * (1 - height)
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def colour_jitter(images: torch.Tensor, strength: float = 0.4, grey: float = 0.2) -> torch.Tensor:
    """Per image: the colour channels shuffled, each channel's gain, the brightness, contrast and saturation
    scaled by up to ``strength``, and greyscale with probability ``grey``. The shuffle matters: two views of one
    image must not share its colours, or matching them needs no shape at all."""
    n = len(images)

    def factor(channels: int = 1) -> torch.Tensor:
        return (1 + (torch.rand(n, channels, 1, 1) * 2 - 1) * strength).to(images)

    out = images.gather(1, torch.rand(n, 3).argsort(1)[:, :, None, None].expand_as(images)) * factor(3)
    out = out * factor()
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor() + mean
    luma = out.mean(dim=1, keepdim=True)
    out = (out - luma) * factor() + luma
    out = torch.where((torch.rand(n, 1, 1, 1) < grey).to(images.device), luma.expand_as(out), out)
    return out.clamp(0, 1)


def view(images: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """One augmented view of a batch: a random resized crop, a flip and colour jitter, centred on 0.5."""
    return colour_jitter(random_crops(images, size, scale)) - 0.5
