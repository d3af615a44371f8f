"""Run by test_deepspeed.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): teacher mode on a DeepSpeed ZeRO-3
engine without Lightning. Rank 0 writes the results to OUT.

``deepspeed_teacher_run.py OUT DTYPE THRESHOLD``: the teacher (a frozen copy of the student, in the same engine) is
moved partition by partition toward the student's fp32 masters. After every step, the teacher's forward is compared
with a plain model holding a reference teacher kept by hand from the gathered masters: the forward must see the
update (the engine's gathered copies are dropped after it).
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

MOMENTUM, BASE, PER_RANK, STEPS = 0.7, 4, 4, 5


def net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(21, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = net()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)  # gathers the teacher, as BYOL's target branch does
        return (self.student(x) - 0.5 * target - 1.0).float().square().mean()


def main() -> None:
    out, dtype_name, threshold = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = Pair()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.2)
    config = {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold},
        "bf16": {"enabled": dtype_name == "bf16"},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    ema = ScaledEMA(
        engine, engine.optimizer, momentum=MOMENTUM, base_batch_size=BASE, teachers={"student": "teacher"},
        auto_end_step=False,
    )  # fmt: skip
    # the teacher is kept in its own dtype: so is the reference, moved toward the masters cast to it
    reference = {name: safe_get_full_fp32_param(p).to(dtype) for name, p in engine.module.student.named_parameters()}
    initial = {name: value.clone() for name, value in reference.items()}
    generator = torch.Generator().manual_seed(3)
    probe = torch.randn(3, 21, generator=generator)
    gaps = []
    for _ in range(STEPS):
        batch = torch.randn(PER_RANK * world, 21, generator=generator)
        with torch.no_grad():
            engine.module.teacher(probe.to(dtype))  # leaves gathered copies where the threshold keeps them
        loss = engine(batch[rank * PER_RANK : (rank + 1) * PER_RANK].to(dtype))
        engine.backward(loss)
        ema.count_samples(PER_RANK * world)
        engine.step()
        ema.end_step()
        with torch.no_grad():  # right after the update, while the step's gathered copies would still be cached
            seen = engine.module.teacher(probe.to(dtype)).float()
        momentum = MOMENTUM ** (PER_RANK * world / BASE)
        for name, p in engine.module.student.named_parameters():
            reference[name].lerp_(safe_get_full_fp32_param(p).to(dtype), 1 - momentum)
        plain = net().to(dtype)
        plain.load_state_dict(reference)
        with torch.no_grad():
            gaps.append(float((seen - plain(probe.to(dtype)).float()).abs().max()))
    if rank == 0:
        moved = max(float((reference[name] - initial[name]).abs().max()) for name in reference)
        torch.save({"gaps": gaps, "kappa": ema.kappa, "updates": ema.ema_updates, "moved": moved}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
