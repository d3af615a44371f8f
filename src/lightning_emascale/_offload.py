"""Averages kept in CPU memory while the model trains on a GPU (``offload=True``). Pure torch.

The store copies the tracked tensors into pinned host staging without blocking; a background thread lerps the
host averages once the copy has landed, so training goes on meanwhile.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_emascale._flat_group import FlatGroup


class Offload:
    """Moves host-held averages toward device tensors in a background thread.

    Each update copies the tracked tensors into pinned host staging laid out as the averages (one foreach copy,
    ``non_blocking``), records a CUDA event, and lerps on the CPU in a background thread once the copy has
    landed. The next update, and every reader of the averages, waits for that thread first (:meth:`flush`). Host
    memory: the averages plus one model-dtype copy of the model.

    Args:
        groups: the flat groups (their averages live on the CPU), updated through their flat buffers.
        loose: (average, tensor) pairs lerped one by one (tensors with no dense memory order).
        copies: (copy, tensor) pairs copied, not averaged (integer tensors, masks).
    """

    def __init__(
        self,
        groups: Sequence[FlatGroup],
        loose: Sequence[tuple[Tensor, Tensor]],
        copies: Sequence[tuple[Tensor, Tensor]],
    ) -> None:
        pin = torch.cuda.is_available()
        self.hosts: list[Tensor] = []  # host staging, one per model tensor, in the order of `models`
        self.models: list[Tensor] = []
        self.groups: list[tuple[FlatGroup, Tensor]] = []
        for group in groups:
            host = torch.empty(group.flat.numel(), dtype=group.models[0].dtype, pin_memory=pin)
            offset = 0
            for model in group.models:
                self.hosts.append(host.as_strided(model.shape, model.stride(), offset))
                self.models.append(model)
                offset += model.numel()
            self.groups.append((group, host))
        self.loose: list[tuple[Tensor, Tensor]] = []
        self.copies: list[tuple[Tensor, Tensor]] = []
        for pairs, into in ((loose, self.loose), (copies, self.copies)):
            for average, model in pairs:
                host = torch.empty(model.shape, dtype=model.dtype, pin_memory=pin)
                self.hosts.append(host)
                self.models.append(model)
                into.append((average, host))
        self.pending: Optional[concurrent.futures.Future] = None
        self.executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def follow(self, models: Sequence[Tensor]) -> None:
        """Read the model tensors from ``models`` from now on (the same order as built: groups, loose, copies),
        after a sharded tensor's local piece moved."""
        self.models = list(models)

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
            group.lerp_from_flat(host, weight)
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
