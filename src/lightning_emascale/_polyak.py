"""The Polyak EMA: one averaged copy of a module's parameters and buffers, swapped in for evaluation.

Pure torch, no Lightning. The copy is never registered where DDP or the module's ``state_dict`` would see it, and
the module is not deep-copied (so modules that cannot be copied work). Its tensors live in a
:class:`~lightning_emascale._store.TensorStore`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightning_emascale._averager import Averager, Update, all_finite
from lightning_emascale._checks import check_fraction
from lightning_emascale._flat_group import EMAPrecision
from lightning_emascale._options import EMAOptions
from lightning_emascale._selection import select_tensors
from lightning_emascale._sharded import clean_name, is_sharded, local_piece
from lightning_emascale._store import Store, TensorStore
from lightning_emascale._warnings import caller_level
from lightning_emascale._zero import PARTITIONS_KEY, check_layout, is_zero3
from lightning_emascale._zero_store import ZeroPartitionStore


def refuse_polyak_only(options: EMAOptions) -> None:
    """Raise ``ValueError`` for an option only a Polyak EMA takes, given to another mode."""
    if options.copy_on_swap:
        raise ValueError(
            "`copy_on_swap=True` changes how a Polyak EMA is swapped in for evaluation: teacher mode and a post-hoc"
            " EMA swap nothing, so drop it"
        )
    _check_offload(options, other_mode=True)
    if options.flat_parameters:
        raise ValueError(
            "`flat_parameters=True` lays the module's tensors out next to one Polyak EMA: it does not apply to"
            " teacher mode or a post-hoc EMA"
        )


def check_options(options: EMAOptions) -> None:
    """The Polyak EMA's own checks of options that clash with each other."""
    _check_offload(options, other_mode=False)


def _check_offload(options: EMAOptions, other_mode: bool) -> None:
    clashing = [name for name in ("flat_parameters", "skip_non_finite") if options.offload and getattr(options, name)]
    if options.offload and (other_mode or clashing):
        raise ValueError(
            "`offload=True` keeps one Polyak EMA in CPU memory and updates it in a background thread: it does"
            f" not combine with {clashing or 'teacher mode or a post-hoc EMA'}"
        )


class PolyakEMA(Averager):
    """An exponential moving average of named tensors: ``ζ ← decay·ζ + (1 − decay)·θ`` after every update.

    Floating-point tensors are averaged, other tensors (integer buffers such as BatchNorm's
    ``num_batches_tracked``, and float buffers that hold ±inf when built, such as masks) are copied. The EMA of a
    float16/bfloat16 tensor is kept in float32 with ``precision="fp32"``, so small updates are not rounded away.

    Args:
        named_tensors: the tensors to track, by name. They are referenced, not copied, and must keep their
            identity and shape (module parameters and buffers do). A tensor listed under several names (tied
            weights) is tracked once; :attr:`index_of_name` maps every name to it.
        precision: ``"fp32"`` or ``"model"`` (keep the model's dtype).
        buffer_names: which names are buffers (``skip_non_finite`` allows an infinite buffer, not a NaN one).
        flat_parameters, offload: how the store lays the averages out (see :class:`TensorStore`).
        copy_on_swap: :meth:`swap_in` copies the averages into the tracked tensors (keeping a copy of the training
            values) instead of pointing the parameters at the averages' own storage.
    """

    state_key = "ema"
    swappable = True

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
        #: Every name, aliases included, -> the index of its tensor in :attr:`tracked` and :attr:`averages`.
        self.index_of_name: dict[str, int] = {}
        unique: list[tuple[str, Tensor]] = []
        index_of_tensor: dict[int, int] = {}
        for name, tensor in named_tensors:
            if id(tensor) not in index_of_tensor:
                index_of_tensor[id(tensor)] = len(unique)
                self.names.append(name)
                unique.append((name, tensor))
            self.index_of_name[name] = index_of_tensor[id(tensor)]
        #: Whether each tracked tensor is a buffer (``skip_non_finite`` allows an infinite buffer, not a NaN one).
        self.is_buffer = [name in buffer_names for name in self.names]
        #: Where the averages live and how an update moves them.
        self.store: Store = (ZeroPartitionStore if any(is_zero3(t) for _, t in unique) else TensorStore)(
            unique, precision, self.is_buffer, flat_parameters, offload
        )
        #: Names of the module's tensors deliberately left out (``include``/``exclude``, non-persistent buffers).
        self.untracked_names: frozenset[str] = frozenset()
        #: Those tensors (a swap copies a tracked tensor that shares memory with one of them, so they stay tied).
        self.untracked_tensors: list[Tensor] = []
        self.copy_on_swap = copy_on_swap
        self._seen_versions: list[int] = []
        self._stale_at_swap = False
        self._raw_backup: list[Tensor] | None = None
        self._pointed: list[int] = []  # tensors whose .data points at their average while swapped
        self._pointed_versions: list[int] = []

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
    ) -> PolyakEMA:
        """Track the parameters and buffers of ``module`` that :func:`select_tensors` selects, tied ones once."""
        selected, untracked = select_tensors(module, include, exclude)
        buffers = {clean_name(name) for name, _ in module.named_buffers(remove_duplicate=False)}
        state = cls(selected, precision, buffers, flat_parameters, offload, copy_on_swap)
        state.untracked_names = untracked
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        state.untracked_tensors = [tensor for name, tensor in named if clean_name(name) in untracked]
        return state

    @classmethod
    def for_options(cls, module: torch.nn.Module, options: EMAOptions, copy_on_swap: bool) -> PolyakEMA:
        """The Polyak EMA of ``module`` that ``options`` describe (``copy_on_swap`` as the module's layout needs)."""
        return cls.from_module(
            module, options.ema_precision, options.include, options.exclude, options.flat_parameters,
            options.offload, copy_on_swap,
        )  # fmt: skip

    # ------------------------------------------------------------------------------ the store's tensors
    @property
    def tracked(self) -> list[Tensor]:
        """The live tensors being averaged (a sharded tensor's rank-local piece)."""
        return self.store.tracked

    @property
    def averages(self) -> list[Tensor]:
        """The averages, one per tracked tensor (float32 for a low-precision tensor with ``precision="fp32"``)."""
        return self.store.averages

    @property
    def sources(self) -> list[Optional[Tensor]]:
        """The ``DTensor`` of each tracked tensor that is a rank's piece of one (``None`` for the others)."""
        return self.store.sources

    # ------------------------------------------------------------------------------------- the protocol
    def describe(self) -> str:
        return "a Polyak EMA"

    def update(self, step: Update, only_if: Optional[Tensor] = None) -> None:
        """``ζ ← decay·ζ + (1 − decay)·θ`` for every floating-point tensor; copy the rest. No host sync."""
        self.store.update(1.0 - step.decay, only_if)

    def finite(self) -> Tensor:
        return all_finite(self.tracked, nan_only=self.is_buffer)

    def join(self) -> None:
        """Make the current CUDA stream wait for the updates launched on the side stream (no host sync)."""
        self.store.join()

    def flush(self) -> None:
        self.store.flush()

    def set_side_stream(self, enabled: bool) -> None:
        self.store.use_side_stream = enabled

    def refresh(self) -> None:
        """Read the tracked tensors' current storage from now on (after ``module.to(...)`` replaced ``.data``)."""
        self.store.refresh()

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average afresh from the tracked tensors' current values."""
        if self.is_swapped:
            raise RuntimeError("reset() while the EMA is swapped into the model: call swap_out() first")
        self.flush()
        self.store.follow()
        for average, raw in zip(self.averages, self.raw_tensors()):
            average.copy_(raw)
        self.mark_seen()

    # ------------------------------------------------------------------------------------------- swaps
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
        self.store.follow()
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
            for index, (tensor, average) in enumerate(zip(self.store.targets, self.averages)):
                if index in pointed:
                    backup.append(tensor.data)  # the training storage itself: no copy
                    same = average.dtype == tensor.dtype and average.device == tensor.device
                    point_to[index] = average if same else average.to(tensor.device, tensor.dtype)
                else:
                    backup.append(tensor.detach().clone())
        for index, (tensor, average) in enumerate(zip(self.store.targets, self.averages)):
            if index in point_to:
                tensor.data = point_to[index]
            else:
                tensor.copy_(average)
        self._raw_backup, self._pointed, self._stale_at_swap = backup, pointed, stale
        _bump([self.tracked[index] for index in pointed])
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
        for index, (tensor, raw) in enumerate(zip(self.store.targets, self._raw_backup)):
            if index in pointed:
                tensor.data = raw
            else:
                tensor.copy_(raw)
        _bump([self.tracked[index] for index in self._pointed])
        self._raw_backup, self._pointed, self._pointed_versions = None, [], []
        if not self._stale_at_swap:
            self.mark_seen()  # swapping wrote the tensors; their values are the ones seen
        if written:
            shown = ", ".join(repr(name) for name in written[:5]) + (", ..." if len(written) > 5 else "")
            warnings.warn(
                f"{shown} ({len(written)} tensors) were written in place while the EMA was swapped in (an optimizer"
                " step, test-time adaptation, `load_state_dict`): they pointed at the EMA's own storage, so the EMA"
                " now holds those writes. Evaluate on a copy with `copy_on_swap=True` if the EMA must not change.",
                stacklevel=caller_level(),
            )

    def _shares_average(self, index: int) -> bool:
        average, tensor = self.averages[index], self.tracked[index]
        return average.dtype == tensor.dtype and average.device == tensor.device

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Hold the EMA values in the tracked tensors inside the block; restore the raw values exactly after."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    # ------------------------------------------------------------------------------- writing it in
    @torch.no_grad()
    def write_into_module(self, keep: float = 0.0) -> None:
        """Write the EMA into the tracked tensors for good: :math:`\\theta \\leftarrow \\text{keep}\\cdot\\theta +
        (1 - \\text{keep})\\cdot\\zeta` (``keep=0`` copies it; a positive ``keep`` is ema-pytorch's
        ``update_model_with_ema(beta)``, "switch EMA").

        A floating-point tensor gets ``θ.lerp(ζ, 1 − keep)`` computed in the wider of the two dtypes and rounded once
        to its own (a bf16 parameter of an fp32 EMA gets the cast of the fp32 result); a tensor the EMA copies (an
        integer buffer, a float buffer holding ±inf) gets the EMA's value. A tied tensor is written once (every name
        sees it), and so is a tensor left out of the EMA that shares its memory. The writes are in place, so the
        tensors' version counters move on: a graph built before the write raises in ``backward``. The module's
        tensors are then remembered as seen (:meth:`mark_seen`: :meth:`changed_since_seen` flags neither this write
        nor the writes it overwrote). The optimizer's state (momenta) is left as it is.

        Args:
            keep: the share of the training value kept, in [0, 1].

        Raises:
            RuntimeError: while the EMA is swapped in, and for a DeepSpeed ZeRO-3 module.
            ValueError: ``keep`` outside [0, 1].
        """
        keep = check_fraction(keep, "keep")
        if isinstance(self.store, ZeroPartitionStore):
            raise RuntimeError(
                "write_into_module() is not supported under DeepSpeed ZeRO-3: DeepSpeed keeps fp32 master weights in"
                " its optimizer, which this write would not reach, so the next `engine.step()` would overwrite it."
                " Save a checkpoint, consolidate it with `lightning_emascale.consolidate_deepspeed_checkpoint`"
                " (its `state_dict` is the EMA) and load that into the model (or a new DeepSpeed run) instead"
            )
        if self.is_swapped:
            raise RuntimeError(
                "write_into_module() while the EMA is swapped into the model: swap_out() would put the training"
                " weights back over it. Call swap_out() (or leave the swapped() block) first"
            )
        self.flush()  # an update on the side stream or the offload thread has finished
        self.store.follow()
        copied = {id(tensor) for tensor in getattr(self.store, "copies", ([], []))[1]}
        for tensor, average in zip(self.store.targets, self.averages):
            if keep == 0.0 or not tensor.is_floating_point() or id(tensor) in copied:
                tensor.copy_(average)  # casts to the tensor's dtype and device
            else:
                wide = torch.promote_types(tensor.dtype, average.dtype)
                tensor.copy_(torch.lerp(tensor.to(wide), average.to(tensor.device, wide), 1.0 - keep))
        self.mark_seen()  # the module now holds what the EMA wrote: nothing it tracks is stale

    # ----------------------------------------------------------------------------------- reading it
    def raw_tensors(self) -> list[Tensor]:
        """The training (raw) values of the tracked tensors, also while the EMA is swapped in (a tracked tensor
        that a swap does not write, a ZeRO-3 fp32 master, is read as it is)."""
        if self._raw_backup is None:
            return [t.detach() for t in self.tracked]
        return [
            raw if target is tracked else tracked.detach()
            for raw, target, tracked in zip(self._raw_backup, self.store.targets, self.tracked)
        ]

    def _by_name(self, tensors: Sequence[Tensor], names: Iterator[tuple[str, int]]) -> dict[str, Tensor]:
        views = self.store.views(tensors)
        return {name: views[index] for name, index in names}

    def averages_by_name(self) -> dict[str, Tensor]:
        """The EMA of every tracked tensor under every one of its names (live tensors, EMA dtype; a sharded one
        as a ``DTensor`` view of this rank's shard, like the module's own ``state_dict()``)."""
        self.flush()
        return self._by_name(self.averages, iter(self.index_of_name.items()))

    def raw_by_name(self) -> dict[str, Tensor]:
        """The training values under every name, also while the EMA is swapped in."""
        return self._by_name(self.raw_tensors(), iter(self.index_of_name.items()))

    def weights_by_name(self) -> dict[str, Tensor]:
        self.flush()
        return {
            name: self.averages[i].to(self.tracked[i].device, self.tracked[i].dtype)
            for name, i in self.index_of_name.items()
        }

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

    # ------------------------------------------------------------------------------------------ state
    def averages_state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by their first names (the live tensors, not copies; sharded ones as ``DTensor`` views)."""
        self.flush()
        return self._by_name(self.averages, ((name, index) for index, name in enumerate(self.names)))

    def check_averages(self, saved: Mapping[str, Tensor]) -> None:
        """Raise ``KeyError`` naming missing and unexpected names, ``ValueError`` for a shape that differs (a
        sharded tensor's saved value: its global shape, and a ``DTensor``'s layout)."""
        missing = sorted(set(self.names) - set(saved))
        unexpected = sorted(set(saved) - set(self.names) - self.untracked_names)  # 0.1 averaged every buffer
        if missing or unexpected:
            raise KeyError(
                f"The saved EMA does not match the model: missing {missing}, unexpected {unexpected}."
                " Was the checkpoint written for another model?"
            )
        self.store.check_values([saved[name] for name in self.names])
        for name, is_buffer in zip(self.names, self.is_buffer):
            value = saved[name]
            local = local_piece(value) if is_sharded(value) else value  # this rank's shard: no communication
            if not is_buffer and local.is_floating_point() and not bool(torch.isfinite(local).all()):
                raise ValueError(
                    f"The saved EMA of {name!r} (a parameter) is non-finite (inf); the checkpoint is corrupt"
                )

    @torch.no_grad()
    def load_averages(self, saved: Mapping[str, Tensor]) -> None:
        """Copy saved EMA values in, after :meth:`check_averages` (every check before the first copy)."""
        self.flush()
        self.check_averages(saved)
        values = self.store.local_values([saved[name] for name in self.names])
        for average, value in zip(self.averages, values):
            average.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ema": self.averages_state_dict()}
        if self.store.partition_layout is not None:  # ZeRO-3: each rank's pieces, and how to put them together
            state[PARTITIONS_KEY] = self.store.partition_layout
        return state

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_partitions(state)
        self.check_averages(state["ema"])

    def _check_partitions(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless the ZeRO-3 pieces a state holds (if any) are this rank's."""
        saved = state.get(PARTITIONS_KEY)
        here = self.store.partition_layout
        if saved is not None and here is None:
            raise ValueError(
                f"The saved EMA holds one rank's pieces of a DeepSpeed ZeRO-3 model (rank {saved.get('rank')!r} of"
                f" {saved.get('world_size')!r}), and this model is not partitioned: consolidate the checkpoint"
                " directory into one file with `lightning_emascale.consolidate_deepspeed_checkpoint` and load that"
            )
        if saved is not None and here is not None:
            check_layout(saved, here, "The saved EMA")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_partitions(state)
        self.load_averages(state["ema"])


def _bump(tensors: list[Tensor]) -> None:
    for tensor in tensors:  # one at a time: torch < 2.5 takes a single tensor
        increment_version(tensor)
