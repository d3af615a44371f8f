"""What the κ-sweep studies share: their command line and how a figure is written."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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


def save_figure(fig: Any, path: Path, title: str) -> None:
    """Title, tighten and write ``fig`` to ``path`` (120 dpi), then close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
