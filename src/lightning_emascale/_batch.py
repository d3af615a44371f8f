"""How many samples a micro-batch holds, measured so that an ambiguous batch raises instead of miscounting kappa.

Pure torch. Lightning's ``extract_batch_size`` takes the first tensor it meets, so a dict whose first entry is a
1-element metadata tensor counts one sample, and a batch of lists counts a feature dimension. Here every tensor's
first dimension (and the length of every list of non-tensor items, e.g. strings) is a candidate, and they must
agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor


def _is_array(value: Any) -> bool:
    """A tensor, or an array that has a shape (numpy)."""
    return isinstance(value, Tensor) or isinstance(getattr(value, "shape", None), tuple)


def _candidates(batch: Any, path: str) -> Iterator[tuple[str, int]]:
    if _is_array(batch):
        if len(batch.shape) > 0:
            yield path or "batch", batch.shape[0]
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _candidates(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)):
        inner = [] if not batch or not _holds_tensor(batch) else list(_candidates_of_items(batch, path))
        records = all(isinstance(item, Mapping) for item in batch)
        if batch and (not inner or (records and len({size for _, size in inner}) > 1)):
            # one entry per sample: strings, numbers, or records (dicts) without a shared batch dimension
            yield path or "batch", len(batch)
        else:
            yield from inner
    elif hasattr(batch, "__dataclass_fields__"):
        for name in batch.__dataclass_fields__:
            yield from _candidates(getattr(batch, name), f"{path}.{name}")


def _holds_tensor(value: Any) -> bool:
    if _is_array(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(item) for item in value)
    return False


def _candidates_of_items(batch: Any, path: str) -> Iterator[tuple[str, int]]:
    for index, item in enumerate(batch):
        yield from _candidates(item, f"{path}[{index}]")


def measure_batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension its tensors (and lists of values) share.

    Raises ``ValueError`` naming the entries when they disagree or when nothing has a batch dimension.
    """
    found = list(_candidates(batch, ""))
    sizes = {size for _, size in found}
    if len(sizes) == 1:
        return sizes.pop()
    if not found:
        raise ValueError(
            f"Cannot measure the batch size of a {type(batch).__name__}: it holds no tensor with a batch"
            " dimension. Override `batch_size_of(batch)` to return the samples in one micro-batch on this device"
        )
    listed = ", ".join(f"{where}: {size}" for where, size in found[:6])
    raise ValueError(
        f"The batch size is ambiguous: the batch's entries have different first dimensions ({listed}), so kappa"
        " could be counted from the wrong one. Override `batch_size_of(batch)` to return the samples in one"
        " micro-batch on this device (e.g. `return len(batch['input'])`)"
    )
