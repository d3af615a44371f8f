"""EMA memory and update time per rank under DeepSpeed ZeRO-3, against the rank's partition, a flat lerp and the
EMA that gathers the full parameters every step (what diffusers' EMAModel and DeepSpeed-Chat do).

    python benchmarks/deepspeed_zero.py [--ranks 1 2] [--width 1536] [--layers 8] [--repeats 15] [--bf16]
        [--device cpu|cuda]

Each rank runs ``deepspeed.initialize`` (ZeRO-3, every parameter partitioned: persistence threshold 0) on an MLP
with a torch SGD optimizer, builds ``ScaledEMA`` on the engine and reports:

- the bytes of its partition of the parameters (``ds_tensor``) and of its EMA (in fp32: the rank's fp32 master
  partition is what it averages), and what an EMA holding a full fp32 copy on every rank takes;
- the median time of one EMA update against the floor, one flat fp32 ``lerp_`` over as many elements as the rank's
  partition, and against the gathering EMA (``deepspeed.zero.GatheredParameters`` around a ``lerp_`` of each full
  parameter into a full copy), timed round-robin in the same process.

The processes talk over gloo (``--device cpu``; DeepSpeed's shared-memory collective op is not built) or NCCL
(``--device cuda``, one GPU per rank).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_times, run_ranks


def build(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(layers)]
    )


def bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo alone: no C++ build
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    else:
        torch.cuda.set_device(rank)
    import deepspeed
    import torch.distributed as dist

    from lightning_emascale import ScaledEMA
    from lightning_emascale._averager import Update

    model = build(args.width, args.layers)
    full_fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.bf16},
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    params = list(engine.module.parameters())
    ema = ScaledEMA(engine, engine.optimizer, momentum=0.999, auto_end_step=False, side_stream=False)
    state = ema.averager
    partition_bytes = bytes_of(p.ds_tensor for p in params)
    ema_bytes = bytes_of(state.averages)
    elements = sum(t.numel() for t in state.tracked)
    device = state.tracked[0].device
    floor_ema = torch.zeros(elements, device=device)
    floor_model = torch.randn(elements, device=device)
    full_copy = [torch.zeros(tuple(p.ds_shape), device=device) for p in params]  # the gathering EMA's full copy

    def gathering_update() -> None:
        with deepspeed.zero.GatheredParameters(params):
            for average, p in zip(full_copy, params):
                average.lerp_(p.detach().float(), 0.001)

    times = interleaved_times(
        {
            "update": lambda: state.update(Update(0.999)),
            "floor": lambda: floor_ema.lerp_(floor_model, 0.001),
            "gathering": gathering_update,
        },
        repeats=args.repeats,
    )
    ratios = sorted(u / f for u, f in zip(times["update"], times["floor"]))
    queue.put(
        (
            rank,
            partition_bytes,
            ema_bytes,
            full_fp32_bytes,
            statistics.median(times["update"]),
            statistics.median(times["floor"]),
            statistics.median(times["gathering"]),
            statistics.median(ratios),
            (ratios[0], ratios[-1]),
        )
    )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (the EMA averages the fp32 masters)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    import deepspeed

    params = args.layers * (args.width * args.width + args.width)
    dtype = "bf16" if args.bf16 else "fp32"
    print(
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {args.device}, ZeRO-3,"
        f" MLP {args.layers} x {args.width} ({params / 1e6:.1f}M params, {dtype})"
    )
    print(
        f"{'ranks':>5} {'rank':>4} {'partition MiB':>13} {'EMA MiB':>8} {'full-copy EMA MiB':>17}"
        f" {'update ms':>9} {'floor ms':>8} {'x floor':>7} {'spread':>11} {'gathering ms':>12} {'x ours':>6}"
    )
    mib = 1 << 20
    for world in args.ranks:
        rows = run_ranks(rank_main, world, args, timeout=120)
        for rank, partition, ema, full, update, floor, gathering, ratio, (low, high) in rows:
            print(
                f"{world:>5} {rank:>4} {partition / mib:>13.1f} {ema / mib:>8.1f} {full / mib:>17.1f}"
                f" {update * 1e3:>9.2f} {floor * 1e3:>8.2f} {ratio:>7.2f} {low:>5.2f}-{high:<5.2f}"
                f" {gathering * 1e3:>12.2f} {gathering / update:>6.1f}"
            )
    print(
        "The EMA holds each rank's partition in fp32 (1/N of the model); a full-copy EMA holds the whole model on"
        " every rank and gathers every parameter for each update."
    )


if __name__ == "__main__":
    main()
