"""EMA memory and update time per rank for an FSDP2-sharded model, against the model's own shard and a flat lerp.

    python benchmarks/sharded.py [--ranks 1 2] [--width 1536] [--layers 8] [--repeats 15] [--device cpu|cuda]

Each rank shards an MLP with ``fully_shard`` (one call per layer and one at the root), builds ``ScaledEMA`` and
reports, per rank:

- the bytes of its parameter shards and of its EMA (fp32 model: equal; the EMA holds this rank's shard only);
- what an EMA holding a full copy would take (the approach that gathers full parameters: the whole model on every
  rank), for comparison;
- the median time of one EMA update against the floor: one flat fp32 ``lerp_`` over as many elements as the
  rank's shard, timed round-robin in the same process.

The processes talk over gloo (``--device cpu``) or NCCL (``--device cuda``, one GPU per rank). For N ranks the
per-rank numbers are 1/N of the one-rank ones, up to the uneven split of rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_times, run_ranks

from lightning_emascale import ScaledEMA
from lightning_emascale._averager import Update


def build(width: int, layers: int, device: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(layers)]
    return torch.nn.Sequential(*blocks).to(device)


def bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    mesh = init_device_mesh(args.device, (world,))
    model = build(args.width, args.layers, device)
    full_bytes = bytes_of(model.parameters())
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = ScaledEMA(model, momentum=0.999, side_stream=False)
    state = ema.averager
    shard_bytes = bytes_of(state.tracked)
    ema_bytes = bytes_of(state.averages)
    elements = sum(t.numel() for t in state.tracked)
    floor_ema = torch.zeros(elements, device=device)
    floor_model = torch.randn(elements, device=device)
    times = interleaved_times(
        {
            "update": lambda: state.update(Update(0.999)),
            "floor": lambda: floor_ema.lerp_(floor_model, 0.001),
        },
        repeats=args.repeats,
    )
    ratios = sorted(u / f for u, f in zip(times["update"], times["floor"]))
    queue.put(
        (
            rank,
            shard_bytes,
            ema_bytes,
            full_bytes,
            statistics.median(times["update"]),
            statistics.median(times["floor"]),
            statistics.median(ratios),
            (ratios[0], ratios[-1]),
        )
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    print(
        f"torch {torch.__version__}, {args.device}, MLP {args.layers} x {args.width} ({params / 1e6:.1f}M params, fp32)"
    )
    print(
        f"{'ranks':>5} {'rank':>4} {'shard MiB':>10} {'EMA MiB':>8} {'EMA/shard':>9} {'full-copy EMA MiB':>17}"
        f" {'update ms':>9} {'floor ms':>8} {'x floor':>7} {'spread':>11}"
    )
    mib = 1 << 20
    for world in args.ranks:
        rows = run_ranks(rank_main, world, args, timeout=60)
        for rank, shard, ema, full, update, floor, ratio, (low, high) in rows:
            print(
                f"{world:>5} {rank:>4} {shard / mib:>10.1f} {ema / mib:>8.1f} {ema / shard:>9.2f} {full / mib:>17.1f}"
                f" {update * 1e3:>9.2f} {floor * 1e3:>8.2f} {ratio:>7.2f} {low:>5.2f}-{high:<5.2f}"
            )
    print("A full-copy EMA holds the whole model on every rank; this one holds each rank's shard (1/N of it).")


if __name__ == "__main__":
    main()
