"""Sharded tensors (``DTensor``: FSDP2 ``fully_shard``, tensor parallelism; FSDP1 with ``use_orig_params=True``): the
piece each rank averages. Pure torch.

A sharded parameter is a ``DTensor`` whose rank-local piece (``to_local()``) lives in storage the strategy owns:
the optimizer writes it in place, and FSDP2 all-gathers from it before each forward. The EMA of a sharded module
is therefore kept per rank, of the local pieces only, with the ordinary multi-tensor update: no gather and no
communication per step, and EMA memory per rank = the rank's shard. Three things need the global layout:

- writing the local pieces (an evaluation swap, a teacher update, a load) must be followed by :func:`reshard` of
  the FSDP2 modules, or a module left unsharded (the root after a no-grad forward, ``reshard_after_forward=False``)
  would run its next forward on the stale gathered copy;
- a checkpoint stores a local piece as a :func:`global_view`, a ``DTensor`` laid out like its parameter, which a
  distributed checkpoint writes shard by shard and ``full_tensor()`` gathers for a full one;
- a saved value comes back through :func:`local_piece_of`, from a ``DTensor`` laid out alike or from a full tensor
  (sliced on each rank, no communication), so a full checkpoint also resumes at another world size.

FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``) keeps each original parameter as a plain tensor
whose ``.data`` is a 1-D view of the rank's slice of a flat parameter between steps, and a view of the gathered
flat parameter during forward and backward (and after a no-grad forward of a module left gathered). The EMA reads
and writes those views after :func:`reshard_fsdp1` has put every module back on its shard; checkpoints go through
FSDP1's own state dicts (the owner's job).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
except ImportError:  # pragma: no cover - torch built without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]
    FSDP1 = None  # type: ignore[assignment,misc]

#: The wrapper names FSDP1 and activation checkpointing insert into parameter names (removed from the EMA's names,
#: which are the checkpoint's keys).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers' inserted module names (FSDP1, activation checkpointing)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_fsdp1(module: object) -> bool:
    """Whether ``module`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    return FSDP1 is not None and isinstance(module, FSDP1)


def fsdp1_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP1 wrappers in ``root``, itself included."""
    return list(FSDP1.fsdp_modules(root)) if FSDP1 is not None else []


def fsdp1_wraps_whole(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` belongs to an FSDP1 unit inside it (``module`` itself or below), so
    that no unit mixes them with parameters from outside."""

    def covered(submodule: torch.nn.Module, inside: bool) -> bool:
        inside = inside or is_fsdp1(submodule)
        if not inside and any(p is not None for p in submodule._parameters.values()):
            return False
        return all(covered(child, inside) for child in submodule.children())

    return covered(module, False)


# FSDP1 has no public API for the two things below: its private one is used here and nowhere else.
def fsdp1_uses_orig_params(unit: torch.nn.Module) -> bool:
    """Whether an FSDP1 wrapper keeps the original parameters (``use_orig_params=True``)."""
    return bool(getattr(unit, "_use_orig_params", False))


def reshard_fsdp1(modules: Iterable[torch.nn.Module]) -> None:
    """Put every FSDP1 module left gathered (the root after a no-grad forward) back on its shard: its original
    parameters then view the rank's slice again, and the next forward gathers what the EMA wrote there.

    FSDP1 has no public call for this; its own reshard step is used (a module already on its shard is skipped)."""
    from torch.distributed.fsdp._runtime_utils import _reshard

    for module in modules:
        handle = getattr(module, "_handle", None)
        if handle is not None and handle.uses_sharded_strategy and not handle.needs_unshard():
            _reshard(module, handle, free_unsharded_flat_param=True)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded or replicated parameter of FSDP2 or tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_piece(tensor: Tensor) -> Tensor:
    """This rank's piece of a ``DTensor``, sharing its storage (writes reach the parameter), outside autograd."""
    with torch.no_grad():
        return tensor.to_local()  # type: ignore[attr-defined]


def storage_moved(tensor: Tensor, piece: Tensor) -> bool:
    """Whether the ``DTensor`` ``tensor`` holds its local piece in other storage than ``piece`` now (FSDP2 replaces
    it when a parameter is reset, e.g. after ``to_empty`` or an assigning load). One attribute look per tensor."""
    local = getattr(tensor, "_local_tensor", None)
    if local is None:  # pragma: no cover - a DTensor without the attribute: look through the public API
        local = local_piece(tensor)
    return local.data_ptr() != piece.data_ptr() or local.shape != piece.shape


def global_view(piece: Tensor, like: Any) -> Tensor:
    """``piece`` (this rank's, any dtype) as a ``DTensor`` laid out like ``like``: a view, nothing is copied."""
    return DTensor.from_local(
        piece, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def local_piece_of(value: Any, like: Any, name: str) -> Tensor:
    """This rank's piece of a saved ``value`` of the ``DTensor`` ``like``: the local tensor of a ``DTensor`` laid out
    alike, or the slice of a full tensor (no communication). Raises ``ValueError`` naming ``name`` for a value that
    fits neither."""
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"The saved EMA of {name!r} has shape {tuple(value.shape)}, the model's is {tuple(like.shape)}"
        )
    if is_sharded(value):
        if value.placements != like.placements or value.device_mesh != like.device_mesh:
            raise ValueError(
                f"The saved EMA of {name!r} is sharded as {value.placements} on {value.device_mesh}, the model's"
                f" parameter as {like.placements} on {like.device_mesh}: save a full checkpoint to change the"
                " layout"
            )
        return value.to_local()
    full = value.detach().to(like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def full_value(tensor: Any) -> Tensor:
    """The whole tensor: a ``DTensor`` gathered from every rank (a collective: every rank must call it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``module``, itself included."""
    if FSDPModule is None:  # pragma: no cover
        return []
    return [submodule for submodule in module.modules() if isinstance(submodule, FSDPModule)]


def reshard(modules: Iterable[torch.nn.Module]) -> None:
    """Free the gathered parameters of FSDP2 modules left unsharded, so the next forward gathers the local pieces
    as they are now (after the EMA wrote them). A module already sharded is left as it is."""
    for module in modules:
        module.reshard()  # type: ignore[operator]
