"""Post-hoc EMA: train once, then choose the EMA length on validation data.

    python examples/post_hoc.py                                # writes post_hoc.png
    python examples/post_hoc.py --batch-size 256 --base-batch-size 32   # kappa 8: the same lengths in samples

About 60 s on a 2-core CPU at load ~4.5 (measured with ``/usr/bin/time -v``: 61 s wall, 50 s CPU, 0.9 GB peak).

``PostHocEMACallback`` tracks two power-function EMAs (sigma_rel 0.05 and 0.10, EDM2's) on the sample clock and
snapshots them every ``--snapshot-every`` samples. Afterwards ``reconstruct_post_hoc`` builds the EMA of any
length from the snapshots, with no retraining: this script sweeps sigma_rel and half-lives in samples, evaluates
each reconstruction on held-out data, prints a table with each fit's residual, and plots accuracy against length.
A fit whose residual exceeds 0.1 is too far from the target to trust: the table flags it, the figure draws it
hollow and grey, and it is never chosen. The first line prints the kappa of the run's steps: the full steps, and
apart from them each epoch's short last step (the training set is not a multiple of the batch).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import lightning as L
import torch
from emascale_examples.data import Data
from emascale_examples.models import Classifier
from emascale_examples.tracing import Trace

from lightning_emascale import PostHocEMACallback, reconstruct_post_hoc

SIGMA_RELS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.14, 0.20, 0.28)
HALF_LIVES = (256, 1024, 4096, 16384)
POOR_FIT = 0.1  # a reconstruction whose residual exceeds this is too far from the target profile to choose


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
    trace = Trace(post_hoc)  # the kappa of every step: post_hoc.kappa alone is the last step's
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[post_hoc, trace], limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    print(
        f"trained on {post_hoc.samples_seen} samples in {post_hoc.optimizer_steps} optimizer steps, base batch"
        f" {args.base_batch_size}: {trace.kappa_summary()}"
    )
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
    poor_note = f"  (residual > {POOR_FIT:g}: poor fit, not chosen; hollow grey in the figure)"
    for kind, value, residual, acc in rows:
        flag = poor_note if residual > POOR_FIT else ""
        print(f"{kind + ' ' + format(value, 'g'):>26} {residual:>9.4f} {acc:>8.4f}{flag}")
    best = max((row for row in rows if row[2] <= POOR_FIT), key=lambda row: row[3])
    print(f"best: {best[0]} {best[1]:g} (validation accuracy {best[3]:.4f}, residual {best[2]:.4f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, kind in ((left, "sigma_rel"), (right, "half_life_samples")):
        points = [(value, residual, acc) for k, value, residual, acc in rows if k == kind]
        values = [value for value, _, _ in points]
        axis.plot(values, [acc for _, _, acc in points], color="C0", zorder=1)
        good = [(value, acc) for value, residual, acc in points if residual <= POOR_FIT]
        poor = [(value, acc) for value, residual, acc in points if residual > POOR_FIT]
        if good:
            axis.plot(*zip(*good), "o", color="C0", label="reconstructed EMA")
        if poor:
            axis.plot(
                *zip(*poor),
                "o",
                color="grey",
                markerfacecolor="white",
                label=f"residual > {POOR_FIT:g}: poor fit, not chosen",
            )
        if best[0] == kind:
            axis.plot(best[1], best[3], "*", color="C3", markersize=12, label="chosen (best good fit)")
        axis.axhline(raw, color="grey", linestyle="--", label="raw weights")
        axis.set_xscale("log")
        axis.minorticks_off()
        axis.set_xticks(values, [f"{value:g}" for value in values])
        axis.set_xlabel(kind.replace("_", " ") + (" (tracked: 0.05, 0.10)" if kind == "sigma_rel" else ""))
        axis.legend(fontsize=8)
    left.set_ylabel("validation accuracy")
    figure.suptitle(f"One run, every EMA length afterwards (batch {args.batch_size}, base {args.base_batch_size})")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
