"""Where the averages of tracked tensors live and how one update moves them. Pure torch, no Lightning.

The averagers (:mod:`lightning_emascale._polyak`, ``_power``) decide what is averaged and with which weight; a
store holds the averages and moves them. :class:`TensorStore` is the store of every layout but one:

- dense floating-point tensors: one :class:`~lightning_emascale._flat_group.FlatGroup` per (device, model dtype,
  EMA dtype, buffer or not), moved by a few large ops; other floating-point tensors one by one; integer tensors (and
  float buffers that hold ±inf, such as masks) copied, not averaged;
- a ``DTensor`` (FSDP2, tensor parallelism) through its rank-local piece: each rank keeps the averages of its own
  shards, followed when the strategy re-creates the piece, and seen from outside as ``DTensor`` views;
- an FSDP1 parameter is a plain view of its flat parameter's shard: nothing special here (the owner reshards);
- a DeepSpeed ZeRO-3 parameter through its rank's partition, in
  :class:`~lightning_emascale._zero_store.ZeroPartitionStore` (a ``TensorStore`` of the pieces, and what a swap writes);
- optionally on a CUDA side stream (:class:`~lightning_emascale._side_stream.SideStream`) or in CPU memory
  (:class:`~lightning_emascale._offload.Offload`).

:func:`reference_update` is the readable per-tensor twin of :meth:`TensorStore.update`; the tests check that they
agree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Optional, Protocol

import torch
from torch import Tensor

from lightning_emascale._cpu_split import Share, deal, run_split
from lightning_emascale._flat_group import EMAPrecision, FlatGroup, ema_dtype_for, is_dense, lerp_cast, same_dtype_kind
from lightning_emascale._offload import Offload
from lightning_emascale._sharded import global_view, is_sharded, local_piece, local_piece_of, storage_moved
from lightning_emascale._side_stream import SideStream


class Store(Protocol):
    """What an averager needs of the place its averages live (:class:`TensorStore`, and
    :class:`~lightning_emascale._zero_store.ZeroPartitionStore` for DeepSpeed ZeRO-3)."""

    names: list[str]
    tracked: list[Tensor]  # the local tensors read by an update (a sharded tensor's rank-local piece)
    averages: list[Tensor]  # one per tracked tensor
    sources: list[Optional[Tensor]]  # the sharded parameter of a tracked piece (``None`` for a whole tensor)
    partition_layout: Optional[dict]  # ZeRO-3: what a checkpoint of the ranks' pieces needs; ``None`` otherwise
    use_side_stream: bool

    @property
    def targets(self) -> list[Tensor]:
        """The tensors a swap writes, one per tracked tensor (the tracked tensor itself, except where the model
        computes with another copy than the one the update reads: a ZeRO-3 piece read from its fp32 master)."""

    def update(self, weight: float, only_if: Optional[Tensor] = None) -> None:
        """``average.lerp_(tracked, weight)`` for every floating-point tensor, copy the rest; ``only_if`` (a 0-d
        bool tensor) False keeps every average, decided on the device."""

    def join(self) -> None:
        """Order the training stream after the updates launched so far."""

    def flush(self) -> None:
        """Wait for the update under way; every reader of the averages calls it."""

    def refresh(self) -> None:
        """Read the tracked tensors' current storage from now on."""

    def follow(self) -> None:
        """Read a sharded tensor's local piece from where its owner keeps it now."""

    def views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors`` (one per tracked tensor) as seen from outside: a sharded one as a view laid out like its
        parameter."""

    def check_values(self, values: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` for a saved value whose shape or layout does not fit its tensor."""

    def local_values(self, values: Sequence[Tensor]) -> list[Tensor]:
        """Saved values (full tensors or views) as this rank's pieces, ready to copy into local tensors."""


class TensorStore:
    """The averages of ``tensors`` (each referenced, not copied; a tied tensor listed once) and their update.

    Args:
        named: the tracked tensors by (first) name; names appear in messages only.
        precision: ``"fp32"`` keeps the average of a float16/bfloat16 tensor in float32; ``"model"`` its dtype.
        is_buffer: per tensor, whether it is a buffer: buffers get groups of their own, updated on the training
            stream (a forward in training mode writes them), and a float buffer holding ±inf is copied.
        flat_parameters: move the tracked tensors into one buffer laid out as the averages (one op per update).
        offload: keep the averages in CPU memory, updated in a background thread.
    """

    def __init__(
        self,
        named: Sequence[tuple[str, Tensor]],
        precision: EMAPrecision = "fp32",
        is_buffer: Optional[Sequence[bool]] = None,
        flat_parameters: bool = False,
        offload: bool = False,
    ) -> None:
        self.names = [name for name, _ in named]
        #: The ``DTensor`` of each tracked tensor that is a rank's piece of one (``None`` for the others).
        self.sources: list[Optional[Tensor]] = [tensor if is_sharded(tensor) else None for _, tensor in named]
        #: The live tensors the update reads (a sharded tensor's rank-local piece).
        self.tracked: list[Tensor] = [local_piece(t) if is_sharded(t) else t for _, t in named]
        self.is_buffer = list(is_buffer) if is_buffer is not None else [False] * len(self.tracked)
        self._sharded = [index for index, source in enumerate(self.sources) if source is not None]
        self.partition_layout: Optional[dict] = None  # the pieces of a DTensor carry their layout themselves
        #: The averages, one per tracked tensor: views into one flat buffer per group for dense ones.
        self.averages: list[Tensor] = [torch.empty(0)] * len(self.tracked)
        self.groups: list[FlatGroup] = []
        self.loose: list[tuple[Tensor, Tensor]] = []  # (average, tensor) of non-dense floating-point tensors
        self._loose_is_buffer: list[bool] = []
        self.copies: tuple[list[Tensor], list[Tensor]] = ([], [])  # (copy, tensor) of integer tensors
        # Where the update reads each tracked tensor ("copies", "loose" or its group; a position), so that a sharded
        # tensor whose local piece moved is replaced there (:meth:`follow`).
        self._slots: dict[int, tuple[object, int]] = {}
        dense: dict[tuple[torch.device, torch.dtype, torch.dtype, bool], list[int]] = {}
        with torch.no_grad():
            for index, tensor in enumerate(self.tracked):
                # An integer buffer, or a float buffer holding +-inf (a mask: the lerp of inf and inf is NaN), is
                # copied, not averaged.
                constant = self.is_buffer[index] and tensor.is_floating_point() and not bool(tensor.isfinite().all())
                home = torch.device("cpu") if offload else tensor.device  # where the average lives
                if not tensor.is_floating_point() or constant:
                    self.averages[index] = tensor.detach().to(home, copy=True)
                    self._slots[index] = ("copies", len(self.copies[1]))
                    self.copies[0].append(self.averages[index])
                    self.copies[1].append(tensor)
                elif is_dense(tensor):
                    key = (tensor.device, tensor.dtype, ema_dtype_for(tensor.dtype, precision), self.is_buffer[index])
                    dense.setdefault(key, []).append(index)
                else:  # overlapping or gapped storage has no memory order to lay flat: its own tensor
                    self.averages[index] = tensor.detach().to(home, ema_dtype_for(tensor.dtype, precision), copy=True)
                    self._slots[index] = ("loose", len(self.loose))
                    self.loose.append((self.averages[index], tensor))
                    self._loose_is_buffer.append(self.is_buffer[index])
            for (_, _, ema_dtype, buffers), indices in dense.items():
                group = FlatGroup(
                    [self.tracked[i] for i in indices], ema_dtype, torch.device("cpu") if offload else None
                )
                group.buffers = buffers
                for position, view in zip(group.order, group.views):
                    self.averages[indices[position]] = view
                for slot, position in enumerate(group.order):
                    self._slots[indices[position]] = (group, slot)
                self.groups.append(group)
            if flat_parameters:  # every group checked before any tensor moves: a refusal leaves the module as it was
                for group in self.groups:
                    group.check_untied()
                for group in self.groups:
                    group.adopt_model()
        self._offload = Offload(self.groups, self.loose, list(zip(*self.copies))) if offload else None
        self._side = SideStream.for_tensors(self.tracked) if self.tracked else None
        #: Whether :meth:`update` runs on a CUDA side stream (tracked tensors on one CUDA device only). The owner
        #: that sets it must :meth:`join` before the tracked tensors are written again (the next optimizer step).
        self.use_side_stream = False
        self._pointers: list[int] = []  # the tracked tensors' storage at the last update
        self._on_cpu = False  # every tracked tensor is on the CPU (set when the storage is looked at)
        self._shares: list[Share] = []  # the CPU update's pieces, dealt to threads
        self._shares_threads = 0
        self._recorded = False  # every storage the update touches is recorded on the side stream

    @property
    def targets(self) -> list[Tensor]:
        """The tensors a swap writes: the tracked tensors themselves."""
        return self.tracked

    @property
    def side_stream(self) -> Optional[SideStream]:
        """The CUDA side stream of the updates (``None`` unless the tracked tensors share one CUDA device)."""
        return self._side

    def join(self) -> None:
        """Make the current CUDA stream wait for the updates launched on the side stream (no host sync)."""
        if self._side is not None:
            self._side.join()

    def flush(self) -> None:
        """Wait for the update under way: the side stream (queued on the device) and an offloaded update's host
        thread (``offload=True``). Every reader of the averages calls it."""
        self.join()
        if self._offload is not None:
            self._offload.flush()

    def _launch(self, only_if: Optional[Tensor], moved: bool) -> AbstractContextManager:
        if not self.use_side_stream or self._side is None:
            self._recorded = False
            return nullcontext()
        # Memory the side stream reads or writes must not be handed to the training stream while the update
        # still runs (a module moved or freed right after a step): each storage is recorded once on the stream.
        if moved or not self._recorded:
            if any(tensor.device != self._side.device for tensor in self.tracked):
                return nullcontext()  # moved to another device: in line
            self._recorded = True
            return self._side.launch([only_if, *self.tracked, *self.averages, *self._buffers()])
        return self._side.launch([only_if])

    def _buffers(self) -> list[Tensor]:
        gathered = [group.gathered for group in self.groups if group.gathered is not None]
        return [group.staging for group in self.groups] + gathered

    @torch.no_grad()
    def update(self, weight: float, only_if: Optional[Tensor] = None) -> None:
        """``average.lerp_(tensor, weight)`` for every floating-point tensor; copy the rest. No host sync.

        ``only_if``: a 0-d bool tensor (e.g. :func:`~lightning_emascale._averager.all_finite` of the tracked
        tensors); where it is False every average keeps its value, decided on the device (a slower, per-tensor path).
        """
        if self._sharded:
            self.follow()
        pointers = [tensor.data_ptr() for tensor in self.tracked]  # one look per update (~20 us for 320 tensors)
        moved = pointers != self._pointers
        if moved:  # on the training stream: a re-adopted flat buffer is allocated and filled here
            for group in self.groups:
                group.follow()
            self._pointers = pointers
            self._on_cpu = bool(self.tracked) and all(tensor.device.type == "cpu" for tensor in self.tracked)
            self._shares = []
        if self._offload is not None:
            self._offload.update(weight)  # on the training stream: the copy reads buffers the forward writes
            return
        if self._on_cpu and only_if is None:
            for group in self.groups:
                if group.single_op:
                    group.update(weight)
            run_split(self._cpu_shares(), weight)
            return
        side = self._launch(only_if, moved)
        self._update_part(weight, only_if, buffers=True)  # the next forward writes them: on the training stream
        with side:
            self._update_part(weight, only_if, buffers=False)

    def _cpu_shares(self) -> list[Share]:
        """The CPU update's pieces dealt to torch's threads (dealt again after the storage or the count changed)."""
        threads = torch.get_num_threads()
        if not self._shares or self._shares_threads != threads:
            pieces = [piece for group in self.groups if not group.single_op for piece in group.cpu_pieces()]
            pieces += [(tensor.numel(), functools.partial(lerp_cast, ema, tensor)) for ema, tensor in self.loose]
            if self.copies[0]:
                pieces.append((sum(t.numel() for t in self.copies[1]), self._copy_constants))
            self._shares, self._shares_threads = deal(pieces, threads), threads
        return self._shares

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shares": [], "_shares_threads": 0}  # dealt again where it is unpickled

    def _copy_constants(self, weight: float, share: int) -> None:
        torch._foreach_copy_(*self.copies)

    def follow(self) -> None:
        """Read a sharded tensor's local piece from where its ``DTensor`` keeps it now (FSDP2 re-creates the piece
        when a parameter is reset); the pointer look of the next update re-takes the group's views."""
        for index in self._sharded:
            source = self.sources[index]
            assert source is not None
            if not storage_moved(source, self.tracked[index]):
                continue
            piece = local_piece(source)
            if piece.shape != self.tracked[index].shape:
                raise RuntimeError(
                    f"The local shard of {self.names[index]!r} changed shape from {tuple(self.tracked[index].shape)}"
                    f" to {tuple(piece.shape)} (the module was sharded again): build the EMA after sharding"
                )
            self.tracked[index] = piece
            where, position = self._slots[index]
            if where == "copies":
                self.copies[1][position] = piece
            elif where == "loose":
                self.loose[position] = (self.loose[position][0], piece)
            else:
                assert isinstance(where, FlatGroup)
                where.models[position] = piece
            if self._offload is not None:  # its copy reads the model tensors in the same order
                self._offload.follow(
                    [
                        *(model for group in self.groups for model in group.models),
                        *(model for _, model in self.loose),
                        *self.copies[1],
                    ]
                )

    def _update_part(self, weight: float, only_if: Optional[Tensor], buffers: bool) -> None:
        """Update the buffers' averages (``buffers=True``, with the copied tensors) or the parameters'."""
        groups = [group for group in self.groups if group.buffers == buffers]
        loose = [pair for pair, is_buffer in zip(self.loose, self._loose_is_buffer) if is_buffer == buffers]
        if only_if is not None:
            for ema, model in [pair for group in groups for pair in zip(group.views, group.models)] + loose:
                ema.lerp_(torch.where(only_if, model.detach().to(ema.dtype), ema), weight)
            if buffers:
                for copy, model in zip(*self.copies):
                    copy.copy_(torch.where(only_if, model.detach(), copy))
            return
        for group in groups:
            group.update(weight)
        for ema, model in loose:
            ema.lerp_(model.to(ema.dtype), weight)
        if buffers and self.copies[0]:
            torch._foreach_copy_(*self.copies)

    def refresh(self) -> None:
        """Read the tracked tensors' current storage from now on (after ``module.to(...)`` replaced ``.data``)."""
        self._pointers = []  # the next update looks again
        self._shares = []
        for group in self.groups:
            group.follow()

    def views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors`` (one per tracked tensor) with a sharded one as a ``DTensor`` view laid out like its
        parameter."""
        return [tensor if s is None else global_view(tensor, s) for tensor, s in zip(tensors, self.sources)]

    def check_values(self, values: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` for a saved value that does not fit its tensor (a sharded tensor's: its global
        shape, and a ``DTensor``'s layout)."""
        for name, ema, source, value in zip(self.names, self.averages, self.sources, values):
            if not same_dtype_kind(value, ema):
                raise TypeError(
                    f"The saved EMA of {name!r} has dtype {value.dtype}, the model's is {ema.dtype}: a"
                    f" {'floating-point' if ema.is_floating_point() else 'non-floating-point'} dtype is allowed"
                )
            if source is not None:
                local_piece_of(value, source, name)  # raises for a shape or a layout that differs
            elif value.shape != ema.shape:
                raise ValueError(
                    f"The saved EMA of {name!r} has shape {tuple(value.shape)}, the model's is {tuple(ema.shape)}"
                )

    def local_values(self, values: Sequence[Tensor]) -> list[Tensor]:
        """Saved values as this rank's pieces (a full tensor or a ``DTensor`` sliced to this rank's shard)."""
        return [
            value if source is None else local_piece_of(value, source, name)
            for name, source, value in zip(self.names, self.sources, values)
        ]


@torch.no_grad()
def reference_update(ema: Sequence[Tensor], model: Sequence[Tensor], decay: float) -> None:
    """Readable per-tensor version of :meth:`TensorStore.update` (with ``weight = 1 - decay``), used to check it."""
    for ema_tensor, model_tensor in zip(ema, model):
        if ema_tensor.is_floating_point():
            ema_tensor.lerp_(model_tensor.to(ema_tensor.dtype), 1.0 - decay)
        else:
            ema_tensor.copy_(model_tensor)
