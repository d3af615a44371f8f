"""A model EMA in a plain DeepSpeed loop (no Lightning): ZeRO-3, each rank averaging its own partition.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py            # 2 CPU processes (gloo)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero.py --stage 2  # ZeRO-2: a whole EMA
    deepspeed --num_gpus 4 examples/deepspeed_zero.py --bf16                              # on GPUs

An MLP classifier on generated data, trained with SGD under ``deepspeed.initialize`` (ZeRO stage ``--stage``,
``--accumulate`` micro-batches per optimizer step). :class:`~lightning_emascale.ScaledEMA` gets the engine and its
optimizer; the loop counts each micro-batch's global samples and calls ``end_step()`` after every ``engine.step()``
that ends an accumulation window, so κ counts ranks × micro-batch × accumulation. Under ZeRO-3 each rank averages
its partition of the fp32 masters (no communication per step); ``ema.swapped()`` evaluates on the EMA. The EMA's
state goes into DeepSpeed's checkpoint as client state (every rank its own pieces), and rank 0 consolidates the
directory into one file whose ``state_dict`` is the whole EMA.

Prints, from rank 0: κ and ρ̂ of the last step, the EMA's memory on each rank against the full model's, the
accuracy of the training weights and of the EMA, and that the consolidated EMA gives the same accuracy on one
process. On CPU, DeepSpeed builds a shared-memory collective op the first time (about 2 minutes with g++ and ninja).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from emascale_examples.data import synthetic

from lightning_emascale import ScaledEMA, consolidate_deepspeed_checkpoint


def classifier(dim: int = 16, width: int = 256, classes: int = 10) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, classes),
    )  # fmt: skip


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> float:
    with torch.no_grad():
        return float((model(x.to(dtype)).argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per rank")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--out", default="deepspeed_ema")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    x_all, y_all = synthetic(args.samples, dim=16).tensors
    split = int(0.9 * len(x_all))  # 90% to train, 10% to validate
    model = classifier()
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.accumulate,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,  # a torch optimizer given to DeepSpeed
        "bf16": {"enabled": args.bf16},
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = engine.device
    # base batch: one rank's micro-batch, no accumulation; here kappa = ranks x accumulation
    ema = ScaledEMA(
        engine, engine.optimizer, momentum=0.99, base_batch_size=args.batch_size, optimizer_rule="sgd",
        auto_end_step=False,  # DeepSpeed copies the step into the parameters after its optimizer's step
    )  # fmt: skip

    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        order = torch.randperm(split, generator=generator)
        per_step = args.batch_size * world
        for start in range(0, len(order) - per_step + 1, per_step):
            mine = order[start + rank * args.batch_size : start + (rank + 1) * args.batch_size]
            x, y = x_all[mine].to(device, dtype), y_all[mine].to(device)
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            ema.count_samples(len(mine) * world)  # every rank's micro-batch: the global samples
            ends_window = engine.is_gradient_accumulation_boundary()
            engine.step()
            if ends_window:
                ema.end_step()

    xv, yv = x_all[split:].to(device), y_all[split:].to(device)
    raw = accuracy(engine, xv, yv, dtype)
    with ema.swapped():
        averaged = accuracy(engine, xv, yv, dtype)
    ema_bytes = sum(a.numel() * a.element_size() for a in ema.ema_state_dict().values())
    sizes = [None] * world
    dist.all_gather_object(sizes, ema_bytes)
    engine.save_checkpoint(args.out, tag="last", client_state={"ema": ema.state_dict()})  # every rank its pieces
    dist.barrier()
    if rank == 0:
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) * 4
        print(f"last step: global batch {ema.global_batch_size}, kappa {ema.kappa:g}, rho-hat {ema.ema_momentum:.6f}")
        for index, size in enumerate(sizes):
            print(f"rank {index}: EMA {size / 2**10:.1f} KiB of the full fp32 model's {full / 2**10:.1f} KiB")
        print(f"validation accuracy: training weights {raw:.3f}, EMA {averaged:.3f}")
        consolidated = Path(args.out) / "consolidated.pt"
        checkpoint = consolidate_deepspeed_checkpoint(args.out, consolidated, tag="last")
        plain = classifier()
        plain.load_state_dict(checkpoint["state_dict"])  # the EMA (ema_as_weights=True)
        print(f"consolidated EMA on one process: accuracy {accuracy(plain, xv.cpu(), yv.cpu(), torch.float32):.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
