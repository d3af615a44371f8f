"""One EMA update: lightning-emascale against the floor and against peer libraries, in one process.

    python benchmarks/ema_update.py [--runs 2] [--repeats 25] [--device cpu|cuda] [--memory] [--threads N] [--busy]

Floor: one flat fp32 ``lerp_`` over as many elements as the model has (the memory traffic any EMA must pay).
Each candidate is built alone and timed interleaved with the floor (so that memory holds one EMA copy at a time).
Peers: timm ``ModelEmaV3``, ema-pytorch ``EMA`` (per tensor and ``use_foreach``), torch ``AveragedModel`` with
``get_ema_multi_avg_fn``, Lightning's ``EMAWeightAveraging`` (its ``AveragedModel`` with a per-tensor
``avg_fn``), and the readable per-tensor reference update. Each table is measured ``--runs`` times; a run's ratio is
the median over repetitions of (candidate / floor) timed back to back, so that drift of the machine cancels; the
table shows the median of the runs' ratios and their spread. On a GPU each timing
covers ``--inner`` updates back to back (20 by default). ``--memory`` runs every candidate in a fresh process and
prints its peak memory over the model alone: resident memory on a CPU, allocated GPU memory on a GPU.
``--threads N`` sets ``torch.set_num_threads(N)`` for the timed process (default: torch's own, one per core).
``--busy [NICE]`` keeps one other core busy for the whole measurement, as dataloader workers do: a background process
at ``nice`` 19 (or ``NICE``; 0 is a worker's own priority) runs a small conv net forward/backward on one thread
(``_common.busy_core``; its CPU share is printed).
On a 2-core CPU run it with ``--threads 1`` and ``--threads 2``: with 2 threads every op's second thread competes
with the load. Needs the ``bench`` extra.
Targets: fp32 <= 1.05x the floor; a bf16 model with an fp32 EMA <= 1.2x (idle; with ``--busy`` the same targets
are printed, for comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import busy_core, paired_ratio

from lightning_emascale._averager import Update
from lightning_emascale._polyak import PolyakEMA
from lightning_emascale._store import reference_update

FLOOR = "floor: one flat fp32 lerp_"
OURS = "lightning-emascale PolyakEMA.update"
FLAT = "lightning-emascale, flat_parameters=True"
TARGETS = {False: 1.05, True: 1.2}


def build(name: str, device: str, bf16: bool) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device)
    return model.to(torch.bfloat16) if bf16 else model


def _fp32_copy(module: torch.nn.Module, bf16: bool) -> None:
    if bf16:
        module.float()  # every peer keeps its EMA in fp32, as a bf16 EMA with decay 0.999 rounds updates away


def make(name: str, model: torch.nn.Module, bf16: bool) -> Callable[[], None]:
    """The update function of one candidate, built over ``model``."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if name == FLOOR:
        n = sum(t.numel() for t in floats)  # parameters and float buffers: what every candidate averages
        flat, flat_ema = torch.randn(n, device=floats[0].device), torch.randn(n, device=floats[0].device)
        return lambda: flat_ema.lerp_(flat, 1e-3)
    if name == OURS:
        ours = PolyakEMA.from_module(model)
        return lambda: ours.update(Update(0.999))
    if name == FLAT:
        flat_model = copy.deepcopy(model)  # its tensors move into the EMA's layout; the others keep theirs
        flat_state = PolyakEMA.from_module(flat_model, flat_parameters=True)
        return lambda: flat_state.update(Update(0.999))
    if name == "per-tensor reference (reference_update)":
        reference = PolyakEMA.from_module(model)
        return lambda: reference_update(reference.averages, reference.tracked, 0.999)
    if name == "timm ModelEmaV3 (foreach)":
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=0.999)
        _fp32_copy(timm_ema.module, bf16)
        return lambda: timm_ema.update(model)
    if name.startswith("ema-pytorch EMA"):
        from ema_pytorch import EMA

        ema = EMA(
            model, beta=0.999, update_after_step=0, update_every=1, use_foreach="foreach" in name, coerce_dtype=bf16
        )
        _fp32_copy(ema.ema_model, bf16)
        return lambda: ema.update()
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    if name == "torch AveragedModel + multi_avg_fn":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    else:  # Lightning's EMAWeightAveraging keeps an AveragedModel with a per-tensor avg_fn
        averaged = AveragedModel(model, avg_fn=get_ema_avg_fn(0.999), use_buffers=True)
    _fp32_copy(averaged.module, bf16)
    return lambda: averaged.update_parameters(model)


CANDIDATES = [
    FLOOR,
    OURS,
    FLAT,
    "per-tensor reference (reference_update)",
    "timm ModelEmaV3 (foreach)",
    "ema-pytorch EMA (per tensor)",
    "ema-pytorch EMA (use_foreach)",
    "torch AveragedModel + multi_avg_fn",
    "Lightning EMAWeightAveraging (AveragedModel)",
]


def candidate(name: str, model: torch.nn.Module, bf16: bool) -> tuple[Callable[[], None] | None, str]:
    """The update of one candidate, run twice (AveragedModel's first call only copies), or why it fails."""
    try:  # a peer that cannot update at all is reported, not hidden
        fn = make(name, model, bf16)
        fn()
        fn()
        return fn, ""
    except Exception as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


_PEAK = """
import gc, sys, torch
sys.path.insert(0, {folder!r})
import ema_update as bench
model = bench.build({model!r}, {device!r}, {bf16!r})
gc.collect()
cuda = {device!r}.startswith("cuda")
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM) to the current one
def hwm():
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
base = torch.cuda.memory_allocated() / 2**20 if cuda else hwm()
update = bench.make({name!r}, model, {bf16!r})
for _ in range(3):
    update()
print(hwm() - base)
"""


def peak_memory_mib(model_name: str, name: str, device: str, bf16: bool) -> str:
    """Peak memory of a fresh process building ``name`` over the model and updating 3 times, minus the model's:
    resident memory on a CPU (Linux: the peak is reset once the model is built), allocated memory on a GPU."""
    code = _PEAK.format(folder=str(Path(__file__).parent), model=model_name, device=device, bf16=bf16, name=name)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return f"{float(run.stdout.split()[-1]):.0f}" if run.returncode == 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    parser.add_argument("--memory", action="store_true", help="also the peak memory of each candidate")
    parser.add_argument("--only", nargs="+", default=None, help="candidates whose name starts with one of these")
    parser.add_argument("--inner", type=int, default=None, help="updates per timing (default: 1 CPU, 20 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the timed process")
    parser.add_argument(
        "--busy", type=int, nargs="?", const=19, default=None, metavar="NICE",
        help="keep another core busy with a 1-thread conv net at this niceness (19 if not given; 0: a worker's own)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    inner = args.inner or (20 if args.device.startswith("cuda") else 1)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"threads {torch.get_num_threads()}"
    load = f", another core busy (nice-{args.busy} 1-thread conv net)" if args.busy is not None else ""
    print(f"torch {torch.__version__}, device {args.device} ({where}), runs {args.runs}, inner {inner}{load}")
    with busy_core(args.busy) if args.busy is not None else contextlib.nullcontext() as busy:
        measure(args, inner)
        if busy is not None:
            print(f"(the busy process used {busy.cpu_share():.2f} of a core during the measurement)")
    print(f"(max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


def measure(args: argparse.Namespace, inner: int) -> None:
    """Every table: each model, fp32 and bf16."""
    for model_name in args.models:
        for bf16 in (False, True):
            model = build(model_name, args.device, bf16)
            n = sum(p.numel() for p in model.parameters())
            kind = "bf16 model, fp32 EMA" if bf16 else "fp32"
            print(f"\n{model_name} ({n / 1e6:.1f}M params), {kind}")
            print(f"{'candidate':<46} {'x floor':>8} {'spread':>11}" + ("  peak MiB over model" if args.memory else ""))
            floor, _ = candidate(FLOOR, model, bf16)
            assert floor is not None
            worst = flat_worst = 0.0
            floors: list[float] = []
            chosen = [name for name in CANDIDATES[1:] if not args.only or name.startswith(tuple(args.only))]
            for name in chosen:  # one at a time against the floor: memory stays one EMA copy
                fn, failure = candidate(name, model, bf16)
                if fn is None:
                    print(f"{name:<46} {'fails':>8}   {failure}")
                    continue
                ratios = []
                for _ in range(args.runs):
                    ratio, floor_seconds = paired_ratio(fn, floor, repeats=args.repeats, inner=inner)
                    ratios.append(ratio)
                    floors.append(floor_seconds)
                ratios.sort()
                mib = f"  {peak_memory_mib(model_name, name, args.device, bf16):>10}" if args.memory else ""
                middle = (
                    ratios[(len(ratios) - 1) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1 :][:2]) / 2
                )
                print(f"{name:<46} {middle:>8.2f} {ratios[0]:>5.2f}-{ratios[-1]:<5.2f}{mib}")
                if name == OURS:
                    worst = ratios[-1]
                if name == FLAT:
                    flat_worst = ratios[-1]
                del fn
            print(f"(the floor took {min(floors) * 1e3:.2f}-{max(floors) * 1e3:.2f} ms in these measurements)")
            target = TARGETS[bf16]
            if OURS in chosen:
                verdict = "OK" if worst <= target else "OVER"
                print(f"lightning-emascale: {worst:.2f}x the floor at worst (target <= {target}x): {verdict}")
            if FLAT in chosen:
                flat_verdict = "OK" if flat_worst <= target else "OVER"
                print(f"  with flat_parameters=True (deprecated): {flat_worst:.2f}x at worst: {flat_verdict}")
            del model, floor


if __name__ == "__main__":
    main()
