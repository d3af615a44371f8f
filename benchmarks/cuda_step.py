"""A training step on a GPU with each EMA: the time it adds, its memory, the evaluation swap, and host syncs.

    python benchmarks/cuda_step.py [--model vit_base_patch16_224] [--batch 32] [--steps 40] [--rounds 5]

A timm model trains on one fixed synthetic batch (bf16 autocast, fp32 weights, SGD with momentum, foreach).
Candidates, each over its own copy of the model, timed round-robin (``--rounds`` x ``--steps`` steps, a device
sync around each round): no EMA; ``ScaledEMA`` with its update on a CUDA side stream (the default), in line
(``side_stream=False``), with ``flat_parameters=True`` and with ``offload=True`` (the EMA in pinned CPU memory);
timm's ``ModelEmaV3``. Printed: the median time per step, the extra over no EMA as a multiple of the floor (one
flat fp32 ``lerp_`` over as many elements, timed on the same GPU), and each candidate's peak GPU memory over the
no-EMA run. Then the peak GPU memory of an evaluation forward on the EMA (zero-copy swap, ``copy_on_swap``,
timm's separate module), and whether 5 steps run under ``torch.cuda.set_sync_debug_mode("error")``.
Needs a CUDA device and the ``bench`` extra (timm).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians

from lightning_emascale import ScaledEMA

Step = Callable[[], None]


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ema_kind: str) -> tuple[Step, object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    ema: object = None
    if ema_kind.startswith("ScaledEMA"):
        options = {
            "ScaledEMA, side stream (default)": {},
            "ScaledEMA, in line (side_stream=False)": {"side_stream": False},
            "ScaledEMA, flat_parameters=True": {"flat_parameters": True},
            "ScaledEMA, offload=True": {"offload": True},
        }[ema_kind]
        ema = ScaledEMA(model, optimizer, momentum=0.999, base_batch_size=x.shape[0], **options)
    elif ema_kind == "timm ModelEmaV3":
        from timm.utils.model_ema import ModelEmaV3

        ema = ModelEmaV3(model, decay=0.999)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if isinstance(ema, ScaledEMA):
            ema.count_samples(x.shape[0])
        optimizer.step()  # ScaledEMA updates in the optimizer's post-hook
        optimizer.zero_grad(set_to_none=True)
        if ema_kind == "timm ModelEmaV3":
            ema.update(model)  # type: ignore[attr-defined]

    return step, ema


def floor_seconds(n: int) -> float:
    """One flat fp32 ``lerp_`` over ``n`` elements on the GPU (median of 25 timings of 20 back to back)."""
    flat, flat_ema = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    return interleaved_medians({"floor": lambda: flat_ema.lerp_(flat, 1e-3)}, repeats=25, inner=20)["floor"]


CANDIDATES = [
    "no EMA",
    "ScaledEMA, side stream (default)",
    "ScaledEMA, in line (side_stream=False)",
    "ScaledEMA, flat_parameters=True",
    "ScaledEMA, offload=True",
    "timm ModelEmaV3",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=100).cuda()
    n = sum(t.numel() for t in base.state_dict().values() if t.is_floating_point())
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 100, (args.batch,), device="cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.model} ({n / 1e6:.1f}M floats),"
          f" batch {args.batch}, {args.rounds} rounds x {args.steps} steps")  # fmt: skip

    floor = floor_seconds(n)

    steps: dict[str, Step] = {}
    emas: dict[str, object] = {}
    peaks: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for name in CANDIDATES:
        steps[name], emas[name] = make_step(copy.deepcopy(base), x, y, name)
        for _ in range(3):
            steps[name]()  # warm-up (cuDNN, the allocator, AveragedModel-style first copies)
    for _ in range(args.rounds):
        for name in CANDIDATES:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["no EMA"]
    print(f"\nfloor (one flat fp32 lerp_ over {n / 1e6:.1f}M): {floor * 1e3:.3f} ms")
    print(f"{'candidate':<42} {'ms/step':>8} {'spread':>13} {'extra x floor':>14} {'peak MiB':>9}")
    for name in CANDIDATES:
        spread = f"{min(times[name]) * 1e3:.2f}-{max(times[name]) * 1e3:.2f}"
        extra = (medians[name] - reference) / floor
        print(f"{name:<42} {medians[name] * 1e3:>8.2f} {spread:>13} {extra:>14.2f} {peaks[name]:>9.0f}")
    print("(peak MiB: all candidates' models stay allocated; compare each to 'no EMA' run after run)")

    print("\nEvaluation forward on the EMA (batch of the same size, no_grad): peak GPU MiB over the forward alone")
    model = copy.deepcopy(base)
    model.eval()

    def forward_peak(run: Callable[[], None]) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    with torch.no_grad():
        alone = forward_peak(lambda: model(x))
        for label, options in (("zero-copy swap (default)", {}), ("copy_on_swap=True", {"copy_on_swap": True})):
            ema = ScaledEMA(model, momentum=0.999, **options)

            def swapped_forward(ema: ScaledEMA = ema) -> None:
                with ema.swapped():
                    model(x)

            print(f"  {label:<40} +{forward_peak(swapped_forward) - alone:.0f} MiB")
            del ema
        bf16 = copy.deepcopy(base).to(torch.bfloat16).eval()
        bf16_x = x.to(torch.bfloat16)
        bf16_alone = forward_peak(lambda: bf16(bf16_x))
        ema = ScaledEMA(bf16, momentum=0.999)

        def bf16_forward() -> None:
            with ema.swapped():
                bf16(bf16_x)

        weights = sum(p.numel() * p.element_size() for p in bf16.parameters()) / 2**20
        print(f"  {'bf16 model, fp32 EMA: the cast only':<40} +{forward_peak(bf16_forward) - bf16_alone:.0f} MiB"
              f" (bf16 weights: {weights:.0f} MiB)")  # fmt: skip

    print("\nHost syncs in 5 training steps (set_sync_debug_mode('error')):")
    for name in ("no EMA", "ScaledEMA, side stream (default)", "ScaledEMA, offload=True"):
        step, _ = make_step(copy.deepcopy(base), x, y, name)
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                step()
            print(f"  {name:<40} none")
        except RuntimeError as error:
            print(f"  {name:<40} FOUND: {str(error).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    main()
