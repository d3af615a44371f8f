"""Extra wall time per training step that the callback adds to a Lightning fit, next to the floor and peers.

    python benchmarks/overhead.py [--rounds 5] [--steps 30]

A ~21M-parameter MLP, batch 16, SGD. Two measurements:

1. **In process, per step** (what the targets are judged on): the time spent inside EMAScalingCallback's hooks
   and the optimizer step hooks it registers, split into the EMA update itself and the rest (bookkeeping: κ,
   the rule, the clock, logging every ``log_every_n_steps``). Targets: the update <= 1.05x the floor, the
   bookkeeping <= 0.05x the floor (median step; the mean includes the logging steps).
2. **A plain PyTorch loop** with ``ScaledEMA`` (the Fabric path is the same object): the same split, per step.
3. **Whole fits A/B** (context): fits with no EMA, with EMAScalingCallback, Lightning's EMAWeightAveraging and
   timm's ModelEmaV3 alternated round-robin; each step timed from one ``on_train_batch_start`` to the next. On a
   noisy 2-core CPU this difference cannot resolve a few milliseconds (it can come out negative).

Floor: one flat fp32 ``lerp_`` over the same number of elements.
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


def time_scaled_ema(ema, spent: dict[str, float]) -> None:
    """Re-register ``ema``'s optimizer hooks and wrap its EMA update so that their time adds up in ``spent``
    (keys "hook" and "update")."""

    def timed(fn, kind: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[kind] += time.perf_counter() - start

        return wrapper

    ema.averager.update = timed(ema.averager.update, "update")
    steps = ema._steps  # the optimizers it follows: hooked again with the same hooks, timed
    optimizers = steps.optimizers
    steps.unhook(ema)
    steps.hook(optimizers, ema, timed(ema._before_optimizer_step, "hook"), timed(ema._after_optimizer_step, "hook"))


class TimedEMA(EMAScalingCallback):
    """EMAScalingCallback whose hooks, optimizer hooks and EMA update are timed in process, per optimizer step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hooks: list[float] = []  # per step: every hook of this callback and its optimizer hooks
        self.updates: list[float] = []  # per step: the EMA update alone
        self._spent = {"hook": 0.0, "update": 0.0}

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        time_scaled_ema(self.scaled_ema, self._spent)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._spent["hook"] += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._spent["hook"] += time.perf_counter() - start  # includes the update, subtracted below
        self.hooks.append(self._spent["hook"])
        self.updates.append(self._spent["update"])
        self._spent["hook"] = self._spent["update"] = 0.0


def plain_loop(steps: int, rounds: int, data: DataLoader) -> tuple[list[float], list[float]]:
    """ScaledEMA in a hand-written loop: per step, count_samples + the optimizer hooks (all), and the update."""
    from lightning_emascale import ScaledEMA

    totals, updates = [], []
    for _ in range(rounds):
        torch.manual_seed(0)
        model = MLP().net
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        ema = ScaledEMA(model, optimizer, momentum=0.999, optimizer_rule="sgd")
        spent = {"hook": 0.0, "update": 0.0}
        time_scaled_ema(ema, spent)
        for index, (x, y) in enumerate(data):
            if index == steps:
                break
            torch.nn.functional.cross_entropy(model(x), y).backward()
            start = time.perf_counter()
            ema.count_samples(len(x))
            spent["hook"] += time.perf_counter() - start
            optimizer.step()
            optimizer.zero_grad()
            if index >= 2:
                totals.append(spent["hook"])
                updates.append(spent["update"])
            spent["hook"] = spent["update"] = 0.0
    return totals, updates


def in_process(steps: int, rounds: int, data: DataLoader) -> tuple[list[float], list[float]]:
    hooks, updates = [], []
    for _ in range(rounds):
        timed = TimedEMA(momentum=0.999, optimizer_rule="sgd")
        fit_steps(lambda timed=timed: [timed], steps, data)
        hooks += timed.hooks[2:]
        updates += timed.updates[2:]
    return hooks, updates


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
    hooks, updates = in_process(args.steps, args.rounds, data)
    bookkeeping = [hook - update for hook, update in zip(hooks, updates)]
    print(f"torch {torch.__version__}, {n / 1e6:.1f}M parameters, batch 16, threads {torch.get_num_threads()}")
    print(f"floor (one flat fp32 lerp_ over {n} elements): {floor * 1e3:.2f} ms")
    print(f"\n1. in process, {len(hooks)} steps (log_every_n_steps=10)")
    print(f"{'per step':<40} {'median ms':>10} {'mean ms':>9} {'median / floor':>15}")
    rows = {"EMA update": updates, "bookkeeping (hooks minus update)": bookkeeping, "all of the callback": hooks}
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:<40} {median * 1e3:>10.3f} {statistics.mean(values) * 1e3:>9.3f} {median / floor:>15.3f}")
    update_ratio = statistics.median(updates) / floor
    book_ratio = statistics.median(bookkeeping) / floor
    print(
        f"update {update_ratio:.2f}x the floor (target <= 1.05x): {'OK' if update_ratio <= 1.05 else 'OVER'};"
        f" bookkeeping {book_ratio:.3f}x (target <= 0.05x): {'OK' if book_ratio <= 0.05 else 'OVER'}"
    )
    totals, plain_updates = plain_loop(args.steps, args.rounds, data)
    print(f"\n2. a plain loop with ScaledEMA, {len(totals)} steps")
    print(f"{'per step':<40} {'median ms':>10} {'mean ms':>9} {'median / floor':>15}")
    plain_rows = {
        "EMA update": plain_updates,
        "bookkeeping (hooks minus update)": [t - u for t, u in zip(totals, plain_updates)],
        "all of ScaledEMA": totals,
    }
    for name, values in plain_rows.items():
        median = statistics.median(values)
        print(f"{name:<40} {median * 1e3:>10.3f} {statistics.mean(values) * 1e3:>9.3f} {median / floor:>15.3f}")
    base = statistics.median(times["no EMA"])
    print(f"\n3. whole fits A/B: step without EMA {base * 1e3:.2f} ms (median of {len(times['no EMA'])} steps)")
    print(f"{'configuration':<40} {'step ms':>9} {'extra ms':>9} {'extra / floor':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {median * 1e3:>9.2f} {(median - base) * 1e3:>9.2f} {(median - base) / floor:>14.2f}")


if __name__ == "__main__":
    main()
