"""What the BYOL and DINO studies (studies/byol_study.py, studies/dino_study.py) share: the self-supervised module
on the generated shapes or Fashion-MNIST (``--fashion-mnist``), the arms' teacher-momentum schedules, the probe that measures every run, one fit, and
the paired-seed summary.

An arm is a batch schedule (epoch -> global batch; κ = batch / B per step) and whether the EMA rule is applied.
Every arm keeps SGD's rule (lr x κ, by ``optimizer_rule="sgd"``); the *no EMA rule* arms keep the teacher's
momentum per step (the callback's schedule returns ρ(p)^(1/κ), which it raises to κ) and leave the loss centre's
momentum alone, so that they differ from the rule's arms in the momenta only.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from emascale_examples.paired import floor_summary, gap_summary, mean_gap
from emascale_examples.probes import embed, knn_accuracy, linear_cka, linear_probe, rankme
from emascale_examples.resnet import small_resnet
from emascale_examples.shapes import shape_images, view
from emascale_examples.study import (
    add_data_arguments,
    check_fashion_mnist_sizes,
    check_train_samples,
    kappa_sweep_parser,
    save_figure,
    write_results,
)
from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback, SampleClockLR, WarmupCosine


def backbone() -> torch.nn.Sequential:
    """The CIFAR-stem ResNet-8 of the supervised studies (3x3 stem, no pooling stem), without its classifier:
    64 features."""
    return torch.nn.Sequential(*list(small_resnet())[:-1])


class ShapeSSL(L.LightningModule):
    """A self-supervised module on generated shapes: SGD with momentum 0.9, warm-up and cosine on samples seen.

    ``online`` and ``teacher`` name its backbones; subclasses build the networks and the ``training_step``.
    ``batch_size`` is the first batch (``ProgressiveBatchCallback`` changes it); ``order`` seeds the data
    order (the augmentations draw from the global generator, seeded by ``fit_arm``).
    """

    online = "backbone"
    teacher = "backbone_momentum"
    teachers: ClassVar[dict[str, str]] = {}

    def __init__(self, images: torch.Tensor, size: int, batch_size: int, lr: float, order: int) -> None:
        super().__init__()
        self.images, self.size, self.batch_size, self.lr = images, size, batch_size, lr
        self.order = torch.Generator().manual_seed(order)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=self.batch_size, shuffle=True,
                          generator=self.order, drop_last=True)  # fmt: skip

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def momentum_attributes(self) -> dict[str, float]:
        """Other momenta the EMA rule scales (DINO: the loss centre's); none here."""
        return {}

    def extra_metrics(self, held_out: torch.Tensor) -> dict[str, float]:
        """Metrics of the teacher beyond the backbone's (DINO: its output entropies); none here."""
        return {}


def kappa_at(schedule: dict[int, int], epochs: int, base: int) -> Callable[[float], float]:
    """κ of the step that starts at ``progress`` (samples seen / total) under ``schedule``."""

    def kappa(progress: float) -> float:
        epoch = min(int(progress * epochs + 1e-6), epochs - 1)
        return schedule[max(e for e in schedule if e <= epoch)] / base

    return kappa


def teacher_schedule(
    momentum: Callable[[float], float], ema_rule: bool, schedule: dict[int, int], epochs: int, base: int
) -> Callable[[float], float]:
    """The callback's ``momentum_schedule``: ``momentum(progress)`` at the base batch, which the callback raises to
    κ; without the EMA rule, its κ-th root, so that the teacher moves by ``momentum(progress)`` per step."""
    if ema_rule:
        return momentum
    kappa = kappa_at(schedule, epochs, base)
    return lambda progress: momentum(progress) ** (1 / kappa(progress))


class Probe(L.Callback):
    """At the start and after every epoch: samples seen, the kNN accuracy (k = 20) of the online and teacher
    backbones (bank: the training images; queries: the held-out images), the teacher's RankMe on the held-out
    images and the module's ``extra_metrics``. At the end: both backbones' linear-probe accuracy and the teacher's
    held-out features (for CKA). The random state is put back after each measurement."""

    def __init__(self, ema: EMAScalingCallback, data: tuple[torch.Tensor, ...]) -> None:
        self.ema, (self.x, self.y, self.x_val, self.y_val) = ema, data
        self.records: dict[str, list[float]] = {}
        self.steps: list[dict[str, float]] = []  # per optimizer step: its global batch and the momenta it used
        self.final: dict[str, Any] = {}

    def _add(self, key: str, value: float) -> None:
        self.records.setdefault(key, []).append(value)

    def measure(self, module: ShapeSSL) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self._add("samples", self.ema.samples_seen)
            for role in ("online", "teacher"):
                net = module.get_submodule(getattr(module, role))
                bank, query = embed(net, self.x), embed(net, self.x_val)
                self._add(f"knn_{role}", knn_accuracy(bank, self.y, query, self.y_val))
            teacher_features = query  # the loop's last role
            self._add("rankme", rankme(teacher_features))
            for key, value in module.extra_metrics(self.x_val).items():
                self._add(key, value)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(pl_module)  # type: ignore[arg-type]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema.optimizer_steps > len(self.steps):  # the callback (listed first) has counted a step
            momenta = self.ema.momentum_attribute_values()
            self.steps.append({"batch": self.ema.global_batch_size, "rho_hat": self.ema.ema_momentum, **momenta})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(pl_module)  # type: ignore[arg-type]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for role in ("online", "teacher"):
            net = pl_module.get_submodule(getattr(pl_module, role))
            train, test = embed(net, self.x), embed(net, self.x_val)
            self.final[f"linear_{role}"] = linear_probe(train, self.y, test, self.y_val)
        self.final["features"] = test  # the teacher's, the last of the loop


def shapes_data(seed: int, size: int, n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    """The seed's training images and labels (the labels only score), and held-out images and labels."""
    x, y = shape_images(n_train, seed=2 * seed, size=size)
    x_val, y_val = shape_images(n_val, seed=2 * seed + 1, size=size)
    return x, y, x_val, y_val


def fashion_mnist_data(folder: str, seed: int, size: int, n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:
    """A seed's random subset of Fashion-MNIST's training images and of its test images, resized to ``size`` (area
    averaging) and repeated to three channels (the backbone's stem and the colour augmentations take RGB)."""
    from emascale_examples import fashion_mnist

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(images, size=(size, size), mode="area").expand(-1, 3, -1, -1).clone()

    x, y, _ = fashion_mnist.subset("train", n_train, seed, folder)
    x_val, y_val, _ = fashion_mnist.subset("test", n_val, seed, folder)
    return prepare(x), y, prepare(x_val), y_val


def study_data(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, ...]:
    """The seed's training and held-out images and labels: Fashion-MNIST, CIFAR-10 or the generated shapes."""
    if args.fashion_mnist:
        return fashion_mnist_data(args.fashion_mnist, seed, args.size, args.train_samples, args.val_samples)
    if args.cifar10:  # pragma: no cover - downloads
        return cifar10_data(args.cifar10, seed, args.train_samples, args.val_samples)
    return shapes_data(seed, args.size, args.train_samples, args.val_samples)


def cifar10_data(root: str, seed: int, n_train: int, n_val: int) -> tuple[torch.Tensor, ...]:  # pragma: no cover
    """A seed's random subset of CIFAR-10's training and test images (downloads it), as [0, 1] tensors."""
    import torchvision

    def subset(train: bool, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = torchvision.datasets.CIFAR10(root, train=train, download=True)
        index = torch.randperm(len(data.targets), generator=generator)[:n]
        images = torch.tensor(data.data)[index].permute(0, 3, 1, 2).float().div(255)
        return images, torch.tensor(data.targets)[index]

    generator = torch.Generator().manual_seed(seed)
    return (*subset(True, n_train, generator), *subset(False, n_val, generator))


@dataclass(frozen=True)
class Arm:
    """One run of a seed: its batch ``schedule`` (epoch -> global batch), κ for the tables, whether the EMA rule
    is applied, and for calibration runs another teacher ``momentum`` (of progress) or module options."""

    name: str
    kappa: int
    schedule: dict[int, int]
    ema_rule: bool = True
    momentum: Optional[Callable[[float], float]] = None
    module_options: dict[str, Any] = field(default_factory=dict)


def study_arguments(
    description: str, epochs: int, lr: float, momentum: float, out_dir: str, grow_at: int
) -> argparse.ArgumentParser:
    """The κ-sweep arguments (``kappa_sweep_parser``), the data arguments (``add_data_arguments``, 1024 held-out
    images) and the self-supervised studies' own: ``--seeds``, ``--size``, ``--grow-at`` and ``--pilot``."""
    parser = kappa_sweep_parser(description, epochs=epochs, lr=lr, out_dir=out_dir)
    add_data_arguments(parser)
    parser.set_defaults(momentum=momentum, val_samples=1024)
    parser.add_argument("--grow-at", type=int, default=grow_at, help="the epoch where the batch starts to grow")
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds (0: only the --pilot)")
    parser.add_argument("--size", type=int, default=16,
                        help="image side of the generated shapes, or the side Fashion-MNIST is resized to")  # fmt: skip
    parser.add_argument("--pilot", action="store_true", help="first measure untrained and supervised backbones")
    parser.add_argument("--every-growth", action="store_true",
                        help="at the largest kappa, every growth (from the start, a sharp jump at --grow-at, doubling"
                             " from --grow-at) both with and without the EMA rule")  # fmt: skip
    return parser


def check_study_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Whole batches in every arm; κ powers of two (the progressive arms double the batch)."""
    check_train_samples(parser, args)
    if any(k < 1 or k & (k - 1) for k in args.kappas):
        parser.error(f"--kappas must be powers of two (the progressive arm doubles the batch), got {args.kappas}")
    last = args.epochs - max(args.kappas).bit_length() + 1  # doubling every epoch from there reaches the largest
    if not 0 < args.grow_at <= last:
        parser.error(f"--grow-at must be an epoch in [1, {last}] (the progressive arm must reach the largest batch),"
                     f" got {args.grow_at}")  # fmt: skip
    if args.cifar10 and args.fashion_mnist:
        parser.error("--cifar10 and --fashion-mnist: choose one data set")
    check_fashion_mnist_sizes(parser, args)
    if args.cifar10:  # pragma: no cover
        args.size = 32


def run_study(args: argparse.Namespace, module_class: type[ShapeSSL], arms: list[Arm], metrics: tuple[str, ...],
              shared: int, momentum: Callable[[float], float], title: str, figure: str,
              **payload: Any) -> dict:  # fmt: skip
    """Every seed's base, floor and ``arms``; print the summary, plot seed 0 and write ``results.json``.

    ``momentum`` is the teacher's momentum at the base batch as a function of progress; ``shared`` the records
    (at the start and after each epoch) that a progressive or sharp arm shares with the base run; ``payload``
    goes into ``results.json`` too."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per run is enough
    runs, features = [], {}
    for seed in range(args.seeds):
        data = study_data(args, seed)
        base = {0: args.base_batch}
        for arm in [Arm("base", 1, base), Arm("floor", 1, base), *arms]:
            order = seed + (1000 if arm.name == "floor" else 0)  # the data order and the augmentations
            torch.manual_seed(seed)  # the initial weights
            module = module_class(data[0], args.size, arm.schedule[0], args.lr, order, **arm.module_options)
            teacher = teacher_schedule(
                arm.momentum or momentum, arm.ema_rule, arm.schedule, args.epochs, args.base_batch
            )
            options = {"momentum_schedule": teacher, "base_batch_size": args.base_batch, "optimizer_rule": "sgd",
                       "teachers": module.teachers,
                       "momentum_attributes": (arm.ema_rule and module.momentum_attributes) or None}  # fmt: skip
            start = time.perf_counter()
            ema, probe = fit_arm(module, data, arm.schedule, args.epochs, options, order)
            seconds = time.perf_counter() - start
            runs.append(run_record(arm.name, arm.kappa, seed, ema, probe, seconds))
            features[arm.name, arm.kappa, seed] = probe.final["features"]
            last = runs[-1]
            print(f"seed {seed} {arm.name:>22} kappa {arm.kappa}: {ema.optimizer_steps:>5} steps, {seconds:5.1f} s, "
                  + ", ".join(f"{key} {last[key][-1]:.4f}" for key in metrics)
                  + f", linear teacher {last['linear_teacher']:.4f}", flush=True)  # fmt: skip
    summary = summarize(runs, features, metrics, shared)
    print_summary(summary, metrics)
    plot(runs, metrics, args.out_dir / figure, f"{title}: base batch {args.base_batch}, seed 0 (x: samples seen)")
    write_results(args, figure, **payload, summary=summary, runs=runs)
    return summary


def fit_arm(
    module: ShapeSSL, data: tuple[torch.Tensor, ...], schedule: dict[int, int], epochs: int,
    ema_options: dict[str, Any], order: int,
) -> tuple[EMAScalingCallback, Probe]:  # fmt: skip
    """One run of ``module`` (built from the seed's initial weights), its augmentations drawn from ``order``, on
    the batch ``schedule``, with an ``EMAScalingCallback(**ema_options)`` teacher."""
    ema = EMAScalingCallback(**ema_options, total_samples=epochs * len(data[0]))
    probe = Probe(ema, data)
    callbacks = [ProgressiveBatchCallback(schedule), ema, probe] if len(schedule) > 1 else [ema, probe]
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
    )  # fmt: skip
    torch.manual_seed(order)  # the augmentations
    trainer.fit(module)
    assert ema.samples_seen == epochs * len(data[0]), (ema.samples_seen, epochs * len(data[0]))
    return ema, probe


def run_record(arm: str, kappa: int, seed: int, ema: EMAScalingCallback, probe: Probe, seconds: float) -> dict:
    """The JSON-ready record of one run (the features stay out; ``cka`` is added by ``summarize``)."""
    final = {key: value for key, value in probe.final.items() if key != "features"}
    return {"arm": arm, "kappa": kappa, "seed": seed, "optimizer_steps": ema.optimizer_steps, "seconds": seconds,
            **probe.records, **final, "steps_record": probe.steps}  # fmt: skip


def summarize(runs: list[dict], features: dict[tuple[str, int, int], torch.Tensor], metrics: tuple[str, ...],
              shared_records: int) -> dict:  # fmt: skip
    """Per arm and κ: the paired gaps to the base run (mean over records of |arm - base|) of each of ``metrics``
    against its floor F, over every record and over the records after the first ``shared_records`` (the *late*
    gap, which leaves out a progressive or sharp arm's prefix, the base run by construction: judge such an arm,
    marked ``shares_base_prefix``, by its late gap); the final linear probes and their paired gaps against the floor
    runs'; the CKA distance 1 - CKA of the teacher's held-out features to the base's, over the floor runs' (the mean
    over seeds of each, then the ratio).
    """
    base = {run["seed"]: run for run in runs if run["arm"] == "base"}

    def late(run: dict) -> dict:
        return {key: run[key][shared_records:] for key in ("samples", *metrics)}

    def floor(key: str, cut: Callable[[dict], dict]) -> dict:
        floors = [run for run in runs if run["arm"] == "floor"]
        return floor_summary([mean_gap(cut(run), cut(base[run["seed"]]), key) for run in floors])

    for run in runs:
        run["cka_distance"] = 1 - linear_cka(features[run["arm"], run["kappa"], run["seed"]],
                                             features["base", 1, run["seed"]])  # fmt: skip
    cka_floors = floor_summary([run["cka_distance"] for run in runs if run["arm"] == "floor"])
    cka_floor = cka_floors["mean"]
    floor_intervals = {key: floor(key, lambda run: run) for key in metrics}
    late_intervals = {key: floor(key, late) for key in metrics}
    probes = ("linear_online", "linear_teacher")
    probe_intervals = {
        key: floor_summary([abs(run[key] - base[run["seed"]][key]) for run in runs if run["arm"] == "floor"])
        for key in probes
    }
    floors = {key: value["mean"] for key, value in floor_intervals.items()}
    late_floors = {key: value["mean"] for key, value in late_intervals.items()}
    probe_floors = {key: value["mean"] for key, value in probe_intervals.items()}
    summary: dict[str, Any] = {"floor": floors, "late_floor": late_floors, "probe_floor": probe_floors,
                               "cka_floor": cka_floor, "floor_interval": floor_intervals,
                               "late_floor_interval": late_intervals, "probe_floor_interval": probe_intervals,
                               "cka_floor_interval": cka_floors, "arms": []}  # fmt: skip

    def interval(summaries: dict, key: str) -> tuple[float, float]:
        return summaries[key]["min"], summaries[key]["max"]
    for kappa, arm in dict.fromkeys((run["kappa"], run["arm"]) for run in runs):
        chosen = [run for run in runs if run["arm"] == arm and run["kappa"] == kappa]
        cell: dict[str, Any] = {"kappa": kappa, "arm": arm, "seeds": len(chosen)}
        for key in ("linear_online", "linear_teacher", "cka_distance", *(f"{m}_final" for m in metrics)):
            values = [run[key] if key in run else run[key.removesuffix("_final")][-1] for run in chosen]
            cell[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        if arm != "base":
            for key in metrics:
                gaps = [mean_gap(run, base[run["seed"]], key) for run in chosen]
                late_gaps = [mean_gap(late(run), late(base[run["seed"]]), key) for run in chosen]
                cell[f"{key}_gap"] = gap_summary(gaps, floors[key], interval(floor_intervals, key))
                cell[f"{key}_late_gap"] = gap_summary(late_gaps, late_floors[key], interval(late_intervals, key))
            for key in probes:
                probe_gaps = [abs(run[key] - base[run["seed"]][key]) for run in chosen]
                cell[f"{key}_gap"] = gap_summary(probe_gaps, probe_floors[key], interval(probe_intervals, key))
            cell["cka_over_floor"] = cell["cka_distance"]["mean"] / cka_floor
            cell["cka_gap"] = gap_summary([run["cka_distance"] for run in chosen], cka_floor,
                                          (cka_floors["min"], cka_floors["max"]))  # fmt: skip
            first_batch = chosen[0]["steps_record"][0]["batch"]
            cell["shares_base_prefix"] = (
                kappa > 1 and first_batch == base[chosen[0]["seed"]]["steps_record"][0]["batch"]
            )
        summary["arms"].append(cell)
    return summary


def print_summary(summary: dict, metrics: tuple[str, ...]) -> None:
    """The summary as a table: per arm, each metric's gap / F and verdict (all records | late), the final linear
    probes with their gap / F, and the CKA distance over its floor."""
    def span(interval: dict) -> str:
        return f"{interval['mean']:.4f} ({interval['min']:.4f}-{interval['max']:.4f})"

    floors = ", ".join(f"{key} {span(summary['floor_interval'][key])}, late {span(summary['late_floor_interval'][key])}"
                       for key in metrics)  # fmt: skip
    probes = ", ".join(f"{key} {span(value)}" for key, value in summary["probe_floor_interval"].items())
    print(f"\nNoise floors F, the mean over seeds of |base - floor run| (the per-seed range): {floors}; {probes};"
          f" CKA distance {span(summary['cka_floor_interval'])}")  # fmt: skip
    print("Kept: gap <= 1.5 F; separated: > 3 F; inconclusive between; '!': the verdict changes within F's range.")
    print("Gap / F (verdict): all records | late.")
    print("* the arm is the base run until its batch grows, by construction: read its late gap.")

    def gap(cell: dict, key: str) -> str:
        mark = "" if cell[key].get("robust", True) else "!"
        return f"{cell[key]['over_floor']:>5.1f} {cell[key]['verdict'][:4] + mark:>5}"

    header = f"{'kappa':>5} {'arm':>24} " + " ".join(f"{key + ' gap/F':>21}" for key in metrics)
    print(header + f" {'lin. online':>18} {'lin. teacher':>18} {'1-CKA / F':>10}")
    for cell in summary["arms"]:
        if cell["arm"] == "base":
            gaps, cka = " ".join(f"{'':>21}" for _ in metrics), f"{'':>10}"
            probes = f"{cell['linear_online']['mean']:>18.4f} {cell['linear_teacher']['mean']:>18.4f}"
        else:
            gaps = " ".join(f"{gap(cell, key + '_gap')} | {gap(cell, key + '_late_gap')}" for key in metrics)
            cka = f"{gap(cell, 'cka_gap'):>10}"
            probes = " ".join(f"{cell[key]['mean']:.4f} {gap(cell, key + '_gap')}"
                              for key in ("linear_online", "linear_teacher"))  # fmt: skip
        name = cell["arm"] + ("*" if cell.get("shares_base_prefix") else "")
        print(f"{cell['kappa']:>5} {name:>24} {gaps} {probes} {cka}")


def cosine(start: float, end: float) -> Callable[[float], float]:
    """A cosine from ``start`` at progress 0 to ``end`` at progress 1."""
    return lambda progress: end - (end - start) * (1 + math.cos(math.pi * progress)) / 2


def pilot(data: tuple[torch.Tensor, ...], size: int, epochs: int, seed: int = 0) -> dict[str, float]:
    """How hard the images ``data`` (a seed's ``study_data``) are for features: the kNN and linear-probe accuracy of
    an untrained backbone, and of one trained with labels (cross-entropy, the same views, ``epochs`` epochs at
    batch 64). The self-supervised runs are expected to lie between the two."""
    x, y, x_val, y_val = data
    n_train = len(x)
    torch.manual_seed(seed)
    net = small_resnet()
    features = torch.nn.Sequential(*list(net)[:-1])
    result = {"untrained_knn": knn_accuracy(embed(features, x), y, embed(features, x_val), y_val),
              "untrained_linear": linear_probe(embed(features, x), y, embed(features, x_val), y_val)}  # fmt: skip
    steps = epochs * (n_train // 64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps)
    for _ in range(epochs):
        for index in torch.randperm(n_train)[: steps // epochs * 64].view(-1, 64):
            loss = torch.nn.functional.cross_entropy(net(view(x[index], size, (0.3, 1.0))), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    train, test = embed(features, x), embed(features, x_val)
    result["supervised_knn"] = knn_accuracy(train, y, test, y_val)
    result["supervised_linear"] = linear_probe(train, y, test, y_val)
    net.eval()
    with torch.no_grad():
        result["supervised_accuracy"] = float((net(x_val - 0.5).argmax(1) == y_val).float().mean())
    return result


def plot(runs: list[dict], metrics: tuple[str, ...], path: Any, title: str) -> None:
    """Seed 0: each of ``metrics`` against samples seen, the base and floor runs in black; one row per metric and
    one column per κ, or with a single κ the metrics on a two-column grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappas = sorted({run["kappa"] for run in runs if run["kappa"] > 1})
    single = len(kappas) == 1
    rows, columns = (-(-len(metrics) // 2), 2) if single else (len(metrics), len(kappas))
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), sharex=True, squeeze=False)
    names = list(dict.fromkeys(run["arm"] for run in runs if run["arm"] not in ("base", "floor")))
    for column, kappa in enumerate(kappas):
        axes = list(grid.flat) if single else list(grid[:, column])
        for run in runs:
            if run["seed"] != 0 or run["kappa"] not in (1, kappa):
                continue
            if run["arm"] in ("base", "floor"):
                style = {"color": "k", "ls": "-" if run["arm"] == "base" else ":", "lw": 1.5}
            else:
                style = {"color": f"C{names.index(run['arm'])}", "lw": 1.2}
            for axis, key in zip(axes, metrics):
                axis.plot(run["samples"], run[key], label=run["arm"], **style)
        for axis, key in zip(axes, metrics):
            axis.set_title(f"kappa {kappa}" if not single and key == metrics[0] else "")
            axis.set_ylabel(key.replace("_", " "))
            axis.grid(alpha=0.3)
    for axis in grid[-1]:
        axis.set_xlabel("samples seen")
    grid[0, -1].legend(fontsize=7)
    save_figure(fig, path, title + (f", kappa {kappas[0]}" if single else ""))
