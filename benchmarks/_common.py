"""Timing helpers shared by the benchmarks: interleaved repetitions, medians, ratios, a busy second core."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 3, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin so that machine noise hits all alike.

    Each timing covers ``inner`` calls back to back between two device syncs (on a GPU, so that the launches of
    one call overlap the kernels of the last, as in training, and the sync's own cost is spread out).
    """
    times = interleaved_times(candidates, repeats, warmup, inner)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 3, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in every round (see :func:`interleaved_medians`)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) / inner)
    return times


def paired_ratio(
    fn: Callable[[], None], floor: Callable[[], None], repeats: int, inner: int = 1
) -> tuple[float, float]:
    """The median over rounds of (time of ``fn`` / time of ``floor``) measured back to back in the same round (a
    drift of the machine's speed between rounds cancels in each ratio; a ratio of medians keeps it), and the
    floor's median seconds."""
    times = interleaved_times({"floor": floor, "fn": fn}, repeats, inner=inner)
    ratio = statistics.median(a / b for a, b in zip(times["fn"], times["floor"]))
    return ratio, statistics.median(times["floor"])


def print_table(title: str, medians: dict[str, float], floor: str, notes: dict[str, str]) -> None:
    print(f"\n{title}")
    print(f"{'candidate':<44} {'median ms':>10} {'x floor':>8}")
    for name, seconds in medians.items():
        print(f"{name:<44} {seconds * 1e3:>10.2f} {seconds / medians[floor]:>8.2f}")
    for name, note in notes.items():
        print(f"{name:<44} {'fails':>10}   {note}")


# The load of `busy_core`: what a dataloader worker does to a core (one thread, compute and memory traffic).
_BUSY = """
import os, sys, torch
os.nice(int(sys.argv[1]))  # 19: below the timed process; 0: beside it, as a dataloader worker is by default
torch.set_num_threads(1)
torch.manual_seed(0)
parent = os.getppid()
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
)
images = torch.randn(8, 3, 64, 64)
net(images).sum().backward()
print("ready", flush=True)
while os.getppid() == parent:  # the parent died without stopping it: stop
    net(images).square().mean().backward()
"""


class BusyCore:
    """A running background load (see :func:`busy_core`)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.started, self.start_seconds = time.perf_counter(), self._cpu_seconds()

    def _cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def cpu_share(self) -> float:
        """CPU seconds the load has used per wall second since it was ready (1.0: one whole core)."""
        return (self._cpu_seconds() - self.start_seconds) / (time.perf_counter() - self.started)


@contextmanager
def busy_core(nice: int = 19) -> Iterator[BusyCore]:
    """Keep one core busy for the duration of the block, as a dataloader worker does: a child process at
    ``nice`` (19: the lowest priority; 0: a worker's own) running a small conv net forward/backward on one thread.
    It is stopped at the end, also on error (terminate, then kill if it has not exited after 5 s)."""
    process = subprocess.Popen([sys.executable, "-c", _BUSY, str(int(nice))], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the busy-core process failed to start (exit code {process.wait()})")
        yield BusyCore(process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A TCP port free now on this machine (for a process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(rank_main: Callable[..., None], world: int, *args: object, timeout: float = 120) -> list:
    """Start ``world`` spawned processes running ``rank_main(rank, world, port, *args, queue)`` (each puts one row,
    its rank first, on ``queue``), and return the rows by rank; exit if a rank fails."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=rank_main, args=(r, world, port, *args, queue)) for r in range(world)]
    for process in processes:
        process.start()
    rows = sorted(queue.get() for _ in range(world))
    for process in processes:
        process.join(timeout=timeout)
        if process.exitcode != 0:
            raise SystemExit(f"a rank failed (exit code {process.exitcode})")
    return rows
