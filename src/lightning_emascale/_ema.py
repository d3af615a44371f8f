"""The EMA tensors and the multi-tensor updates that move them. Pure torch, no Lightning.

Two averagers, one small protocol (:class:`Averager`, ``update(decay)``):

- :class:`EMAState` holds one averaged copy of a module's parameters and buffers (the Polyak EMA) without
  copying the module, so it works for modules that cannot be deep-copied and it is never registered where DDP
  or a module ``state_dict`` would see it;
- :class:`TeacherState` moves a module's existing teacher submodules toward their online twins (BYOL, DINO);
- :class:`PowerEMAState` keeps power-function EMAs on the sample clock, for the post-hoc EMA (``advance``).

:func:`reference_update` is the readable per-tensor version of :meth:`EMAState.update`; the tests check that
they agree.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import glob
import os
import sys
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import FrameType
from typing import Literal, Optional, Protocol

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightning_emascale._sharded import (
    clean_name,
    global_view,
    is_sharded,
    local_piece,
    local_piece_of,
    storage_moved,
)
from lightning_emascale._side_stream import SideStream
from lightning_emascale.post_hoc_math import gamma_from_sigma_rel, power_beta

EMAPrecision = Literal["fp32", "model"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Tensors under this many elements are updated together: concatenated into a staging buffer by one op and
# lerped as one range of the flat EMA (ResNet-50: ~225 such tensors, 1.4% of the elements, cost ~0.08x the floor
# in dispatch when updated one by one).
_SMALL = 1 << 16
_GPU_BLOCK = 1 << 24  # elements of the staging block on a GPU (64 MiB in fp32): launches, not cache, matter there


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, contextlib and torch, for a warning issued by
    the function that calls this one (so that it points at the user's line)."""
    skipped = tuple(
        os.path.abspath(path)
        for path in (os.path.dirname(__file__), os.path.dirname(torch.__file__), contextlib.__file__)
    )
    frame: Optional[FrameType] = sys._getframe(2)  # the frame that called the warning's issuer
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def _last_level_cache_bytes() -> Optional[int]:
    """The CPU's largest cache, read from Linux's sysfs; ``None`` where it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as file:
                text = file.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


@functools.cache
def block_elements(device_type: str) -> int:
    """Elements per staging block of a mixed-dtype update on ``device_type``.

    On a CPU a quarter of the last-level cache in fp32 (the block is written, then read with the EMA range, while
    the model's chunk streams in), at least 256K elements; 1M where the cache size cannot be read. On a GPU 16M.
    """
    if device_type != "cpu":
        return _GPU_BLOCK
    cache = _last_level_cache_bytes()
    return max(1 << 18, cache // 16) if cache else 1 << 20


def ema_dtype_for(dtype: torch.dtype, precision: EMAPrecision) -> torch.dtype:
    """The dtype of the EMA of a floating-point tensor of ``dtype``."""
    if precision == "fp32" and dtype in _LOW_PRECISION:
        return torch.float32
    return dtype


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (contiguous or channels-last alike)."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def _is_dense(tensor: Tensor) -> bool:
    if tensor.is_contiguous():
        return True
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    return channels_last is not None and tensor.is_contiguous(memory_format=channels_last)


class _FlatGroup:
    """Dense tensors on one device with one model dtype and one EMA dtype, whose averages share one flat buffer.

    The averages are views into :attr:`flat` with the model tensors' strides (channels-last stays channels-last),
    the small tensors first. One update is:

    - same dtype: the small tensors concatenated into the staging buffer by one ``cat`` and lerped as one range,
      the others by one ``_foreach_lerp_``;
    - mixed dtypes (a bf16 model, an fp32 EMA): the model cast into the staging block by one ``cat`` per block
      and the block's range lerped by one op (:func:`block_elements` per block); on a GPU a block is gathered by
      one same-dtype ``cat`` and cast by one ``copy_``.

    The model tensors' storage is read through views taken in :meth:`refresh` (at build and whenever optimizers
    are attached): a tracked tensor whose ``.data`` is replaced later (``module.to(...)``) is followed from the
    next :meth:`refresh` on.
    """

    def __init__(self, models: list[Tensor], ema_dtype: torch.dtype, device: Optional[torch.device] = None) -> None:
        order = sorted(range(len(models)), key=lambda i: models[i].numel() >= _SMALL)  # stable: small ones first
        self.models = [models[i] for i in order]
        self.order = order  # position in this group -> position in the list given
        total = sum(model.numel() for model in self.models)
        device = device or self.models[0].device  # the averages' device (the CPU when offloaded)
        self.flat = torch.empty(total, dtype=ema_dtype, device=device)
        self.views: list[Tensor] = []
        offset = 0
        for model in self.models:
            self.views.append(self.flat.as_strided(model.shape, model.stride(), offset))
            offset += model.numel()
        self.small_end = sum(model.numel() for model in self.models if model.numel() < _SMALL)
        self.model_dtype = self.models[0].dtype
        self.mixed = self.model_dtype != ema_dtype
        capacity = min(total, block_elements(device.type)) if self.mixed else self.small_end
        self.staging = torch.empty(max(capacity, 1), dtype=ema_dtype, device=device)
        # On a GPU a casting `cat` or `_foreach_copy_` launches one kernel per tensor: a block is gathered by one
        # same-dtype `cat` into this model-dtype buffer and cast by one `copy_` instead.
        gather = self.mixed and device.type == "cuda"
        self.gathered = torch.empty(max(capacity, 1), dtype=self.model_dtype, device=device) if gather else None
        self.buffers = False  # whether the group holds buffers (set by the owner)
        self.model_flat: Optional[Tensor] = None  # flat-parameter mode: the model tensors' own buffer
        self._adopted: list[int] = []
        self.refresh()
        with torch.no_grad():
            for view, model in zip(self.views, self.models):
                view.copy_(model.detach())

    @torch.no_grad()
    def adopt_model(self, first: bool = True) -> None:
        """Flat-parameter mode: move the model tensors into one buffer laid out as the averages (same values and
        strides, ``.data`` re-pointed), so that one update is one lerp, or one cast per staging block."""
        storages = [model.untyped_storage().data_ptr() for model in self.models if model.numel()]
        if first and len(set(storages)) != len(storages):
            raise ValueError(
                "`flat_parameters=True` would untie tensors that share storage through separate Parameter objects"
                " (e.g. `decoder.weight.data = encoder.weight.data`): tie them as one Parameter, or leave it False"
            )
        device = self.models[0].device
        self.model_flat = torch.empty(self.flat.numel(), dtype=self.model_dtype, device=device)
        offset = 0
        for model in self.models:
            view = self.model_flat.as_strided(model.shape, model.stride(), offset)
            view.copy_(model.detach())
            model.data = view
            offset += model.numel()
        self._adopted = [model.data_ptr() for model in self.models]
        self.refresh()

    def _still_adopted(self) -> bool:
        """Whether every model tensor still lives where :meth:`adopt_model` put it (``.to(dtype)``,
        ``load_state_dict(assign=True)`` or a device move re-point it); a tensor moved back to the buffer's device
        with its dtype and strides (Lightning moves the module to the CPU after a fit and back) is adopted again."""
        if [model.data_ptr() for model in self.models] == self._adopted:
            return True
        assert self.model_flat is not None
        if all(
            model.device == self.model_flat.device
            and model.dtype == self.model_dtype
            and model.stride() == view.stride()
            for model, view in zip(self.models, self.views)
        ):
            self.adopt_model(first=False)  # some still live in the old buffer: no sharing check
            return True
        warnings.warn(
            "flat_parameters: the model's tensors no longer live in the EMA's flat buffer (the module was converted,"
            " moved or assigned new tensors), so the EMA goes back to the per-tensor update, which is correct but"
            " slower. Build the EMA after converting the module to keep the flat mode.",
            stacklevel=3,
        )
        self.model_flat, self._adopted = None, []
        self.refresh()
        return False

    def refresh(self) -> None:
        """Take the views of the model tensors' current storage that the update reads.

        Called at build and by :meth:`follow` whenever a tensor's storage moved (``.data`` replaced: a device
        move, ``.half()``, ``load_state_dict(assign=True)``). If a tensor no longer has the
        dtype or the strides its average was laid out for, the group updates tensor by tensor (correct, slower).
        """
        self._pointers = [model.data_ptr() for model in self.models]
        self.per_tensor = any(
            model.dtype != self.model_dtype or model.stride() != view.stride()
            for model, view in zip(self.models, self.views)
        )
        self.small_models = [_flat(model.detach()) for model in self.models if model.numel() < _SMALL]
        big = [(view, model) for view, model in zip(self.views, self.models) if model.numel() >= _SMALL]
        self.big_views, self.big_models = [view for view, _ in big], [model for _, model in big]
        # (start, end, model chunks, staging slices): a block of small tensors is cast by one `cat` (its cost is
        # dispatch); big ones by one `_foreach_copy_` into the slices (a casting `cat` is ~2.5x slower per element).
        self.blocks: list[tuple[int, int, list[Tensor], Optional[list[Tensor]]]] = []
        if not self.mixed:
            return
        capacity = self.staging.numel()
        for small in (True, False):
            start, offset, chunks = (0, 0, []) if small else (self.small_end, self.small_end, [])
            for model in (m for m in self.models if (m.numel() < _SMALL) == small):
                source = _flat(model.detach())
                while source.numel():
                    piece = source[: capacity - (offset - start)]
                    chunks.append(piece)
                    offset += piece.numel()
                    source = source[piece.numel() :]
                    if offset - start == capacity:
                        self.blocks.append(self._block(start, offset, chunks, small))
                        start, chunks = offset, []
            if chunks:
                self.blocks.append(self._block(start, offset, chunks, small))

    def _block(self, start: int, end: int, chunks: list[Tensor], small: bool) -> tuple:
        if small:
            return (start, end, chunks, None)
        slices, offset = [], 0
        for chunk in chunks:
            slices.append(self.staging[offset : offset + chunk.numel()])
            offset += chunk.numel()
        return (start, end, chunks, slices)

    def follow(self) -> None:
        """If a model tensor's storage moved since the views were taken: re-adopt it (flat-parameter mode, or leave
        that mode with a warning) and take the views again. The owner calls it before :meth:`update`."""
        if [model.data_ptr() for model in self.models] != self._pointers:
            if self.model_flat is not None:
                self._still_adopted()
            self.refresh()

    def update(self, weight: float) -> None:
        """One update of the averages, through the views :meth:`follow` took."""
        if self.per_tensor:
            for view, model in zip(self.views, self.models):
                view.lerp_(model.detach().to(view.dtype), weight)
            return
        if self.model_flat is not None:
            if not self.mixed:
                self.flat.lerp_(self.model_flat, weight)  # the floor: one op over the whole group
                return
            capacity = self.staging.numel()
            for start in range(0, self.flat.numel(), capacity):
                end = min(start + capacity, self.flat.numel())
                stage = self.staging[: end - start]
                stage.copy_(self.model_flat[start:end])
                self.flat[start:end].lerp_(stage, weight)
            return
        if self.mixed:
            for start, end, chunks, slices in self.blocks:
                if self.gathered is not None:
                    torch.cat(chunks, out=self.gathered[: end - start])
                    self.staging[: end - start].copy_(self.gathered[: end - start])
                elif slices is None:
                    torch.cat(chunks, out=self.staging[: end - start])  # the cast of many small tensors, in one op
                else:
                    torch._foreach_copy_(slices, chunks)
                self.flat[start:end].lerp_(self.staging[: end - start], weight)
            return
        if self.small_models:
            stage = self.staging[: self.small_end]
            torch.cat(self.small_models, out=stage)
            self.flat[: self.small_end].lerp_(stage, weight)
        if self.big_views:
            torch._foreach_lerp_(self.big_views, self.big_models, weight)


class Averager(Protocol):
    """What :class:`~lightning_emascale.ScaledEMA` needs of an EMA: move it by one update."""

    def update(self, decay: float, only_if: Optional[Tensor] = None) -> None:
        """``average <- decay * average + (1 - decay) * current`` for every tracked tensor, unless ``only_if``
        (a 0-d bool tensor) is False."""
        ...  # pragma: no cover

    def join(self) -> None:
        """Order the training stream after the updates launched so far (before the weights are written again)."""
        ...  # pragma: no cover


class EMAState:
    """An exponential moving average of named tensors, updated with multi-tensor kernels.

    Floating-point tensors are averaged, ``ζ ← decay·ζ + (1 − decay)·θ``; other tensors (integer buffers
    such as BatchNorm's ``num_batches_tracked``, and float buffers that hold ±inf when built, such as masks) are
    copied. The EMA of a float16/bfloat16 tensor is kept in
    float32 when ``precision="fp32"``, so small updates are not rounded away.

    Args:
        named_tensors: the tensors to track, by name. They are referenced, not copied, and must keep their
            identity and shape (module parameters and buffers do). A tensor listed under several names (tied
            weights) is tracked once; :attr:`index_of_name` maps every name to it.
        precision: ``"fp32"`` or ``"model"`` (keep the model's dtype).
        copy_on_swap: :meth:`swap_in` copies the averages into the tracked tensors (keeping a copy of the training
            values) instead of pointing the parameters at the averages' own storage.

    On one CUDA device the update can run on a side stream (:attr:`use_side_stream`, set by the owner, who then
    calls :meth:`join` before anything writes the tracked tensors again); every reader of the averages joins.

    A sharded tensor (a ``DTensor`` of FSDP2 or tensor parallelism) is averaged through its rank-local piece: the
    averages hold this rank's shard only, a swap copies (the strategy gathers from the parameter's own storage),
    and the by-name views (:meth:`state_dict`, :meth:`averages_by_name`) are ``DTensor`` views laid out like the
    parameter. The owner reshards the strategy's modules after anything here writes the pieces.
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, Tensor]],
        precision: EMAPrecision = "fp32",
        buffer_names: Collection[str] = frozenset(),
        flat_parameters: bool = False,
        offload: bool = False,
        copy_on_swap: bool = False,
    ) -> None:
        #: The first name of every tracked tensor (the keys of :meth:`state_dict`).
        self.names: list[str] = []
        #: The live tensors being averaged (a module's parameters and buffers).
        self.tracked: list[Tensor] = []
        #: Every name, aliases included, -> the index of its tensor in :attr:`tracked` and :attr:`averages`.
        self.index_of_name: dict[str, int] = {}
        #: The ``DTensor`` of each tracked tensor that is a rank's piece of one (``None`` for the others).
        self.sources: list[Optional[Tensor]] = []
        index_of_tensor: dict[int, int] = {}
        for name, tensor in named_tensors:
            if id(tensor) not in index_of_tensor:
                index_of_tensor[id(tensor)] = len(self.tracked)
                self.names.append(name)
                self.tracked.append(local_piece(tensor) if is_sharded(tensor) else tensor)
                self.sources.append(tensor if is_sharded(tensor) else None)
            self.index_of_name[name] = index_of_tensor[id(tensor)]
        self._sharded = [index for index, source in enumerate(self.sources) if source is not None]
        #: Names of the module's tensors deliberately left out (``include``/``exclude``, non-persistent buffers).
        self.untracked_names: frozenset[str] = frozenset()
        #: Those tensors (a swap copies a tracked tensor that shares memory with one of them, so they stay tied).
        self.untracked_tensors: list[Tensor] = []
        self._seen_versions: list[int] = []
        self._stale_at_swap = False
        #: Whether each tracked tensor is a buffer (``skip_non_finite`` allows an infinite buffer, not a NaN one).
        self.is_buffer = [name in buffer_names for name in self.names]
        #: The averages, one per tracked tensor (float32 for a low-precision tensor with ``precision="fp32"``):
        #: views into one flat buffer per (device, dtypes) for dense floating-point tensors.
        self.averages: list[Tensor] = [torch.empty(0)] * len(self.tracked)
        self._groups: list[_FlatGroup] = []
        self._loose: list[tuple[Tensor, Tensor]] = []  # (average, tensor) of non-dense floating-point tensors
        self._loose_is_buffer: list[bool] = []
        self._copies: tuple[list[Tensor], list[Tensor]] = ([], [])  # (copy, tensor) of integer tensors
        self._raw_backup: list[Tensor] | None = None
        self.copy_on_swap = copy_on_swap
        self._pointed: list[int] = []  # tensors whose .data points at their average while swapped
        self._pointed_versions: list[int] = []
        # Where the update reads each tracked tensor ("copies", "loose" or its group; a position), so that a sharded
        # tensor whose local piece moved is replaced there (:meth:`_follow_shards`).
        self._slots: dict[int, tuple[object, int]] = {}
        # Buffers get their own groups: a forward in training mode writes them, so on a GPU they are updated on the
        # training stream while the parameters' update runs beside the next forward.
        dense: dict[tuple[torch.device, torch.dtype, torch.dtype, bool], list[int]] = {}
        with torch.no_grad():
            for index, tensor in enumerate(self.tracked):
                # An integer buffer, or a float buffer holding +-inf (a mask: the lerp of inf and inf is NaN), is
                # copied, not averaged.
                constant = self.is_buffer[index] and tensor.is_floating_point() and not bool(tensor.isfinite().all())
                home = torch.device("cpu") if offload else tensor.device  # where the average lives
                if not tensor.is_floating_point() or constant:
                    self.averages[index] = tensor.detach().to(home, copy=True)
                    self._slots[index] = ("copies", len(self._copies[1]))
                    self._copies[0].append(self.averages[index])
                    self._copies[1].append(tensor)
                elif _is_dense(tensor):
                    key = (tensor.device, tensor.dtype, ema_dtype_for(tensor.dtype, precision), self.is_buffer[index])
                    dense.setdefault(key, []).append(index)
                else:  # overlapping or gapped storage has no memory order to lay flat: its own tensor
                    self.averages[index] = tensor.detach().to(home, ema_dtype_for(tensor.dtype, precision), copy=True)
                    self._slots[index] = ("loose", len(self._loose))
                    self._loose.append((self.averages[index], tensor))
                    self._loose_is_buffer.append(self.is_buffer[index])
            for (_, _, ema_dtype, buffers), indices in dense.items():
                group = _FlatGroup(
                    [self.tracked[i] for i in indices], ema_dtype, torch.device("cpu") if offload else None
                )
                group.buffers = buffers
                for position, view in zip(group.order, group.views):
                    self.averages[indices[position]] = view
                for slot, position in enumerate(group.order):
                    self._slots[indices[position]] = (group, slot)
                if flat_parameters:
                    group.adopt_model()
                self._groups.append(group)
        self._offload = _Offload(self) if offload else None
        self._side = SideStream.for_tensors(self.tracked) if self.tracked else None
        #: Whether :meth:`update` runs on a CUDA side stream (tracked tensors on one CUDA device only). The owner
        #: that sets it must :meth:`join` before the tracked tensors are written again (the next optimizer step).
        self.use_side_stream = False
        self._pointers: list[int] = []  # the tracked tensors' storage at the last update
        self._recorded = False  # every storage the update touches is recorded on the side stream

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
        gathered = [group.gathered for group in self._groups if group.gathered is not None]
        return [group.staging for group in self._groups] + gathered

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        precision: EMAPrecision = "fp32",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        flat_parameters: bool = False,
        offload: bool = False,
        copy_on_swap: bool = False,
    ) -> EMAState:
        """Track the parameters and buffers of ``module`` that :func:`select_tensors` selects, tied ones once."""
        selected, untracked = select_tensors(module, include, exclude)
        buffers = {clean_name(name) for name, _ in module.named_buffers(remove_duplicate=False)}
        state = cls(selected, precision, buffers, flat_parameters, offload, copy_on_swap)
        state.untracked_names = untracked
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        state.untracked_tensors = [tensor for name, tensor in named if clean_name(name) in untracked]
        return state

    @torch.no_grad()
    def update(self, decay: float, only_if: Optional[Tensor] = None) -> None:
        """``ζ ← decay·ζ + (1 − decay)·θ`` for every floating-point tensor; copy the rest. No host sync.

        ``only_if``: a 0-d bool tensor (e.g. :func:`all_finite` of the tracked tensors); where it is False every
        average keeps its value, decided on the device without a host sync (a slower, per-tensor path).
        """
        weight = 1.0 - decay
        if self._sharded:
            self._follow_shards()
        pointers = [tensor.data_ptr() for tensor in self.tracked]  # one look per update (~20 us for 320 tensors)
        moved = pointers != self._pointers
        if moved:  # on the training stream: a re-adopted flat buffer is allocated and filled here
            for group in self._groups:
                group.follow()
            self._pointers = pointers
        if self._offload is not None:
            self._offload.update(weight)  # on the training stream: the copy reads buffers the forward writes
            return
        side = self._launch(only_if, moved)
        self._update_part(weight, only_if, buffers=True)  # the next forward writes them: on the training stream
        with side:
            self._update_part(weight, only_if, buffers=False)

    def _follow_shards(self) -> None:
        """Read a sharded tensor's local piece from where its ``DTensor`` keeps it now (FSDP2 re-creates the piece
        when a parameter is reset); the pointer look that follows re-takes the group's views."""
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
                self._copies[1][position] = piece
            elif where == "loose":
                self._loose[position] = (self._loose[position][0], piece)
            else:
                assert isinstance(where, _FlatGroup)
                where.models[position] = piece
            if self._offload is not None:  # its copy reads the model tensors in the same order
                self._offload.models = [
                    *(model for group in self._groups for model in group.models),
                    *(model for _, model in self._loose),
                    *self._copies[1],
                ]

    def _update_part(self, weight: float, only_if: Optional[Tensor], buffers: bool) -> None:
        """Update the buffers' averages (``buffers=True``, with the copied tensors) or the parameters'."""
        groups = [group for group in self._groups if group.buffers == buffers]
        loose = [pair for pair, is_buffer in zip(self._loose, self._loose_is_buffer) if is_buffer == buffers]
        if only_if is not None:
            for ema, model in [pair for group in groups for pair in zip(group.views, group.models)] + loose:
                ema.lerp_(torch.where(only_if, model.detach().to(ema.dtype), ema), weight)
            if buffers:
                for copy, model in zip(*self._copies):
                    copy.copy_(torch.where(only_if, model.detach(), copy))
            return
        for group in groups:
            group.update(weight)
        for ema, model in loose:
            ema.lerp_(model.to(ema.dtype), weight)
        if buffers and self._copies[0]:
            torch._foreach_copy_(*self._copies)

    def refresh(self) -> None:
        """Read the tracked tensors' current storage from now on (after ``module.to(...)`` replaced ``.data``)."""
        self._pointers = []  # the next update looks again
        for group in self._groups:
            group.follow()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the tracked tensors' current values."""
        if self.is_swapped:
            raise RuntimeError("reset() while the EMA is swapped into the model: call swap_out() first")
        self.flush()
        if self._sharded:
            self._follow_shards()
        for average, raw in zip(self.averages, self.raw_tensors()):
            average.copy_(raw)
        self.mark_seen()

    @property
    def is_swapped(self) -> bool:
        """Whether the tracked tensors hold the EMA values (between :meth:`swap_in` and :meth:`swap_out`)."""
        return self._raw_backup is not None

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the EMA values into the tracked tensors, keeping the training values for :meth:`swap_out`.

        Parameters are pointed at their averages (``.data``), so nothing is copied where the dtypes match and a
        bf16 parameter gets only the cast of its fp32 average; buffers, which a forward in training mode writes,
        are copied. The version counters of the pointed parameters are bumped on the way in and out, so a graph
        built on one side of a swap and back-propagated on the other raises instead of using the wrong values;
        :meth:`swap_out` warns when a pointed parameter was written in place meanwhile (the write reached the
        EMA). ``copy_on_swap`` copies everything instead (in-place writes during evaluation then never reach it).
        """
        if self._raw_backup is not None:
            raise RuntimeError("The EMA weights are already swapped into the model")
        self.flush()
        if self._sharded:
            self._follow_shards()
        stale = bool(self.changed_since_seen())  # a swap must not hide weights loaded by hand
        # Tensors that share memory with another tensor of the module (separate Parameters tied by `.data`) are
        # copied, so that they stay tied; so are buffers (a forward in training mode writes them).
        starts = Counter(tensor.data_ptr() for tensor in [*self.tracked, *self.untracked_tensors] if tensor.numel())
        pointed = [  # a sharded tensor is copied: the strategy gathers from its own storage, not from `.data`
            index
            for index, tensor in enumerate(self.tracked)
            if not self.copy_on_swap
            and self.sources[index] is None
            and not self.is_buffer[index]
            and tensor.is_floating_point()
            and (not tensor.numel() or starts[tensor.data_ptr()] == 1)
        ]
        # Everything is allocated before anything changes: an error (out of memory) leaves the module as it was.
        backup: list[Tensor] = []
        point_to: dict[int, Tensor] = {}
        with torch.inference_mode(False):  # a swap inside inference mode must not make inference tensors
            for index, (tensor, average) in enumerate(zip(self.tracked, self.averages)):
                if index in pointed:
                    backup.append(tensor.data)  # the training storage itself: no copy
                    same = average.dtype == tensor.dtype and average.device == tensor.device
                    point_to[index] = average if same else average.to(tensor.device, tensor.dtype)
                else:
                    backup.append(tensor.detach().clone())
        for index, (tensor, average) in enumerate(zip(self.tracked, self.averages)):
            if index in point_to:
                tensor.data = point_to[index]
            else:
                tensor.copy_(average)
        self._raw_backup, self._pointed, self._stale_at_swap = backup, pointed, stale
        self._bump([self.tracked[index] for index in pointed])
        self._pointed_versions = [self.tracked[index]._version for index in pointed]

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the training values exactly (the same storage, or bit-identical copies); nothing to do if not
        swapped."""
        if self._raw_backup is None:
            return
        written = [
            self.names[index]
            for index, version in zip(self._pointed, self._pointed_versions)
            if self.tracked[index]._version != version and self._shares_average(index)
        ]
        pointed = set(self._pointed)
        for index, (tensor, raw) in enumerate(zip(self.tracked, self._raw_backup)):
            if index in pointed:
                tensor.data = raw
            else:
                tensor.copy_(raw)
        self._bump([self.tracked[index] for index in self._pointed])
        self._raw_backup, self._pointed, self._pointed_versions = None, [], []
        if not self._stale_at_swap:
            self.mark_seen()  # swapping wrote the tensors; their values are the ones seen
        if written:
            shown = ", ".join(repr(name) for name in written[:5]) + (", ..." if len(written) > 5 else "")
            warnings.warn(
                f"{shown} ({len(written)} tensors) were written in place while the EMA was swapped in (an optimizer"
                " step, test-time adaptation, `load_state_dict`): they pointed at the EMA's own storage, so the EMA"
                " now holds those writes. Evaluate on a copy with `copy_on_swap=True` if the EMA must not change.",
                stacklevel=_caller_level(),
            )

    def _shares_average(self, index: int) -> bool:
        average, tensor = self.averages[index], self.tracked[index]
        return average.dtype == tensor.dtype and average.device == tensor.device

    @staticmethod
    def _bump(tensors: list[Tensor]) -> None:
        for tensor in tensors:  # one at a time: torch < 2.5 takes a single tensor
            increment_version(tensor)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Hold the EMA values in the tracked tensors inside the block; restore the raw values exactly after."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def raw_tensors(self) -> list[Tensor]:
        """The training (raw) values of the tracked tensors, also while the EMA is swapped in."""
        return self._raw_backup if self._raw_backup is not None else [t.detach() for t in self.tracked]

    def _by_name(self, tensors: Sequence[Tensor], names: Iterator[tuple[str, int]]) -> dict[str, Tensor]:
        """``tensors`` (one per tracked tensor) by name; a sharded one as a ``DTensor`` view laid out like its
        parameter."""
        views = [tensor if s is None else global_view(tensor, s) for tensor, s in zip(tensors, self.sources)]
        return {name: views[index] for name, index in names}

    def averages_by_name(self) -> dict[str, Tensor]:
        """The EMA of every tracked tensor under every one of its names (live tensors, EMA dtype; a sharded one
        as a ``DTensor`` view of this rank's shard, like the module's own ``state_dict()``)."""
        self.flush()
        return self._by_name(self.averages, iter(self.index_of_name.items()))

    def raw_by_name(self) -> dict[str, Tensor]:
        """The training values under every name, also while the EMA is swapped in."""
        return self._by_name(self.raw_tensors(), iter(self.index_of_name.items()))

    def state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by their first names (the live tensors, not copies; sharded ones as ``DTensor`` views)."""
        self.flush()
        return self._by_name(self.averages, ((name, index) for index, name in enumerate(self.names)))

    def check_state_dict(self, state: dict[str, Tensor]) -> None:
        """Raise ``KeyError`` naming missing and unexpected names, ``ValueError`` for a shape that differs (a
        sharded tensor's saved value: its global shape, and a ``DTensor``'s layout)."""
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names) - self.untracked_names)  # 0.1 averaged every buffer
        if missing or unexpected:
            raise KeyError(
                f"The saved EMA does not match the model: missing {missing}, unexpected {unexpected}."
                " Was the checkpoint written for another model?"
            )
        for name, ema, source in zip(self.names, self.averages, self.sources):
            if source is not None:
                local_piece_of(state[name], source, name)  # raises for a shape or a layout that differs
            elif state[name].shape != ema.shape:
                raise ValueError(
                    f"The saved EMA of {name!r} has shape {tuple(state[name].shape)}, the model's is {tuple(ema.shape)}"
                )

    def mark_seen(self) -> None:
        """Remember the tracked tensors' version counters: :meth:`changed_since_seen` compares against them."""
        self._seen_versions = [tensor._version for tensor in self.tracked]

    def changed_since_seen(self) -> list[str]:
        """The names of tracked tensors written in place since :meth:`mark_seen` (e.g. weights loaded by hand)."""
        if not self._seen_versions:
            return []
        return [
            name for name, tensor, seen in zip(self.names, self.tracked, self._seen_versions) if tensor._version != seen
        ]

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy saved EMA values in, after :meth:`check_state_dict` (every check before the first copy)."""
        self.flush()
        self.check_state_dict(state)
        for name, ema, source in zip(self.names, self.averages, self.sources):
            ema.copy_(state[name] if source is None else local_piece_of(state[name], source, name))


class _Offload:
    """Keeps the averages in CPU memory while the model trains on a GPU (``offload=True``).

    Each update copies the tracked tensors into pinned host staging laid out as the averages (one foreach copy,
    ``non_blocking``), records a CUDA event, and lerps on the CPU in a background thread once the copy has
    landed, so training goes on meanwhile. The next update, and every reader of the averages, waits for that
    thread first (:meth:`flush`). Host memory: the averages plus one model-dtype copy of the model.
    """

    def __init__(self, state: EMAState) -> None:
        pin = torch.cuda.is_available()
        self.hosts: list[Tensor] = []  # host staging, one per model tensor, in the order of `models`
        self.models: list[Tensor] = []
        self.groups: list[tuple[_FlatGroup, Tensor]] = []
        for group in state._groups:
            host = torch.empty(group.flat.numel(), dtype=group.models[0].dtype, pin_memory=pin)
            offset = 0
            for model in group.models:
                self.hosts.append(host.as_strided(model.shape, model.stride(), offset))
                self.models.append(model)
                offset += model.numel()
            self.groups.append((group, host))
        self.loose: list[tuple[Tensor, Tensor]] = []
        self.copies: list[tuple[Tensor, Tensor]] = []
        for pairs, into in ((state._loose, self.loose), (list(zip(*state._copies)), self.copies)):
            for average, model in pairs:
                host = torch.empty(model.shape, dtype=model.dtype, pin_memory=pin)
                self.hosts.append(host)
                self.models.append(model)
                into.append((average, host))
        self.pending: Optional[concurrent.futures.Future] = None
        self.executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def update(self, weight: float) -> None:
        self.flush()  # the staging is read by the last update's thread until it is done
        torch._foreach_copy_(self.hosts, [model.detach() for model in self.models], non_blocking=True)
        event = None
        cuda = next((model.device for model in self.models if model.is_cuda), None)
        if cuda is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cuda))  # the stream of the model's device, not the current one
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema-offload")
        self.pending = self.executor.submit(self._lerp, weight, event)

    @torch.no_grad()
    def _lerp(self, weight: float, event: Optional[torch.cuda.Event]) -> None:
        if event is not None:
            event.synchronize()  # in this thread: the training loop does not wait
        for group, host in self.groups:
            if not group.mixed:
                group.flat.lerp_(host, weight)
                continue
            capacity = group.staging.numel()
            for start in range(0, host.numel(), capacity):
                end = min(start + capacity, host.numel())
                stage = group.staging[: end - start]
                stage.copy_(host[start:end])
                group.flat[start:end].lerp_(stage, weight)
        for average, host in self.loose:
            average.lerp_(host.to(average.dtype), weight)
        for average, host in self.copies:
            average.copy_(host)

    def __getstate__(self) -> dict:
        self.flush()  # a copy or a pickle carries the averages, not the thread
        return {**self.__dict__, "executor": None, "pending": None}

    def flush(self) -> None:
        """Wait for the update under way (and raise what it raised)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def select_tensors(
    module: torch.nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> tuple[list[tuple[str, Tensor]], frozenset[str]]:
    """The named parameters and buffers of ``module`` to average, and the names left out.

    A name is selected by an entry of ``include`` (or by default when ``include`` is ``None``) and left out by
    one of ``exclude``; an entry matches a tensor's name or any tensor under a submodule path (``"disc"``
    matches ``"disc.0.weight"``). Non-persistent buffers (not in the module's ``state_dict``, e.g. an annealed
    temperature) are left out unless ``include`` names them exactly. A tied tensor left out under one name is left out.
    Raises ``ValueError`` for an entry that matches nothing and when nothing is left to average.
    """
    named = [
        (clean_name(name), tensor)  # FSDP1's wrappers' names are not in the module's checkpoint keys
        for name, tensor in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    ]
    non_persistent = {
        clean_name(f"{prefix}.{name}" if prefix else name)
        for prefix, submodule in module.named_modules(remove_duplicate=False)
        for name in submodule._non_persistent_buffers_set
    }

    def matches(name: str, entries: Sequence[str]) -> bool:
        return any(name == entry or name.startswith(entry + ".") for entry in entries)

    for option, entries in (("include", include), ("exclude", exclude)):
        for entry in entries or ():
            if not any(matches(name, [entry]) for name, _ in named):
                children = [name for name, _ in module.named_children()]
                raise ValueError(
                    f"`{option}` names {entry!r}, which is no parameter, buffer or submodule of"
                    f" {type(module).__name__}; its children are {children}"
                )
    left_out = {
        id(tensor)
        for name, tensor in named
        if matches(name, exclude or ())
        or (include is not None and not matches(name, include))
        or (name in non_persistent and name not in (include or ()))  # only by its exact name
    }
    selected = [(name, tensor) for name, tensor in named if id(tensor) not in left_out]
    if named and not selected:
        raise ValueError(
            f"`include`={include!r} and `exclude`={exclude!r} leave nothing of {type(module).__name__} to average"
        )
    return selected, frozenset(name for name, tensor in named if id(tensor) in left_out)


def all_finite(tensors: Sequence[Tensor], nan_only: Optional[Sequence[bool]] = None) -> Tensor:
    """A 0-d bool tensor: whether every floating-point tensor of ``tensors`` is finite (only free of NaN where
    ``nan_only`` says so: a buffer may hold -inf on purpose, e.g. an attention mask). No host sync."""
    flags_of = nan_only if nan_only is not None else [False] * len(tensors)
    groups: dict[tuple[torch.device, bool], list[Tensor]] = {}
    for tensor, only_nan in zip(tensors, flags_of):
        if tensor.is_floating_point() and tensor.numel() > 0:
            groups.setdefault((tensor.device, only_nan), []).append(tensor.detach())
    if not groups:
        return torch.tensor(True)
    device = next(iter(groups))[0]
    flags = []
    for (_, only_nan), group in groups.items():
        norms = torch.stack(torch._foreach_norm(group, float("inf"))).float()  # inf for an inf, nan for a nan
        flags.append((~torch.isnan(norms) if only_nan else torch.isfinite(norms)).all().to(device))
    return torch.stack(flags).all()


@torch.no_grad()
def reference_update(ema: Sequence[Tensor], model: Sequence[Tensor], decay: float) -> None:
    """Readable per-tensor version of :meth:`EMAState.update`, used to check the fast path."""
    for ema_tensor, model_tensor in zip(ema, model):
        if ema_tensor.is_floating_point():
            ema_tensor.lerp_(model_tensor.to(ema_tensor.dtype), 1.0 - decay)
        else:
            ema_tensor.copy_(model_tensor)


class TeacherState:
    """Moves existing teacher tensors toward their online twins: ``teacher <- decay * teacher + (1 - decay) * online``.

    The teacher mode of BYOL, DINO and MoCo: the EMA is a submodule the loss already uses, so nothing is copied.
    Pairs are grouped by (device, dtype) for one ``_foreach_lerp_`` per group; a pair whose dtypes differ (an fp32
    teacher of a bf16 student) is lerped one tensor at a time.
    """

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self._module: Optional[torch.nn.Module] = None  # set by from_module: then the paths are followed
        self._teachers: dict[str, str] = {}
        self._submodules: list[torch.nn.Module] = []  # the submodules at the paths when they were paired
        self._set_pairs(pairs)

    def _set_pairs(self, sources: Sequence[tuple[Tensor, Tensor]]) -> None:
        #: The (teacher, online) parameters as paired; a sharded pair is moved through its rank-local pieces.
        self.sources = list(sources)
        self._sharded = [index for index, (teacher, _) in enumerate(self.sources) if is_sharded(teacher)]
        self._group([(local_piece(t), local_piece(o)) if is_sharded(t) else (t, o) for t, o in self.sources])

    def _group(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        #: (teacher, online) tensor pairs.
        self.pairs = list(pairs)
        self.groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        self.mixed: list[tuple[Tensor, Tensor]] = []
        for teacher, online in self.pairs:
            if teacher.dtype != online.dtype or teacher.device != online.device:
                self.mixed.append((teacher, online))
                continue
            teachers, onlines = self.groups.setdefault((teacher.device, teacher.dtype), ([], []))
            teachers.append(teacher)
            onlines.append(online)

    @classmethod
    def from_module(cls, module: torch.nn.Module, teachers: Mapping[str, str]) -> TeacherState:
        """Pair the parameters of every teacher submodule of ``module`` with its online twin's.

        ``teachers`` maps online submodule paths to teacher paths. Raises ``ValueError`` when a path is not a
        submodule, a teacher does not mirror its twin (names or shapes) or still requires grad.

        The paths are followed: a submodule replaced at its path (lightly's SMoG swaps in deep copies every few
        hundred steps) is paired again, with the same checks, before the next update.
        """
        state = cls(_pair(module, teachers))
        state._module, state._teachers = module, dict(teachers)
        state._submodules = _at_paths(module, state._teachers)
        return state

    def follow_paths(self) -> None:
        """Pair again if a submodule at one of the paths was replaced since the last pairing, or a sharded
        parameter's local piece moved."""
        if self._module is None:
            return
        current = _at_paths(self._module, self._teachers)
        if any(now is not then for now, then in zip(current, self._submodules)):
            self._set_pairs(_pair(self._module, self._teachers))
            self._submodules = current
            return
        moved = any(  # FSDP2 re-creates a local piece when a parameter is reset (a dtype or device move)
            storage_moved(source, piece)
            for index in self._sharded
            for source, piece in zip(self.sources[index], self.pairs[index])
        )
        if moved:
            self._set_pairs(self.sources)

    def online_tensors(self) -> list[Tensor]:
        """The online tensors the teachers follow (what :func:`all_finite` checks before an update)."""
        self.follow_paths()
        return [online for _, online in self.pairs]

    @torch.no_grad()
    def update(self, decay: float, only_if: Optional[Tensor] = None) -> None:
        """Move every teacher; with ``only_if`` (a 0-d bool tensor) False, leave them as they are (no host sync)."""
        self.follow_paths()
        weight = 1.0 - decay
        if only_if is not None:
            for teacher, online in self.pairs:
                teacher.lerp_(torch.where(only_if, online.to(teacher.dtype), teacher), weight)
            return
        for teachers, onlines in self.groups.values():
            torch._foreach_lerp_(teachers, onlines, weight)
        for teacher, online in self.mixed:
            teacher.lerp_(online.to(teacher.dtype), weight)

    def join(self) -> None:
        """Nothing to wait for: teachers are updated on the training stream, as the next forward reads them."""


def freeze_teachers(module: torch.nn.Module, teachers: Mapping[str, str]) -> None:
    """``requires_grad_(False)`` on every teacher submodule (lightly's I-JEPA leaves its target trainable).

    Every other check of the pairing runs first, so a bad mapping raises with nothing frozen.
    """
    _pair(module, teachers, trainable_ok=True)
    for teacher_path in teachers.values():
        _submodule(module, teacher_path).requires_grad_(False)


def _at_paths(module: torch.nn.Module, teachers: Mapping[str, str]) -> list[torch.nn.Module]:
    return [_submodule(module, path) for pair in teachers.items() for path in pair]


def _pair(
    module: torch.nn.Module, teachers: Mapping[str, str], trainable_ok: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """The (teacher, online) parameter pairs of ``teachers`` (online path -> teacher path), checked."""
    pairs: list[tuple[Tensor, Tensor]] = []
    follows: dict[str, str] = {}  # teacher path -> the online path it follows
    for online_path, teacher_path in teachers.items():
        if online_path == teacher_path:
            raise ValueError(
                f"`teachers` maps {online_path!r} to itself: the teacher must be a separate, frozen copy"
                f" (e.g. `copy.deepcopy(self.{online_path}).requires_grad_(False)`)"
            )
        if teacher_path in follows:
            raise ValueError(
                f"`teachers` maps both {follows[teacher_path]!r} and {online_path!r} to {teacher_path!r}: each"
                " teacher follows one online module"
            )
        follows[teacher_path] = online_path
        online = dict(_submodule(module, online_path).named_parameters())
        teacher = dict(_submodule(module, teacher_path).named_parameters())
        mirror = f"Teacher {teacher_path!r} does not mirror {online_path!r}"
        if online.keys() != teacher.keys():
            only = sorted(online.keys() ^ teacher.keys())
            raise ValueError(f"{mirror}: parameters {only[:5]} are in only one of them")
        trainable = [f"{teacher_path}.{name}" for name, tensor in teacher.items() if tensor.requires_grad]
        if trainable and not trainable_ok:
            raise ValueError(
                f"Teacher {teacher_path!r} still requires grad ({', '.join(trainable[:3])}, ...): freeze it with"
                f" `self.{teacher_path}.requires_grad_(False)` (lightly: `deactivate_requires_grad`) or pass"
                " `freeze_teachers=True`, so that only the EMA moves it"
            )
        for name, tensor in online.items():
            if teacher[name].shape != tensor.shape:
                raise ValueError(
                    f"{mirror}: `{name}` has shape {tuple(teacher[name].shape)} in the teacher and"
                    f" {tuple(tensor.shape)} in the online module"
                )
            _check_sharded_alike(teacher[name], tensor, f"{mirror}: `{name}`")
            pairs.append((teacher[name], tensor))
    onlines = {id(online) for _, online in pairs}
    if any(id(teacher) in onlines for teacher, _ in pairs):
        raise ValueError(
            f"`teachers` {dict(teachers)} overlap: a teacher parameter is also an online one (one path lies inside"
            " another), so the EMA would move the weights it averages"
        )
    return pairs  # sharded twins move shard by shard: TeacherState pairs their rank-local pieces


def _check_sharded_alike(teacher: Tensor, online: Tensor, what: str) -> None:
    """Raise ``ValueError`` unless a teacher tensor and its online twin are sharded alike (or both not at all), so
    that each rank's pieces are the same slice of the same parameter."""
    if not (is_sharded(teacher) or is_sharded(online)):
        return

    def layout(tensor: Tensor) -> str:
        if not is_sharded(tensor):
            return "not sharded"
        local = tuple(local_piece(tensor).shape)
        return f"sharded as {tensor.placements} on {tensor.device_mesh} (local shape {local})"  # type: ignore[attr-defined]

    if layout(teacher) != layout(online):
        raise ValueError(
            f"{what} is {layout(teacher)} in the teacher and {layout(online)} in the online module: shard the"
            " teacher exactly like its online twin (the same `fully_shard`/`parallelize_module` calls, in the same"
            " order), so that each rank holds the same slice of both"
        )


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"`teachers` names {path!r}, which is not a submodule of {type(module).__name__}; its children are"
            f" {children}"
        ) from None


class PowerEMAState:
    """Power-function EMAs of a module's parameters and buffers, one fp32 copy per ``sigma_rel`` (EDM2).

    Each is an :class:`EMAState` moved by :meth:`advance` with :math:`\\beta = (s / s')^{\\gamma + 1}` from
    ``s`` to ``s'`` samples seen, so its profile in samples does not depend on the batch size.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        sigma_rels: Sequence[float],
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
    ) -> None:
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(sigma_rel) for sigma_rel in self.sigma_rels)
        self.states = [EMAState.from_module(module, "fp32", include, exclude) for _ in self.sigma_rels]

    def advance(self, samples_before: int, samples_after: int, only_if: Optional[Tensor] = None) -> None:
        """Move every power EMA from ``samples_before`` to ``samples_after`` samples seen (see ``EMAState.update``)."""
        for gamma, state in zip(self.gammas, self.states):
            state.update(power_beta(samples_before, samples_after, gamma), only_if)

    @property
    def use_side_stream(self) -> bool:
        """Whether the power EMAs update on a CUDA side stream (see :attr:`EMAState.use_side_stream`)."""
        return self.states[0].use_side_stream

    @use_side_stream.setter
    def use_side_stream(self, value: bool) -> None:
        for state in self.states:
            state.use_side_stream = value

    def join(self) -> None:
        for state in self.states:
            state.join()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """The averages of every power EMA, keyed by its ``sigma_rel`` (as a string), live tensors."""
        return {repr(sigma_rel): state.state_dict() for sigma_rel, state in zip(self.sigma_rels, self.states)}

    def load_state_dict(self, saved: dict[str, dict[str, Tensor]]) -> None:
        expected = sorted(repr(sigma_rel) for sigma_rel in self.sigma_rels)
        if sorted(saved) != expected:
            raise KeyError(f"The saved post-hoc EMA tracks sigma_rel {sorted(saved)}, this one {expected}")
        for sigma_rel, state in zip(self.sigma_rels, self.states):  # every check before the first copy
            state.check_state_dict(saved[repr(sigma_rel)])
        for sigma_rel, state in zip(self.sigma_rels, self.states):
            state.load_state_dict(saved[repr(sigma_rel)])
