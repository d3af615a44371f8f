"""Run by test_ddp.py in a subprocess: ScaledEMA in a Lightning Fabric loop on 2 CPU processes (gloo DDP).

Asserts on every rank, inside the loop, that kappa counts both ranks, and at the end that the EMA equals the
single-process reference computed from the recorded weights and that both ranks hold the same EMA.
"""

import sys
from types import SimpleNamespace

import lightning as L
import torch
from helpers import TinyModel, reference_ema
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import ScaledEMA

ACCUMULATE = 2


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}


def main(out_path: str) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    L.seed_everything(0)
    model = TinyModel(n_samples=24, batch_size=3)
    initial = snapshot(model)
    wrapped, optimizer = fabric.setup(model, model.configure_optimizers())
    data = fabric.setup_dataloaders(DataLoader(TensorDataset(model.x, model.y), batch_size=3))
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=6, optimizer_rule="sgd")
    steps = SimpleNamespace(weights=[], batch_sizes=[])
    kappas = []
    for _ in range(2):
        for index, (x, y) in enumerate(data):
            stepping = (index + 1) % ACCUMULATE == 0 or index + 1 == len(data)
            with fabric.no_backward_sync(wrapped, enabled=not stepping):
                fabric.backward(torch.nn.functional.mse_loss(wrapped(x), y) / ACCUMULATE)
            ema.count_samples(len(x) * fabric.world_size)
            if stepping:
                optimizer.step()
                optimizer.zero_grad()
                assert optimizer.param_groups[0]["lr"] == 0.1  # unscaled outside the step
                kappas.append(ema.kappa)
                steps.weights.append(snapshot(model))
                steps.batch_sizes.append(ema.global_batch_size)
    # per rank: 12 samples per epoch in micro-batches of 3, 2 accumulated: global 2 x 3 x 2 = 12 = 2 x base 6
    assert kappas == [2.0] * 4, kappas
    expected = reference_ema(initial, steps, 0.9, 6)
    errors = {
        name: (value.double() - expected[name]).abs().max().item() for name, value in ema.ema_state_dict().items()
    }
    assert max(errors.values()) < 1e-6, errors
    weight = ema.ema_state_dict()["net.0.weight"]
    gathered = fabric.all_gather(weight)
    assert torch.equal(gathered[0], gathered[1])  # every rank holds the same EMA
    if fabric.global_rank == 0:
        torch.save(
            {"kappas": kappas, "samples_seen": ema.samples_seen, "steps": ema.optimizer_steps, "errors": errors},
            out_path,
        )
    fabric.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: gloo can abort at shutdown with a live group


if __name__ == "__main__":
    main(sys.argv[1])
