"""Post-hoc EMA: train once, then choose the EMA length on validation data.

    python examples/post_hoc.py                                # ~30 s on a 2-core CPU, writes post_hoc.png
    python examples/post_hoc.py --batch-size 256 --base-batch-size 32   # kappa 8: the same lengths in samples

``PostHocEMACallback`` tracks two power-function EMAs (sigma_rel 0.05 and 0.10, EDM2's) on the sample clock and
snapshots them every ``--snapshot-every`` samples. Afterwards ``reconstruct_post_hoc`` builds the EMA of any
length from the snapshots, with no retraining: this script sweeps sigma_rel and half-lives in samples, evaluates
each reconstruction on held-out data, prints a table with each fit's residual, and plots accuracy against length.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import lightning as L
import torch
from emascale_examples.data import Data
from emascale_examples.models import Classifier

from lightning_emascale import PostHocEMACallback, reconstruct_post_hoc

SIGMA_RELS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.14, 0.20, 0.28)
HALF_LIVES = (256, 1024, 4096, 16384)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Data) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val_dataloader())
    return hits / len(data.val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--snapshot-every", type=int, default=2048, help="samples seen between snapshots")
    parser.add_argument("--snapshots", default=None, help="snapshot directory (default: a temporary one)")
    parser.add_argument("--out", default="post_hoc.png")
    args = parser.parse_args()

    L.seed_everything(0)
    data = Data(batch_size=args.batch_size, samples=args.samples)
    model = Classifier(in_features=64, lr=0.05)
    directory = args.snapshots or tempfile.mkdtemp(prefix="post_hoc-")
    post_hoc = PostHocEMACallback(
        snapshot_every_samples=args.snapshot_every,
        directory=directory,
        base_batch_size=args.base_batch_size,
        optimizer_rule="sgd",
    )
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[post_hoc], limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    print(f"trained on {post_hoc.samples_seen} samples in {post_hoc.optimizer_steps} steps (kappa {post_hoc.kappa:g});")
    raw = accuracy(model, data)
    print(f"raw weights: validation accuracy {raw:.4f}; snapshots in {directory}")

    rows = []
    for kind, values in (("sigma_rel", SIGMA_RELS), ("half_life_samples", HALF_LIVES)):
        for value in values:
            state = reconstruct_post_hoc(directory, **{kind: value})
            candidate = copy.deepcopy(model)
            candidate.load_state_dict(state)
            rows.append((kind, value, state.residual, accuracy(candidate, data)))
    print(f"{'target':>26} {'residual':>9} {'val acc':>8}")
    for kind, value, residual, acc in rows:
        flag = "  (residual > 0.1: poorly represented, not chosen)" if residual > 0.1 else ""
        print(f"{kind + ' ' + format(value, 'g'):>26} {residual:>9.4f} {acc:>8.4f}{flag}")
    best = max((row for row in rows if row[2] <= 0.1), key=lambda row: row[3])
    print(f"best: {best[0]} {best[1]:g} (validation accuracy {best[3]:.4f}, residual {best[2]:.4f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, kind in ((left, "sigma_rel"), (right, "half_life_samples")):
        points = [(value, acc) for k, value, _, acc in rows if k == kind]
        axis.plot(*zip(*points), marker="o", label="reconstructed EMA")
        axis.axhline(raw, color="grey", linestyle="--", label="raw weights")
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks([value for value, _ in points], [f"{value:g}" for value, _ in points])
        axis.set_xlabel(kind.replace("_", " ") + (" (tracked: 0.05, 0.10)" if kind == "sigma_rel" else ""))
    left.set_ylabel("validation accuracy")
    left.legend()
    figure.suptitle(f"One run, every EMA length afterwards (batch {args.batch_size}, base {args.base_batch_size})")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
