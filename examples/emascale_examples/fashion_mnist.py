"""Fashion-MNIST, read offline from Debian's ``dataset-fashion-mnist`` package (or any folder holding its four IDX
files): real 28x28 greyscale images of ten kinds of clothing, 60,000 for training and 10,000 for testing."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Union

import torch

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: The classes, in label order.
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: IDX magic numbers: unsigned bytes (0x08), then the number of dimensions.
_MAGIC = {1: 0x0801, 3: 0x0803}


def read_idx(path: Path, dimensions: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzipped or not) with ``dimensions`` dimensions, as a uint8 tensor."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[dimensions]:
        raise ValueError(f"{path} is not an IDX file of {dimensions}-dimensional unsigned bytes: its magic number is"
                         f" {magic:#06x}, expected {_MAGIC[dimensions]:#06x}")  # fmt: skip
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions)]
    start = 4 + 4 * dimensions
    expected = start + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes, but its header {shape} needs {expected}")
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(shape)


def load(split: str = "train", folder: Optional[Union[str, Path]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` ("train" or "test") of Fashion-MNIST: images as float32 in [0, 1], shape (n, 1, 28, 28), and
    int64 labels. ``folder`` defaults to the Debian package's; a missing file raises ``FileNotFoundError`` saying
    how to install it."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder) if folder is not None else DEBIAN_FOLDER
    paths = [folder / name for name in FILES[split]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST's {split} split is not in {folder} (missing: {', '.join(missing)}). Install Debian's"
            " package with `apt-get install dataset-fashion-mnist` (it puts the files in"
            f" {DEBIAN_FOLDER}), or pass the folder holding {', '.join(FILES[split])}."
        )
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    return images.unsqueeze(1).float().div(255), labels.long()


def subset(
    split: str, n: int, seed: int, folder: Optional[Union[str, Path]] = None, exclude: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images of ``split`` drawn at random by ``seed`` (none of the indices in ``exclude``): images, labels
    and their indices in the split."""
    images, labels = load(split, folder)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if exclude is not None:
        order = order[~torch.isin(order, exclude)]
    if not 0 < n <= len(order):
        raise ValueError(f"n must be in [1, {len(order)}] for the {split} split, got {n}")
    index = order[:n]
    return images[index], labels[index], index
