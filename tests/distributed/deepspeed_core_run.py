"""Run by test_deepspeed.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): ScaledEMA on a DeepSpeed engine,
without Lightning. Rank 0 writes the results to OUT as a torch file.

``deepspeed_core_run.py OUT STAGE DTYPE [THRESHOLD]``: ZeRO STAGE (1, 2, 3), DTYPE ``fp32`` or ``bf16``, THRESHOLD the
ZeRO-3 ``stage3_param_persistence_threshold`` (0: every parameter partitioned; default DeepSpeed's 1e5, which keeps
this small model's parameters whole on every rank between steps).

The reference is kept in the same run, by hand: after every step the full weights (ZeRO-3: the gathered fp32
masters, ``safe_get_full_fp32_param``; ZeRO-1/2: the parameters, whole on every rank) are averaged with the same
momentum. Recorded: the EMA gathered from the ranks' pieces, the reference, and forwards inside and after swaps
(after a step, after a no-grad forward left parameters gathered) against forwards on the reference weights.
"""

from __future__ import annotations

import copy
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed_cpu import CPUDeepSpeedStrategy  # noqa: F401  # first: DeepSpeed on the CPU, without its op build

from lightning_emascale import ScaledEMA
from lightning_emascale._zero import gather_partitions

MOMENTUM, BASE, PER_RANK, STEPS = 0.8, 4, 4, 6


def net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    # 33 x 7 and 7: odd sizes, so ZeRO-3 pads the last rank's piece
    return torch.nn.Sequential(torch.nn.Linear(33, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    """The full training weights the EMA should average, by name (fp32)."""
    if stage == 3:
        return {name: safe_get_full_fp32_param(p).clone().float() for name, p in engine.module.named_parameters()}
    return {name: p.detach().clone().float() for name, p in engine.module.named_parameters()}


def gathered_ema(ema: ScaledEMA) -> dict[str, torch.Tensor]:
    """Every rank's EMA pieces, put back together on every rank."""
    state = ema.state_dict()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {name: t.clone() for name, t in state["ema"].items()})
    layout = state.get("zero3_partitions")
    return gather_partitions(everyone, layout["shapes"] if layout else {})


def forward_on(weights: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    plain = net().to(dtype)
    plain.load_state_dict({name: t.to(dtype) for name, t in weights.items()})
    with torch.no_grad():
        return plain(x.to(dtype)).float()


def main() -> None:
    out, stage, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    threshold = int(sys.argv[4]) if len(sys.argv) > 4 else 100_000
    bf16 = dtype_name == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": threshold},
        "bf16": {"enabled": bf16},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    ema = ScaledEMA(
        engine, engine.optimizer, momentum=MOMENTUM, base_batch_size=BASE, optimizer_rule="sgd", auto_end_step=False
    )
    reference = full_weights(engine, stage)
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randn(PER_RANK * world, 33, generator=generator) for _ in range(STEPS)]
    probe = torch.randn(5, 33, generator=generator)
    lrs, kappas = [], []
    for step, batch in enumerate(batches):
        x = batch[rank * PER_RANK : (rank + 1) * PER_RANK].to(dtype)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        ema.count_samples(PER_RANK * world)
        engine.step()
        ema.end_step()
        lrs.append(ema.step_lrs[0][0])
        kappas.append(ema.kappa)
        momentum = MOMENTUM ** (PER_RANK * world / BASE)
        for name, value in full_weights(engine, stage).items():
            reference[name].lerp_(value, 1 - momentum)
        if step == 2:  # a swap right after a step: the next forward must see the EMA, the one after the raw weights
            raw_before = engine(probe.to(dtype)).float().detach()
            with ema.swapped():
                swapped_after_step = engine(probe.to(dtype)).float().detach()
            raw_after_step = engine(probe.to(dtype)).float().detach()
            expected_after_step = forward_on(reference, probe, dtype)
    # a no-grad forward first (persistent parameters stay gathered), then the swap
    with torch.no_grad():
        raw_out = engine(probe.to(dtype)).float()
    weights_before = full_weights(engine, stage)
    with ema.swapped():
        with torch.no_grad():
            swapped_out = engine(probe.to(dtype)).float()
    with torch.no_grad():
        raw_again = engine(probe.to(dtype)).float()
    weights_after = full_weights(engine, stage)
    # one more step after the swap: it must train the raw weights (compared with the same step in a copy)
    ema_full = gathered_ema(ema)
    pieces = {name: t.clone() for name, t in ema.state_dict()["ema"].items()}
    state = copy.deepcopy(ema.state_dict())
    ema.load_state_dict(state)  # a per-rank round trip
    reloaded = {name: t.clone() for name, t in ema.state_dict()["ema"].items()}
    full_state = {key: value for key, value in state.items() if key != "zero3_partitions"}
    full_state["ema"] = {name: t.to(state["ema"][name].dtype) for name, t in ema_full.items()}
    ema.load_state_dict(full_state)  # a consolidated (full) EMA, cut into this rank's pieces
    from_full = {name: t.clone() for name, t in ema.state_dict()["ema"].items()}
    # skip_non_finite: a NaN in one rank's ZeRO-3 piece skips the update on every rank (ZeRO-1/2: the weights are
    # whole on every rank, so a NaN is in every rank's copy)
    guarded = ScaledEMA(engine, None, momentum=0.5, base_batch_size=BASE, skip_non_finite=True, auto_end_step=False)
    guarded_before = {name: t.clone() for name, t in guarded.ema_state_dict().items()}
    if rank == 1 or stage != 3:
        with torch.no_grad():
            guarded.averager.tracked[0].view(-1)[0] = float("nan")
    guarded.count_samples(PER_RANK * world)
    guarded.end_step()
    skipped = [None] * world
    dist.all_gather_object(skipped, guarded.skipped_updates)
    kept = all(torch.equal(guarded_before[n], t) for n, t in guarded.ema_state_dict().items())
    if rank == 0:
        torch.save(
            {
                "ema": ema_full,
                "reference": reference,
                "lrs": lrs,
                "kappas": kappas,
                "swapped_after_step": swapped_after_step,
                "expected_after_step": expected_after_step,
                "raw_before": raw_before,
                "raw_after_step": raw_after_step,
                "swapped": swapped_out,
                "expected_swapped": forward_on(reference, probe, dtype),
                "raw": raw_out,
                "raw_again": raw_again,
                "weights_before": weights_before,
                "weights_after": weights_after,
                "piece_numel": sum(t.numel() for t in pieces.values()),
                "full_numel": sum(t.numel() for t in ema_full.values()),
                "reload_equal": all(torch.equal(pieces[n], reloaded[n]) for n in pieces),
                "full_reload_equal": all(torch.equal(pieces[n], from_full[n]) for n in pieces),
                "skipped": skipped,
                "kept_on_rank0": kept,
                "ema_dtypes": sorted({str(t.dtype) for t in pieces.values()}),
            },
            out,
        )
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo's threads otherwise abort the interpreter now and then


if __name__ == "__main__":
    main()
