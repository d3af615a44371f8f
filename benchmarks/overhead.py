"""Extra wall time per training step that the callback adds to a Lightning fit, next to the floor and peers.

    python benchmarks/overhead.py [--rounds 5] [--steps 30]

A ~21M-parameter MLP, batch 16, SGD. Fits with no EMA, with EMAScalingCallback, with Lightning's
EMAWeightAveraging and with timm's ModelEmaV3 driven by a minimal callback are alternated round-robin in one
process; each step is timed from one ``on_train_batch_start`` to the next (so every hook is included), and the
median over all rounds is taken. The extra time is the difference to the no-EMA fit. Floor: one flat fp32
``lerp_`` over the same number of elements. Target: extra time per step <= 1.15x the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians

from lightning_emascale import EMAScalingCallback


class MLP(L.LightningModule):
    def __init__(self, width: int = 2560, depth: int = 4) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(256, width), torch.nn.ReLU()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class TimmEMA(L.Callback):
    """The minimal way to drive timm's ModelEmaV3 from Lightning, for comparison."""

    def on_fit_start(self, trainer, pl_module):
        from timm.utils.model_ema import ModelEmaV3

        self.ema = ModelEmaV3(pl_module, decay=0.999)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ema.update(pl_module)


def fit_steps(make_callbacks, steps: int, data: DataLoader) -> list[float]:
    timer = StepTimer()
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[timer, *make_callbacks()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(MLP(), data)
    return timer.times[2:]  # drop the first steps (allocation, warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    data = DataLoader(
        TensorDataset(torch.randn(16 * (args.steps + 1), 256), torch.randint(0, 10, (16 * (args.steps + 1),))),
        batch_size=16,
    )
    n = sum(p.numel() for p in MLP().parameters())
    configs = {
        "no EMA": lambda: [],
        "lightning-emascale EMAScalingCallback": lambda: [EMAScalingCallback(momentum=0.999, optimizer_rule="sgd")],
        "Lightning EMAWeightAveraging": lambda: [L.pytorch.callbacks.EMAWeightAveraging(decay=0.999)],
    }
    try:
        import timm  # noqa: F401

        configs["timm ModelEmaV3 in a callback"] = lambda: [TimmEMA()]
    except ImportError:
        print("timm not installed (pip install -e '.[bench]'): skipping that peer")
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, make in configs.items():
            times[name] += fit_steps(make, args.steps, data)
    flat, flat_ema = torch.randn(n), torch.randn(n)
    floor = interleaved_medians({"floor": lambda: flat_ema.lerp_(flat, 1e-3)}, repeats=50)["floor"]
    base = statistics.median(times["no EMA"])
    print(f"torch {torch.__version__}, {n / 1e6:.1f}M parameters, batch 16, threads {torch.get_num_threads()}")
    print(f"floor (one flat fp32 lerp_ over {n} elements): {floor * 1e3:.2f} ms")
    print(f"step without EMA: {base * 1e3:.2f} ms (median of {len(times['no EMA'])} steps)")
    print(f"{'configuration':<40} {'step ms':>9} {'extra ms':>9} {'extra / floor':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {median * 1e3:>9.2f} {(median - base) * 1e3:>9.2f} {(median - base) / floor:>14.2f}")
    ours = (statistics.median(times["lightning-emascale EMAScalingCallback"]) - base) / floor
    print(
        f"lightning-emascale extra per step: {ours:.2f}x the floor (target <= 1.15x): {'OK' if ours <= 1.15 else 'OVER'}"
    )


if __name__ == "__main__":
    main()
