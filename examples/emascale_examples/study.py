"""What the κ-sweep studies share: their command line, the EMA and raw outputs they record, how a figure and the
results are written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from emascale_examples.fashion_mnist import DEBIAN_FOLDER


def kappa_sweep_parser(description: str, epochs: int, lr: float, out_dir: str) -> argparse.ArgumentParser:
    """A parser with the arguments every κ-sweep study takes: ``--base-batch``, ``--kappas``, ``--epochs``,
    ``--momentum``, ``--lr`` and ``--out-dir``; a study adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--kappas", type=lambda text: [int(k) for k in text.split(",")], default=[2, 4, 8])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--momentum", type=float, default=0.99, help="EMA momentum at the base batch size")
    parser.add_argument("--lr", type=float, default=lr, help="learning rate at the base batch size")
    parser.add_argument("--out-dir", type=Path, default=Path(out_dir))
    return parser


def add_data_arguments(parser: argparse.ArgumentParser, fashion_mnist: bool = True) -> None:
    """``--train-samples``, ``--val-samples``, ``--cifar10`` and (where the study reads it) ``--fashion-mnist`` of
    the image studies."""
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--val-samples", type=int, default=2048)
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    if not fashion_mnist:
        return
    parser.add_argument(
        "--fashion-mnist", nargs="?", const=str(DEBIAN_FOLDER), metavar="DIR",
        help=f"real images: Fashion-MNIST's IDX files from DIR (default {DEBIAN_FOLDER}, where `apt-get install"
             " dataset-fashion-mnist` puts them); training images from its training split, held-out ones from its"
             " test split",
    )  # fmt: skip


def check_fashion_mnist_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With ``--fashion-mnist``: at most the 60,000 training and 10,000 test images."""
    if not args.fashion_mnist:
        return
    for name, split, size in (("train_samples", "training", 60_000), ("val_samples", "test", 10_000)):
        if not 0 < getattr(args, name) <= size:
            parser.error(f"--{name.replace('_', '-')} must be in [1, {size}] (Fashion-MNIST's {split} split holds"
                         f" {size} images), got {getattr(args, name)}")  # fmt: skip


def check_train_samples(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every arm sees whole batches: the training samples must be a multiple of the largest global batch."""
    largest = max(args.kappas) * args.base_batch
    if args.train_samples % largest:
        parser.error(f"--train-samples must be a multiple of the largest batch {largest}, got {args.train_samples}")


def save_figure(fig: Any, path: Path, title: str) -> None:
    """Title, tighten and write ``fig`` to ``path`` (120 dpi), then close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def ema_and_raw_outputs(ema: Any, module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA's (``ema.functional_call``) and the raw module's outputs on ``x`` in eval mode, 512 rows at a time;
    the module's training mode is restored after."""
    was_training = module.training
    module.eval()
    averaged = torch.cat([ema.functional_call(module, (chunk,)) for chunk in x.split(512)])
    raw = torch.cat([module(chunk) for chunk in x.split(512)])
    module.train(was_training)
    return averaged, raw


def _cpu_model() -> str:
    """The CPU's model name (Linux), which decides how convolutions round; "unknown" elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    """What a recorded result depends on beyond its arguments: the command, the versions, PyTorch's thread count
    (the convolutions round differently with another) and the machine."""
    import os
    import platform
    import shlex
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "command": shlex.join(["python", *sys.argv]),
        "python": platform.python_version(),
        **{name: installed(name) for name in ("torch", "lightning", "lightly", "lightning-emascale")},
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": _cpu_model(),
    }


def write_results(args: argparse.Namespace, figure: str, **payload: Any) -> None:
    """``results.json`` (the arguments, the ``environment()`` and ``payload``) in ``args.out_dir``, and say what was
    written there."""
    results = {"args": {**vars(args), "out_dir": str(args.out_dir)}, "environment": environment(), **payload}
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out_dir}/{figure} and results.json")

