"""The EMA update on its own CUDA stream, ordered against training without a host sync. Pure torch.

On a GPU the update is pure memory traffic that nothing in the next forward or backward reads, so it can run
beside them. :class:`SideStream` launches it on a second stream that first waits for the work queued on the
training stream (the optimizer step that wrote the weights); :meth:`SideStream.join` makes the training stream
wait for the update in turn. The EMA's owner joins before anything writes the weights again (the next optimizer
step) or reads the averages (a swap, a checkpoint). Both waits are queued on the device: the host never blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor


class SideStream:
    """A CUDA stream for the updates of one EMA on ``device``, created at the first launch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: Optional[torch.cuda.Stream] = None
        self._pending = False  # an update was launched that the training stream has not waited for yet

    @staticmethod
    def for_tensors(tensors: Sequence[Tensor]) -> Optional[SideStream]:
        """A side stream for ``tensors`` if they all live on one CUDA device, else ``None`` (update in line)."""
        devices = {tensor.device for tensor in tensors}
        if len(devices) != 1:
            return None
        (device,) = devices
        return SideStream(device) if device.type == "cuda" else None

    @contextmanager
    def launch(self, uses: Sequence[Optional[Tensor]] = ()) -> Iterator[None]:
        """Queue the work of the block on the side stream, after the work queued so far on the training stream.

        ``uses``: tensors from the training stream that the block reads or writes and that may be freed while it
        runs (a 0-d flag, weights replaced by ``module.to``): the caching allocator then keeps their memory from
        the training stream until the side stream is done with it (recording a storage once is enough).
        """
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # read the weights the step wrote
        for tensor in uses:
            if tensor is not None and tensor.is_cuda:
                tensor.record_stream(self._stream)
        self._pending = True  # also if the block raises part-way: what it queued is waited for
        with torch.cuda.stream(self._stream):
            yield

    def join(self) -> None:
        """Make the current stream wait for the updates launched so far (queued on the device; no host sync)."""
        if self._pending and self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._pending = False

    def __getstate__(self) -> dict:
        self.join()  # a copy or a pickle carries no stream
        return {**self.__dict__, "_stream": None, "_pending": False}
