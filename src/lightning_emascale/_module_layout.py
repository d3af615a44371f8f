"""The module an EMA averages, as its tensors are laid out: unwrapped from its wrappers, sharded or not.

Pure torch, no Lightning. :class:`ModuleLayout` is built once per EMA: it finds the module inside DDP, Fabric,
DeepSpeed and ``torch.compile`` wrappers, an FSDP1 root (whose checkpoints and reshards go through it), whether the
parameters are sharded (``DTensor``, FSDP1 or ZeRO-3: each rank averages its own shards), and reshards the
strategy's modules after the EMA wrote their shards (for ZeRO-3: drops the engine's gathered copies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lightning_emascale._sharded import (
    fsdp1_modules,
    fsdp1_uses_orig_params,
    fsdp1_wraps_whole,
    fsdp_modules,
    is_fsdp1,
    is_sharded,
    reshard,
    reshard_fsdp1,
)
from lightning_emascale._zero import is_deepspeed_engine, is_zero3

if TYPE_CHECKING:
    from lightning_emascale._options import EMAOptions


class ModuleLayout:
    """Where the tensors of ``module`` live, checked against ``options``.

    Attributes:
        module: the module itself (its names are the checkpoint's keys), inside any DDP, Fabric or compile wrapper
            and inside an FSDP1 root wrapper.
        fsdp1_root: FSDP1: the root wrapper, or the module whose submodules were wrapped by hand; else ``None``.
        is_sharded: whether each rank holds only shards of the parameters (``DTensor`` ones, FSDP1, ZeRO-3).
        deepspeed_engine: DeepSpeed: the engine the module was given in; ``None`` otherwise.
    """

    def __init__(self, module: Any, options: EMAOptions) -> None:
        wrappers = _wrappers(module)
        #: DeepSpeed: the engine (it drops the gathered copies of ZeRO-3 parameters); ``None`` otherwise.
        self.deepspeed_engine: Optional[torch.nn.Module] = next(
            (wrapper for wrapper in wrappers if is_deepspeed_engine(wrapper)), None
        )
        module = wrappers[-1]
        zero3 = any(is_zero3(p) for p in module.parameters())
        if zero3 and self.deepspeed_engine is None:
            raise ValueError(
                f"The parameters of `module` ({type(module).__name__}) are partitioned by DeepSpeed ZeRO-3, but"
                " the module was given without its engine: pass the `DeepSpeedEngine` that `deepspeed.initialize`"
                " returned (the EMA drops the engine's gathered copies before it writes a partition, or the next"
                " forward would use stale ones)"
            )
        self.fsdp1_root: Optional[torch.nn.Module] = module if fsdp1_modules(module) else None
        if self.fsdp1_root is not None:
            module = _check_fsdp1(self.fsdp1_root, options)
        sharded = (
            zero3
            or self.fsdp1_root is not None
            or any(is_sharded(t) for t in [*module.parameters(), *module.buffers()])
        )
        if sharded and (options.flat_parameters or options.sigma_rels):
            option = "flat_parameters=True" if options.flat_parameters else "a post-hoc EMA (`sigma_rels`)"
            raise ValueError(
                f"{option} is not supported for a sharded module (DTensor parameters of FSDP2 or tensor"
                " parallelism, FSDP1, DeepSpeed ZeRO-3): "
                + (
                    "the strategy gathers each parameter from its own storage, so the parameters cannot be moved"
                    " into one buffer. Leave it False: the per-shard update needs no gather."
                    if options.flat_parameters
                    else "its snapshots are written by rank 0 alone. Keep a Polyak EMA (no `sigma_rels`)."
                )
            )
        self.module: torch.nn.Module = module
        self.is_sharded = sharded
        self._fsdp_modules = fsdp_modules(module) if sharded else []
        self._fsdp1_modules = fsdp1_modules(self.fsdp1_root) if self.fsdp1_root is not None else []

    def reshard(self) -> None:
        """Put every FSDP module left gathered (by a no-grad forward) back on its shard, so that the EMA reads and
        writes the shards and the next forward gathers what it wrote. Nothing to do for an unsharded module."""
        if self.is_sharded:
            reshard(self._fsdp_modules)
            reshard_fsdp1(self._fsdp1_modules)
            if self.deepspeed_engine is not None:
                self.deepspeed_engine.empty_partition_cache()  # type: ignore[operator]

    def reshard_fsdp1(self) -> None:
        """FSDP1 only: read the shards, not a gathered copy (before an update, a reset, a read of the weights)."""
        reshard_fsdp1(self._fsdp1_modules)

    def agree(self, flag: Tensor) -> Tensor:
        """A 0-d bool flag that every rank of a sharded module shares: true only where it is true on every rank
        (each rank checks its own shards); ``flag`` itself otherwise."""
        if not (self.is_sharded and torch.distributed.is_initialized()):
            return flag
        shared = flag.to(_collective_device(flag.device), torch.int32)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MIN)
        return shared.to(flag.device).bool()  # back where the weights are (a CPU flag of offloaded shards)


def unwrap_module(module: Any) -> torch.nn.Module:
    """The module inside DDP, Fabric, DeepSpeed or ``torch.compile`` wrappers (names and checkpoints are the
    module's own)."""
    return _wrappers(module)[-1]


def _wrappers(module: Any) -> list[torch.nn.Module]:
    """``module`` and every wrapper inside it, outermost first; the last is the module itself."""
    chain = [module]
    while True:
        if type(module).__name__ == "_FabricModule" and is_fsdp1(getattr(module, "_forward_module", None)):
            module = module._forward_module  # FSDP1 under Fabric: its root wrapper (checkpoints, resharding)
        elif type(module).__name__ == "_FabricModule" and is_deepspeed_engine(getattr(module, "_forward_module", None)):
            module = module._forward_module  # DeepSpeed under Fabric: its engine (drops gathered ZeRO-3 copies)
        elif (
            isinstance(module, torch.nn.parallel.DistributedDataParallel)
            or type(module).__name__ == "_FabricModule"
            or is_deepspeed_engine(module)
        ):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), torch.nn.Module
        ):
            module = module._orig_mod
        else:
            break
        chain.append(module)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    return chain


def _check_fsdp1(root: torch.nn.Module, options: EMAOptions) -> torch.nn.Module:
    """The module inside an FSDP1 root wrapper (or ``root``, whose submodules are wrapped), after checking that its
    EMA can be kept shard by shard."""
    if not all(fsdp1_uses_orig_params(unit) for unit in fsdp1_modules(root)):
        raise ValueError(
            "FSDP1 with `use_orig_params=False` hides the parameters in flat parameters, so their EMA cannot be"
            " kept or named: pass `use_orig_params=True` (Lightning's FSDPStrategy default), or shard with FSDP2"
            " (`fully_shard`, ModelParallelStrategy)"
        )
    inner: torch.nn.Module = root.module if is_fsdp1(root) else root  # type: ignore[assignment]
    for online, teacher in (options.teachers or {}).items():
        unwrapped = [path for path in (online, teacher) if not fsdp1_wraps_whole(inner.get_submodule(path))]
        if unwrapped:
            raise ValueError(
                f"Under FSDP1, teacher {teacher!r} and its online module {online!r} must each be FSDP units of"
                f" their own, and {unwrapped} is not: FSDP1 slices a unit's parameters together, so a submodule"
                " that shares a unit with other parameters holds other slices on each rank. Wrap each (an"
                " `auto_wrap_policy` naming their classes, or `FullyShardedDataParallel(...)` around each)"
            )
    low = sorted({str(p.dtype) for p in inner.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low and options.ema_precision == "fp32":
        raise ValueError(
            f"An fp32 EMA of FSDP1 parameters held in {', '.join(low)} is not supported: FSDP1's checkpoints carry"
            " the EMA through the parameters' own dtype, which would round it. Keep fp32 parameters (precision"
            " '16-mixed'/'bf16-mixed'), pass `ema_precision='model'`, or shard with FSDP2 (`fully_shard`,"
            " ModelParallelStrategy), whose checkpoints keep the fp32 EMA"
        )
    return inner


def _collective_device(device: torch.device) -> torch.device:
    """Where a tensor goes for a collective of the default process group: ``device`` if its backend takes it, else
    the current GPU (NCCL alone takes no CPU tensor: a rank with only empty or CPU-offloaded shards has a CPU flag)."""
    backend = str(torch.distributed.get_backend())
    if device.type == "cpu" and "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
