"""DeepSpeed ZeRO: what each rank averages, and how its partitions are written and put back together.

Pure torch; DeepSpeed is imported only where a ZeRO-3 parameter is met (so it is installed).

- ZeRO-1 and ZeRO-2 partition the optimizer state only: the parameters are whole on every rank and the EMA is an
  ordinary one of them (in fp32 for bf16/fp16 parameters, by ``ema_precision``).
- ZeRO-3 partitions the parameters. A parameter's ``.data`` is empty between steps (or a gathered copy, cached
  after a forward); its rank's piece is ``param.ds_tensor``, 1-D and padded at the end to ``ceil(numel / world)``
  elements. Each rank averages its own piece, without the padding (never initialised: it may hold NaN): the fp32
  master partition the optimizer updates (``deepspeed.utils.safe_get_local_fp32_param``) where the parameter is
  trained, ``ds_tensor`` otherwise (a frozen teacher). No communication per step, and EMA memory per rank = the
  rank's partition.
- A write into ``ds_tensor`` (an evaluation swap, a teacher update, a load) reaches the next forward only if no
  gathered copy is cached: the engine's ``empty_partition_cache()`` drops them, before and after the write.
- A checkpoint holds each rank's pieces with :func:`partition_layout` beside them; :func:`gather_partitions`
  stitches the pieces of every rank into full tensors (shapes restored; padded pieces are cut to the parameter).

:class:`~lightning_emascale._zero_store.ZeroPartitionStore` keeps the averages of the pieces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

#: The entry of a partitioned EMA state that says how to put it together: ``{"rank", "world_size", "shapes"}``.
PARTITIONS_KEY = "zero3_partitions"


def is_deepspeed_engine(module: object) -> bool:
    """Whether ``module`` is a ``deepspeed.DeepSpeedEngine`` (or a subclass, such as the pipeline engine)."""
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed.") for cls in type(module).__mro__
    )


def is_deepspeed_optimizer(optimizer: object) -> bool:
    """Whether ``optimizer`` is one of DeepSpeed's wrappers (ZeRO, fp16, bf16) around a torch optimizer."""
    return type(optimizer).__module__.startswith("deepspeed.")


def is_zero3(tensor: object) -> bool:
    """Whether ``tensor`` is a parameter partitioned by ZeRO-3 (it carries its rank's piece as ``ds_tensor``)."""
    return isinstance(tensor, Tensor) and hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def full_shape(tensor: Tensor) -> tuple[int, ...]:
    """A tensor's shape; a ZeRO-3 parameter's full shape (its ``.shape`` is empty between steps)."""
    return tuple(tensor.ds_shape) if is_zero3(tensor) else tuple(tensor.shape)  # type: ignore[attr-defined]


def written_piece(param: Tensor) -> Tensor:
    """The rank's piece of a ZeRO-3 parameter that the next gather reads (its model dtype, 1-D), without the padding
    ZeRO-3 adds at the end of the last pieces: never initialised, it may hold anything (NaN), and is not the
    parameter's."""
    return _unpadded(param, param.ds_tensor)  # type: ignore[attr-defined]


def _unpadded(param: Tensor, piece: Tensor) -> Tensor:
    """``piece`` (a padded 1-D partition of ``param``, or a view laid out like one) cut to the elements of ``param``
    this rank holds: all of them but on the last ranks, none on a rank past the parameter's end."""
    rank, _ = _rank_and_world()
    length = piece.numel()
    valid = max(0, min(length, int(param.ds_numel) - rank * length))  # type: ignore[attr-defined]
    return piece if valid == length else piece.narrow(0, 0, valid)


def read_piece(param: Tensor) -> tuple[Tensor, Optional[str]]:
    """The rank's piece of a ZeRO-3 parameter that an EMA update reads, and why it is not the fp32 master (``None``
    where it is, or where the parameter is frozen and has none).

    The fp32 master partition the optimizer updates in place, where the parameter is trained and the master is a view
    on its piece's device; ``ds_tensor`` otherwise."""
    piece = written_piece(param)
    if not param.requires_grad or getattr(param, "_z3_optimizer", None) is None:
        return piece, None
    from deepspeed.utils import safe_get_local_fp32_param

    try:
        master = safe_get_local_fp32_param(param)
    except (KeyError, IndexError):  # trainable, but in none of the optimizer's groups: never trained
        return piece, None
    # A view into the optimizer's flat fp32 group is updated in place; a copy (masters offloaded to another device)
    # would go stale, and the piece itself is then the one to read.
    padded = param.ds_tensor  # type: ignore[attr-defined]
    if master is None or master._base is None or master.numel() != padded.numel() or master.device != piece.device:
        where = "no master" if master is None else f"a copy on {master.device}, not a view on {piece.device}"
        return piece, where
    return _unpadded(param, master), None


def partition_group_size(param: Tensor) -> int:
    """The number of ranks a ZeRO-3 parameter is partitioned over (DeepSpeed's partition group)."""
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group=group))


def partition_layout(named: Sequence[tuple[str, Tensor]]) -> dict[str, Any]:
    """What a checkpoint of per-rank pieces needs to put them back together: this rank, the world size and the
    full shape of every partitioned tensor (by name)."""

    rank, world = _rank_and_world()
    return {
        "rank": rank,
        "world_size": world,
        "shapes": {name: list(param.ds_shape) for name, param in named if is_zero3(param)},  # type: ignore[attr-defined]
    }


def check_layout(saved: Mapping[str, Any], here: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless pieces saved with layout ``saved`` can be loaded by a rank with layout ``here``."""
    if not isinstance(saved, Mapping) or not {"rank", "world_size", "shapes"} <= set(saved):
        raise ValueError(f"{where}: its {PARTITIONS_KEY!r} entry is not a partition layout, got {saved!r}")
    if (saved["rank"], saved["world_size"]) != (here["rank"], here["world_size"]):
        raise ValueError(
            f"{where} holds the ZeRO-3 partitions of rank {saved['rank']} of {saved['world_size']}, and this is rank"
            f" {here['rank']} of {here['world_size']}: a partitioned EMA resumes at the world size it was saved with."
            " To change the world size, consolidate the checkpoint directory into one file with"
            " `lightning_emascale.consolidate_deepspeed_checkpoint` and load that"
        )
    changed = sorted(name for name, shape in here["shapes"].items() if saved["shapes"].get(name) != shape)
    if changed:
        raise ValueError(
            f"{where}: the saved shapes of {changed[:5]} differ from the model's"
            f" ({[saved['shapes'].get(name) for name in changed[:5]]} saved,"
            f" {[here['shapes'][name] for name in changed[:5]]} now); was it written for another model?"
        )


def piece_length(numel: int, world_size: int) -> int:
    """Elements in each rank's piece of a tensor of ``numel`` elements (ZeRO-3 pads the last piece)."""
    return math.ceil(numel / world_size)


def gather_partitions(pieces: Sequence[Mapping[str, Tensor]], shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Full tensors from every rank's pieces (``pieces[r]``: rank ``r``'s, by name): the pieces of a partitioned name
    concatenated in rank order, the padding stripped and the shape restored; other names taken from rank 0."""
    full: dict[str, Tensor] = {}
    for name, value in pieces[0].items():
        if name not in shapes:
            full[name] = value
            continue
        shape = list(shapes[name])
        numel = math.prod(shape)
        joined = torch.cat([rank_pieces[name].reshape(-1) for rank_pieces in pieces])
        if joined.numel() < numel:
            raise ValueError(
                f"The pieces of {name!r} hold {joined.numel()} elements over {len(pieces)} ranks, fewer than its"
                f" shape {shape} needs ({numel}): a rank's file is missing or from another run"
            )
        full[name] = joined[:numel].reshape(shape).clone()
    return full


def check_pieces(names: Sequence[str], params: Sequence[Optional[Tensor]], values: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` for a saved value that is neither this rank's piece of its ZeRO-3 parameter (1-D, its
    length) nor the full tensor (the parameter's shape)."""
    for name, param, value in zip(names, params, values):
        if param is None:
            continue
        expected = written_piece(param).numel()
        full = list(param.ds_shape)  # type: ignore[attr-defined]
        if not (value.dim() == 1 and value.numel() == expected) and list(value.shape) != full:
            raise ValueError(
                f"The saved EMA of {name!r} is a tensor of shape {list(value.shape)}: it is neither this rank's ZeRO-3"
                f" piece of it ({expected} elements, 1-D) nor the full tensor ({full}). Was it saved at another world"
                " size? Consolidate the checkpoint with `consolidate_deepspeed_checkpoint` and load the full EMA"
            )


def local_pieces(params: Sequence[Optional[Tensor]], values: Sequence[Tensor]) -> list[Tensor]:
    """Saved values (checked by :func:`check_pieces`) as this rank's pieces: a full tensor is cut where ZeRO-3 cuts
    it, so a consolidated EMA loads at any world size, with no communication."""

    rank, _ = _rank_and_world()
    pieces = []
    for param, value in zip(params, values):
        length = written_piece(param).numel() if param is not None else 0
        full = None if param is None else list(param.ds_shape)  # type: ignore[attr-defined]
        if param is None or (value.dim() == 1 and value.numel() == length and list(value.shape) != full):
            pieces.append(value)
            continue
        start = rank * param.ds_tensor.numel()  # type: ignore[attr-defined]  # where ZeRO-3 puts this rank's piece
        pieces.append(value.reshape(-1)[start : start + length])
    return pieces


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
