"""How the averages of dense tensors are laid out and moved: one flat buffer per (device, dtypes), few large ops.

Pure torch. :class:`FlatGroup` holds the averages of tensors that share a device, a model dtype and an EMA dtype as
views into one flat buffer, and moves them with as few operations as the layout allows (see its docstring). The
store (:mod:`lightning_emascale._store`) owns the groups.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable
from typing import Literal, Optional

import torch
from torch import Tensor

EMAPrecision = Literal["fp32", "model"]
#: One independent piece of an update on a CPU: its elements, and ``fn(weight, share)`` that moves it (``share``: the
#: thread's index, which picks its own staging buffer).
Piece = tuple[int, Callable[[float, int], None]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Tensors under this many elements are updated together: concatenated into a staging buffer by one op and
# lerped as one range of the flat EMA (ResNet-50: ~225 such tensors, 1.4% of the elements, cost ~0.08x the floor
# in dispatch when updated one by one).
_SMALL = 1 << 16
_GPU_BLOCK = 1 << 24  # elements of the staging block on a GPU (64 MiB in fp32): launches, not cache, matter there
# What one more tensor in an op costs on a CPU, in elements of a one-thread lerp (~1 us of dispatch), for dealing the
# update's pieces evenly to threads.
_PER_TENSOR = 1 << 11
_CPU_BLOCK = 1 << 20  # on a CPU (4 MiB in fp32): measured, see block_elements


def block_elements(device_type: str, total: int) -> int:
    """Elements per staging block of a mixed-dtype group of ``total`` elements on ``device_type``: on a GPU 16M
    (launches, not cache, matter there); on a CPU an eighth of the group, at least 256K and at most 1M (4 MiB in
    fp32), so that the blocks can be dealt evenly to a few threads (:mod:`~lightning_emascale._cpu_split`).

    The CPU size was measured (a bf16 ResNet-50 with an fp32 EMA on a 2-core VM, old code and new side by side in one
    process): with the update split over 2 threads, 1<<20 took 21.2 ms against 21.6 for 1<<19, 21.6 for 1<<21 and
    23.5 for 1<<22 (the code before, all ops on 2 intra-op threads with a quarter of the last-level cache read from
    sysfs: 22.1 ms); on one thread 33.4 ms against 38.8 for the code before.
    """
    if device_type != "cpu":
        return _GPU_BLOCK
    return min(_CPU_BLOCK, max(1 << 18, -(-total // 8)))


def same_dtype_kind(saved: Tensor, model: Tensor) -> bool:
    """Whether a saved value can stand for ``model``'s without a lossy cast: both floating point, or both not (and
    bool only for bool)."""
    return saved.is_floating_point() == model.is_floating_point() and (saved.dtype == torch.bool) == (
        model.dtype == torch.bool
    )


def ema_dtype_for(dtype: torch.dtype, precision: EMAPrecision) -> torch.dtype:
    """The dtype of the EMA of a floating-point tensor of ``dtype``."""
    if precision == "fp32" and dtype in _LOW_PRECISION:
        return torch.float32
    return dtype


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (contiguous or channels-last alike)."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def is_dense(tensor: Tensor) -> bool:
    if tensor.is_contiguous():
        return True
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    return channels_last is not None and tensor.is_contiguous(memory_format=channels_last)


class FlatGroup:
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
        capacity = min(total, block_elements(device.type, total)) if self.mixed else self.small_end
        self.staging = torch.empty(max(capacity, 1), dtype=ema_dtype, device=device)
        # On a GPU a casting `cat` or `_foreach_copy_` launches one kernel per tensor: a block is gathered by one
        # same-dtype `cat` into this model-dtype buffer and cast by one `copy_` instead.
        gather = self.mixed and device.type == "cuda"
        self.gathered = torch.empty(max(capacity, 1), dtype=self.model_dtype, device=device) if gather else None
        self.buffers = False  # whether the group holds buffers (set by the owner)
        self.model_flat: Optional[Tensor] = None  # flat-parameter mode: the model tensors' own buffer
        self._adopted: list[int] = []
        self._extra_staging: dict[int, Tensor] = {}  # the staging of other threads (mixed dtypes, split on a CPU)
        self.refresh()
        with torch.no_grad():
            for view, model in zip(self.views, self.models):
                view.copy_(model.detach())

    @torch.no_grad()
    def adopt_model(self) -> None:
        """Flat-parameter mode: move the model tensors into one buffer laid out as the averages (same values and
        strides, ``.data`` re-pointed), so that one update is one lerp, or one cast per staging block. The owner runs
        :meth:`check_untied` first."""
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

    def check_untied(self) -> None:
        """Raise if two model tensors overlap in memory (tied through separate Parameter objects), which moving them
        into one buffer would untie. Tensors that merely share a storage without overlapping (the flat buffer of an
        earlier EMA of this module, in a second fit) are not tied."""
        spans = sorted(  # (storage, first byte, end byte) of each dense tensor
            (
                model.untyped_storage().data_ptr(),
                model.storage_offset() * model.element_size(),
                (model.storage_offset() + model.numel()) * model.element_size(),
            )
            for model in self.models
            if model.numel()
        )
        for (storage, _, end), (next_storage, next_start, _) in itertools.pairwise(spans):
            if storage == next_storage and next_start < end:
                raise ValueError(
                    "`flat_parameters=True` would untie tensors that share memory through separate Parameter"
                    " objects (e.g. `decoder.weight.data = encoder.weight.data`): tie them as one Parameter, or"
                    " leave it False"
                )

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
            self.adopt_model()  # some still live in the old buffer: no sharing check
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

    def lerp_from_flat(self, source: Tensor, weight: float) -> None:
        """Lerp the averages toward ``source``, a flat tensor laid out as :attr:`flat` (the adopted model, or an
        offloaded copy of it): one op where the dtypes match (the floor), else one cast and one lerp per block."""
        if not self.mixed:
            self.flat.lerp_(source, weight)
            return
        capacity = self.staging.numel()
        for start in range(0, self.flat.numel(), capacity):
            end = min(start + capacity, self.flat.numel())
            stage = self.staging[: end - start]
            stage.copy_(source[start:end])
            self.flat[start:end].lerp_(stage, weight)

    def update(self, weight: float) -> None:
        """One update of the averages, through the views :meth:`follow` took."""
        if self.per_tensor:
            for view, model in zip(self.views, self.models):
                view.lerp_(model.detach().to(view.dtype), weight)
            return
        if self.model_flat is not None:
            self.lerp_from_flat(self.model_flat, weight)
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

    @property
    def single_op(self) -> bool:
        """Whether the update is one op over the whole group (the adopted model, same dtypes): nothing to deal, and
        one op waits at one barrier only, so it runs on all threads."""
        return self.model_flat is not None and not self.mixed and not self.per_tensor

    def cpu_pieces(self) -> list[Piece]:
        """The update as independent pieces that threads may run side by side, each op on one intra-op thread
        (:mod:`~lightning_emascale._cpu_split`), with what each costs: its elements, plus :data:`_PER_TENSOR` for
        every tensor an op takes (the dispatch of ``cat`` over many small tensors). The same ops as :meth:`update`
        on the same elements, so the same values."""
        if self.per_tensor:
            return [
                (m.numel() + _PER_TENSOR, functools.partial(lerp_cast, v, m)) for v, m in zip(self.views, self.models)
            ]
        if self.model_flat is not None:  # the adopted model: one op (see `single_op`), or a cast and a lerp per block
            step = self.staging.numel()
            return [
                (min(step, self.flat.numel() - start), functools.partial(self._flat_range_update, start, start + step))
                for start in range(0, self.flat.numel(), step)
            ]
        if self.mixed:
            return [
                (
                    end - start + _PER_TENSOR * len(chunks),
                    functools.partial(self._block_update, start, end, chunks, slices is not None),
                )
                for start, end, chunks, slices in self.blocks
            ]
        pieces: list[Piece] = []
        if self.small_models:
            pieces.append((self.small_end + _PER_TENSOR * len(self.small_models), self._small_update))
        for view, model in zip(
            self.big_views, self.big_models
        ):  # in ranges of a block, so a few huge tensors deal evenly
            flat_view, flat_model = _flat(view), _flat(model.detach())
            for start in range(0, flat_view.numel(), _CPU_BLOCK):
                end = min(start + _CPU_BLOCK, flat_view.numel())
                pieces.append((end - start + _PER_TENSOR, Lerp(flat_view[start:end], flat_model[start:end])))
        return pieces

    def _flat_range_update(self, start: int, end: int, weight: float, share: int) -> None:
        """Elements ``start:end`` of the adopted model's flat buffer, cast through the staging (flat-parameter mode)."""
        assert self.model_flat is not None
        source = self.model_flat[start:end]
        stage = self._staging_for(share)[: source.numel()]
        stage.copy_(source)
        self.flat[start:end].lerp_(stage, weight)

    def _small_update(self, weight: float, share: int) -> None:
        stage = self.staging[: self.small_end]  # one piece only uses the group's own staging
        torch.cat(self.small_models, out=stage)
        self.flat[: self.small_end].lerp_(stage, weight)

    def _block_update(self, start: int, end: int, chunks: list[Tensor], big: bool, weight: float, share: int) -> None:
        """One staging block of a mixed-dtype group, cast into the staging buffer of thread ``share``."""
        stage = self._staging_for(share)[: end - start]
        if big:
            offsets = [0]
            for chunk in chunks:
                offsets.append(offsets[-1] + chunk.numel())
            torch._foreach_copy_([stage[a:b] for a, b in itertools.pairwise(offsets)], chunks)
        else:
            torch.cat(chunks, out=stage)  # the cast of many small tensors, in one op
        self.flat[start:end].lerp_(stage, weight)

    def _staging_for(self, share: int) -> Tensor:
        """Thread ``share``'s staging buffer: the group's own for the first, one more of the same size per other
        thread that runs this group's blocks (allocated once)."""
        if share == 0:
            return self.staging
        extra = self._extra_staging.get(share)
        if extra is None:
            extra = self._extra_staging[share] = torch.empty_like(self.staging)
        return extra


class Lerp:
    """A piece that lerps one average toward its same-dtype tensor; the pieces of one thread are merged into one
    ``_foreach_lerp_`` (:func:`~lightning_emascale._cpu_split.merge`)."""

    def __init__(self, view: Tensor, model: Tensor) -> None:
        self.view, self.model = view, model

    def __call__(self, weight: float, share: int) -> None:
        self.view.lerp_(self.model, weight)


def lerp_cast(view: Tensor, model: Tensor, weight: float, share: int) -> None:
    view.lerp_(model.detach().to(view.dtype), weight)
