"""The Adam rule with a Polyak EMA: an MLP-Mixer trained with AdamW at kappa x the base batch, arm by arm, paired seeds.

    python examples/studies/adam_rule.py [--base-batch 32] [--kappas 2,4,8] [--seeds 3] [--epochs 10]
        [--train-samples 4096] [--momentum 0.99] [--lr 2e-3] [--out-dir adam_rule] [--cifar10 ROOT]

A seed fixes the generated data, the initial weights and the data order of every arm. Per seed:

* ``base``: batch B, AdamW (lr, betas (0.9, 0.999), eps 1e-8, weight decay 0.05), EMA momentum rho;
* ``floor``: the base again with another data order: how far two equivalent runs drift apart;

and at every kappa, batch K x B through ``EMAScalingCallback(base_batch_size=B)`` with:

* ``full rule``: ``optimizer_rule="adam"`` (lr x sqrt(K), 1 - beta x K, eps / sqrt(K), decoupled weight decay
  x sqrt(K)) and rho^K;
* ``no EMA rule``: the Adam rule, but the EMA keeps rho per step (``momentum=rho^(1/K)``, which the callback
  raises to the K-th power): isolates the EMA rule;
* ``no optimizer rule``: rho^K, AdamW unchanged;
* ``linear LR``: rho^K and lr x K with the betas and eps unchanged (the SGD rule applied to Adam);
* ``no rule``: AdamW and rho unchanged (what a tool that ignores the batch size does).

All schedules run on samples seen (``SampleClockLR``: warm-up over 10 %, cosine to 0). At the start and after
every epoch it records the EMA's and the raw model's validation cross-entropy and accuracy. An arm's **gap** to
the base on seed s is the mean over records of |CE(arm) - CE(base)|, for the EMA and for the raw model; the
**noise floor** F is the mean over seeds of the floor run's gap. Decided before running: an arm is *kept* if its
mean gap is at most 1.5 F, *separated* if it exceeds 3 F, else *inconclusive*. Prints the table and writes
``adam_rule.png`` and ``results.json`` to ``--out-dir``. The images are generated (ten noisy shifted colour
patterns, 20 % of the training labels replaced at random) unless ``--cifar10`` points to CIFAR-10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

# examples/ on the path, so that `python examples/studies/adam_rule.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from emascale_examples.data import pattern_images
from emascale_examples.paired import floor_summary, gap_summary, mean_gap
from emascale_examples.study import (
    add_data_arguments,
    check_train_samples,
    ema_and_raw_outputs,
    kappa_sweep_parser,
    save_figure,
    write_results,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, OptimizerRule, SampleClockLR, WarmupCosine

ARMS = ("full rule", "no EMA rule", "no optimizer rule", "linear LR", "no rule")


class LinearLR(OptimizerRule):
    """The SGD rule applied to AdamW: lr x kappa, betas and eps unchanged (a common mistake)."""

    optimizer_types = (torch.optim.AdamW,)

    def scale(self, group: dict, kappa: float) -> dict:
        return {"lr": group["lr"] * kappa}


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class Mixer(L.LightningModule):
    """An MLP-Mixer for 32x32 images: 8x8 patches (16 tokens), width 64, ``depth`` blocks, AdamW."""

    def __init__(self, lr: float, depth: int = 2, dim: int = 64, patch: int = 8) -> None:
        super().__init__()
        self.lr, self.patch = lr, patch
        tokens = (32 // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(2)
        return self.head(self.norm(self.blocks(self.embed(patches))).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.999), weight_decay=0.05)
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Probe(L.Callback):
    """At the start and after every epoch: samples seen, the EMA's and the raw model's validation CE and accuracy."""

    def __init__(self, ema: EMAScalingCallback, val: TensorDataset) -> None:
        self.ema, self.val = ema, val
        keys = ("samples", "ema_ce", "raw_ce", "ema_acc", "raw_acc", "step_lr")
        self.records: dict[str, list[float]] = {key: [] for key in keys}

    @torch.no_grad()
    def record(self, pl_module: L.LightningModule) -> None:
        x, y = self.val.tensors
        ema, raw = ema_and_raw_outputs(self.ema, pl_module, x)
        self.records["samples"].append(self.ema.samples_seen)
        lrs = self.ema.scaled_ema.step_lrs if self.ema.samples_seen else [[0.0]]
        self.records["step_lr"].append(lrs[0][0])  # the LR the last step used (the rule's scaling included)
        for name, logits in (("ema", ema), ("raw", raw)):
            self.records[f"{name}_ce"].append(float(nn.functional.cross_entropy(logits, y)))
            self.records[f"{name}_acc"].append(float((logits.argmax(1) == y).float().mean()))

    def on_train_start(self, trainer, pl_module):
        self.record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.record(pl_module)


def seeded_data(seed: int, n_train: int, n_val: int, label_noise: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """The generated patterns of the supervised study, drawn from ``seed``, 20 % of the train labels random."""
    x, y = pattern_images(n_train, noise=1.25, seed=100 + 10 * seed)
    generator = torch.Generator().manual_seed(101 + 10 * seed)
    flip = torch.rand(n_train, generator=generator) < label_noise
    y = torch.where(flip, torch.randint(0, 10, (n_train,), generator=generator), y)
    val_x, val_y = pattern_images(n_val, noise=1.25, seed=102 + 10 * seed)
    return TensorDataset(x, y), TensorDataset(val_x, val_y)


def cifar10(root: str, n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:  # pragma: no cover
    import torchvision

    def load(train: bool, n: int) -> TensorDataset:
        data = torchvision.datasets.CIFAR10(root, train=train, download=True)
        x = torch.tensor(data.data[:n]).permute(0, 3, 1, 2).float().div(255)
        return TensorDataset(x, torch.tensor(data.targets[:n]))

    return load(True, n_train), load(False, n_val)


def arm_options(arm: str, kappa: int, momentum: float) -> dict[str, Any]:
    """The callback's options for ``arm`` at ``kappa`` (the base batch is always the base run's)."""
    keep_rho = momentum ** (1 / kappa)  # raised to the kappa-th power by the callback: rho per step, unchanged
    return {
        "full rule": {"optimizer_rule": "adam", "momentum": momentum},
        "no EMA rule": {"optimizer_rule": "adam", "momentum": keep_rho},
        "no optimizer rule": {"optimizer_rule": None, "momentum": momentum},
        "linear LR": {"optimizer_rule": LinearLR(), "momentum": momentum},
        "no rule": {"optimizer_rule": None, "momentum": keep_rho},
    }[arm]


def fit(
    arm: str, data: tuple[TensorDataset, TensorDataset], args: argparse.Namespace, seed: int, kappa: int = 1
) -> dict:
    train, val = data
    options = arm_options(arm, kappa, args.momentum) if kappa > 1 else {"momentum": args.momentum}
    torch.manual_seed(seed)  # the same initial weights in every arm of a seed
    model = Mixer(lr=args.lr)
    ema = EMAScalingCallback(base_batch_size=args.base_batch, evaluate_with_ema=False, **options)
    probe = Probe(ema, val)
    order = seed + (1000 if arm == "floor" else 0)
    loader = DataLoader(
        train, batch_size=kappa * args.base_batch, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(order),
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[ema, probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    records = probe.records
    print(
        f"seed {seed} {arm:>18} kappa {kappa}: {ema.optimizer_steps:>4} steps, rho-hat {ema.ema_momentum:.5f},"
        f" EMA CE {records['ema_ce'][-1]:.4f},"
        f" peak EMA acc {max(records['ema_acc']):.4f}",
        flush=True,
    )
    return {"arm": arm, "kappa": kappa, "seed": seed, "rho_hat": ema.ema_momentum, **records}


def summarize(runs: list[dict], kappas: list[int], seeds: int) -> dict:
    """Per kappa and arm: the paired gaps (EMA and raw CE) over seeds, against the floor F, and the verdict."""
    base = {run["seed"]: run for run in runs if run["arm"] == "base"}
    floor_runs = {run["seed"]: run for run in runs if run["arm"] == "floor"}
    summary: dict[str, Any] = {"floor": {}, "floor_interval": {}}
    for key in ("ema_ce", "raw_ce"):
        interval = floor_summary([mean_gap(floor_runs[s], base[s], key) for s in range(seeds)])
        summary["floor"][key], summary["floor_interval"][key] = interval["mean"], interval
    summary["base_peak_ema_acc"] = statistics.fmean(max(base[s]["ema_acc"]) for s in range(seeds))
    summary["arms"] = []
    for kappa in kappas:
        for arm in ARMS:
            cell: dict[str, Any] = {"kappa": kappa, "arm": arm}
            chosen = [run for run in runs if run["arm"] == arm and run["kappa"] == kappa]
            for key in ("ema_ce", "raw_ce"):
                gaps = [mean_gap(run, base[run["seed"]], key) for run in chosen]
                interval = summary["floor_interval"][key]
                cell[key] = gap_summary(gaps, interval["mean"], (interval["min"], interval["max"]))

            cell["peak_ema_acc"] = statistics.fmean(max(run["ema_acc"]) for run in chosen)
            cell["rho_hat"] = chosen[0]["rho_hat"]
            summary["arms"].append(cell)
    return summary


def plot(runs: list[dict], kappas: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kappas), figsize=(5 * len(kappas), 4), sharey=True, squeeze=False)
    for axis, kappa in zip(axes[0], kappas):
        for run in runs:
            if run["seed"] != 0:
                continue
            if run["kappa"] == 1:
                style = {"color": "k", "ls": "-" if run["arm"] == "base" else ":", "lw": 1.5}
            elif run["kappa"] == kappa:
                style = {"color": f"C{ARMS.index(run['arm'])}", "ls": "-", "lw": 1.2}
            else:
                continue
            axis.plot(run["samples"], run["ema_ce"], label=run["arm"], **style)
        axis.set_title(f"kappa {kappa} (seed 0)")
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("EMA validation cross-entropy")
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, path, title)


def main() -> None:
    parser = kappa_sweep_parser(__doc__, epochs=10, lr=2e-3, out_dir="adam_rule")
    parser.add_argument("--seeds", type=int, default=3)
    add_data_arguments(parser, fashion_mnist=False)
    args = parser.parse_args()
    check_train_samples(parser, args)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        if args.cifar10:
            data = cifar10(args.cifar10, args.train_samples, args.val_samples)
        else:
            data = seeded_data(seed, args.train_samples, args.val_samples)
        runs += [fit("base", data, args, seed), fit("floor", data, args, seed)]
        for kappa in args.kappas:
            runs += [fit(arm, data, args, seed, kappa) for arm in ARMS]
    summary = summarize(runs, args.kappas, args.seeds)

    floor = summary["floor_interval"]
    print(
        f"\nNoise floor F (mean over {args.seeds} seeds of |floor - base|, averaged over the records; the per-seed"
        f" range): EMA CE {floor['ema_ce']['mean']:.4f} ({floor['ema_ce']['min']:.4f}-{floor['ema_ce']['max']:.4f}),"
        f" raw CE {floor['raw_ce']['mean']:.4f} ({floor['raw_ce']['min']:.4f}-{floor['raw_ce']['max']:.4f}); base"
        f" peak EMA accuracy {summary['base_peak_ema_acc']:.4f}. Kept: gap <= 1.5 F; separated: gap > 3 F; '!': the"
        " verdict changes within F's range."
    )
    header = ("kappa", "arm", "rho-hat", "EMA CE gap", "(min-max)", "/F", "verdict", "raw CE gap", "/F", "verdict",
              "peak EMA acc")  # fmt: skip
    print("{:>5} {:>18} {:>8} {:>10} {:>15} {:>6} {:>12} {:>10} {:>6} {:>12} {:>12}".format(*header))
    for cell in summary["arms"]:
        ema, raw = cell["ema_ce"], cell["raw_ce"]
        spread = f"{ema['min']:.4f}-{ema['max']:.4f}"
        print(
            f"{cell['kappa']:>5} {cell['arm']:>18} {cell['rho_hat']:>8.5f} {ema['mean']:>10.4f} {spread:>15}"
            f" {ema['over_floor']:>6.1f} {ema['verdict'] + ('' if ema['robust'] else '!'):>12} {raw['mean']:>10.4f}"
            f" {raw['over_floor']:>6.1f} {raw['verdict'] + ('' if raw['robust'] else '!'):>12}"
            f" {cell['peak_ema_acc']:>12.4f}"
        )
    data_name = "CIFAR-10" if args.cifar10 else "generated patterns"
    title = f"MLP-Mixer + AdamW on {data_name}: Polyak EMA, base batch {args.base_batch}, rho {args.momentum}"
    plot(runs, args.kappas, args.out_dir / "adam_rule.png", title)
    write_results(args, "adam_rule.png", summary=summary, runs=runs)


if __name__ == "__main__":
    main()
