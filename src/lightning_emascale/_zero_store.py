"""The store of a DeepSpeed ZeRO-3 module: each rank's pieces of its parameters (see :mod:`lightning_emascale._zero`),
averaged in a :class:`~lightning_emascale._store.TensorStore`, and what an evaluation swap writes. Pure torch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor

from lightning_emascale._store import TensorStore
from lightning_emascale._warnings import caller_level
from lightning_emascale._zero import (
    check_pieces,
    is_zero3,
    local_pieces,
    partition_group_size,
    partition_layout,
    read_piece,
    written_piece,
)


class ZeroPartitionStore:
    """The averages of a ZeRO-3 module's tensors, kept per rank: a partitioned parameter's piece (:func:`read_piece`),
    every other tensor (buffers, parameters ZeRO-3 left whole) as it is, all in one
    :class:`~lightning_emascale._store.TensorStore` (the same multi-tensor update). Implements
    :class:`~lightning_emascale._store.Store`.

    A swap writes :attr:`targets`: ``ds_tensor`` of a partitioned parameter, whose gathered copies the owner drops
    (the engine's ``empty_partition_cache()``) before and after.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        precision: str = "fp32",
        is_buffer: Optional[Sequence[bool]] = None,
        flat_parameters: bool = False,
        offload: bool = False,
    ) -> None:
        if flat_parameters or offload:
            option = "flat_parameters=True" if flat_parameters else "offload=True"
            raise ValueError(
                f"`{option}` does not apply to a module partitioned by DeepSpeed ZeRO-3: its parameters live in"
                " DeepSpeed's own buffers and each rank averages only its partition (1/world of the EMA). Leave it"
                " False" + (" (offload the optimizer with DeepSpeed's `offload_optimizer` instead)" if offload else "")
            )
        #: The ZeRO-3 parameter of each tracked tensor that is a rank's piece of one (``None`` for the others).
        self.sources: list[Optional[Tensor]] = [tensor if is_zero3(tensor) else None for _, tensor in named]
        #: What a checkpoint of these pieces needs to put them back together.
        self.partition_layout: Optional[dict[str, Any]] = partition_layout(named)
        world = self.partition_layout["world_size"]
        sizes = [(name, partition_group_size(tensor)) for name, tensor in named if is_zero3(tensor)]
        other = [(name, size) for name, size in sizes if size != world]
        if other:
            raise ValueError(
                f"{other[0][0]!r} is partitioned over {other[0][1]} ranks and the world has {world} (a smaller"
                " partition group: MiCS, hierarchical partitioning, sequence or tensor parallelism): an EMA per"
                " partition is supported where ZeRO-3 partitions over the whole world only"
            )
        pieces: list[tuple[str, Tensor]] = []
        stale: list[str] = []
        for name, tensor in named:
            if not is_zero3(tensor):
                pieces.append((name, tensor))
                continue
            piece, why = read_piece(tensor)
            pieces.append((name, piece))
            if why is not None:
                stale.append(f"{name!r} ({why})")
        if stale:
            warnings.warn(
                f"The fp32 master partitions of {', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''} are not"
                " updated in place where their pieces live (the optimizer is offloaded?): the EMA averages the"
                " model-dtype pieces (`ds_tensor`) instead, which differ from the masters by their rounding",
                UserWarning,
                stacklevel=caller_level(),
            )
        self._store = TensorStore(pieces, precision, is_buffer)  # type: ignore[arg-type]
        self.names = self._store.names
        self.tracked = self._store.tracked
        self.averages = self._store.averages
        #: The tensors a swap writes, one per tracked tensor: a partitioned parameter's ``ds_tensor``.
        self.targets: list[Tensor] = [
            tracked if source is None else written_piece(source) for tracked, source in zip(self.tracked, self.sources)
        ]

    @property
    def use_side_stream(self) -> bool:
        return self._store.use_side_stream

    @use_side_stream.setter
    def use_side_stream(self, enabled: bool) -> None:
        self._store.use_side_stream = enabled

    def update(self, weight: float, only_if: Optional[Tensor] = None) -> None:
        self._store.update(weight, only_if)

    def join(self) -> None:
        self._store.join()

    def flush(self) -> None:
        self._store.flush()

    def refresh(self) -> None:
        self._store.refresh()

    def follow(self) -> None:
        """Nothing to follow: DeepSpeed keeps each piece in place (``ds_tensor`` and the fp32 masters are views into
        its flat buffers)."""

    def views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors`` as they are: a partitioned parameter's as its rank's 1-D piece (see :attr:`partition_layout`)."""
        return list(tensors)

    def check_values(self, values: Sequence[Tensor]) -> None:
        check_pieces(self.names, self.sources, values)  # a piece's length, or a full tensor's shape
        self._store.check_values(local_pieces(self.sources, values))  # dtypes, and the other tensors' shapes

    def local_values(self, values: Sequence[Tensor]) -> list[Tensor]:
        return local_pieces(self.sources, values)
