"""One EMA update: lightning-emascale against the floor and against peer libraries, in one process.

    python benchmarks/ema_update.py [--repeats 25] [--device cpu]

Floor: one flat fp32 ``lerp_`` over as many elements as the model has (the memory traffic any EMA must
pay). Peers: timm ``ModelEmaV3``, torch ``AveragedModel`` with ``get_ema_multi_avg_fn``, Lightning's
``EMAWeightAveraging`` (its ``AveragedModel`` with a per-tensor ``avg_fn``). Needs the ``bench`` extra (timm).
Targets on CPU: fp32 <= 1.10x the floor; bf16 model with an fp32 EMA <= 1.5x the fp32 floor.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, print_table

from lightning_emascale._ema import EMAState


def build(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def candidates(model: torch.nn.Module, bf16: bool) -> tuple[dict, dict]:
    fns, failures = {}, {}
    averaged_tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    n = sum(t.numel() for t in averaged_tensors)  # parameters and float buffers: what every candidate averages
    device = averaged_tensors[0].device
    flat, flat_ema = torch.randn(n, device=device), torch.randn(n, device=device)
    fns["floor: one flat fp32 lerp_"] = lambda: flat_ema.lerp_(flat, 1e-3)

    ours = EMAState(list(model.state_dict(keep_vars=True).items()), precision="fp32")
    fns["lightning-emascale EMAState.update"] = lambda: ours.update(0.999)

    from timm.utils.model_ema import ModelEmaV3

    timm_ema = ModelEmaV3(model, decay=0.999)
    if bf16:
        timm_ema.module.float()  # keep the EMA in fp32, as a bf16 EMA with decay 0.999 rounds updates away
    fns["timm ModelEmaV3 (foreach)"] = lambda: timm_ema.update(model)

    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    if bf16:
        averaged.module.float()
    fns["torch AveragedModel + multi_avg_fn"] = lambda: averaged.update_parameters(model)

    # Lightning's EMAWeightAveraging keeps an AveragedModel with a per-tensor avg_fn; time that update.
    lightning_like = AveragedModel(model, avg_fn=get_ema_avg_fn(0.999), use_buffers=True)
    if bf16:
        lightning_like.module.float()
    fns["Lightning EMAWeightAveraging (AveragedModel)"] = lambda: lightning_like.update_parameters(model)

    for name in list(fns):
        try:  # a peer that cannot update at all is reported, not hidden
            fns[name]()
            fns[name]()  # AveragedModel's first call only copies
        except Exception as err:
            failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
            del fns[name]
    return fns, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for model_name in args.models:
        base = build(model_name).to(args.device)
        n = sum(p.numel() for p in base.parameters())
        for bf16 in (False, True):
            model = copy.deepcopy(base).to(torch.bfloat16) if bf16 else base
            fns, failures = candidates(model, bf16)
            medians = interleaved_medians(fns, repeats=args.repeats)
            kind = "bf16 model, fp32 EMA" if bf16 else "fp32"
            print_table(
                f"{model_name} ({n / 1e6:.1f}M params), {kind}", medians, "floor: one flat fp32 lerp_", failures
            )
            target = 1.5 if bf16 else 1.10
            ratio = medians["lightning-emascale EMAState.update"] / medians["floor: one flat fp32 lerp_"]
            print(
                f"lightning-emascale: {ratio:.2f}x the floor (target <= {target}x): {'OK' if ratio <= target else 'OVER'}"
            )


if __name__ == "__main__":
    main()
