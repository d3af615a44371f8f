"""The post-hoc EMA against five EMAs kept in parallel, on the supervised study's setting, at two batch sizes.

    python examples/studies/post_hoc_study.py [--base-batch 32] [--kappa 8] [--epochs 16] [--train-samples 4096]
        [--snapshot-every 4096] [--out-dir post_hoc_study]

Morales-Brotons et al. (TMLR 2024) keep five EMAs at once (momenta 0.968, 0.984, 0.992, 0.996, 0.998) and pick
the best after training: five full copies. The post-hoc EMA (Karras et al., EDM2) keeps two power EMAs
(sigma_rel 0.05 and 0.10) and snapshots them on the sample clock; after training any length is reconstructed.
Each run here trains the supervised study's ResNet-8 (generated noisy images, 20 % label noise, SGD with a
warm-up and cosine LR on samples seen) once with both attached: the five EMAs as ``EMAScalingCallback``s
(momenta at the base batch, ^kappa by the rule) and one ``PostHocEMACallback``. It reports, for the base batch
and for kappa x the base batch: the validation accuracy of each of the five EMAs; of the post-hoc reconstruction
at the same five half-lives in samples (with the fit residual); of the post-hoc sweep over sigma_rel; the best of
each family; and the memory each keeps (EMA copies during training, snapshot bytes on disk). Selection and report
use the same validation set for both families. Writes ``results.json`` and ``post_hoc_study.png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

# examples/ on the path, so that `python examples/studies/post_hoc_study.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from emascale_examples.resnet import Classifier, generated_data
from emascale_examples.study import write_results
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, PostHocEMACallback, half_life_from_momentum, reconstruct_post_hoc

MOMENTA = (0.968, 0.984, 0.992, 0.996, 0.998)
SIGMA_RELS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.14, 0.20)


@torch.no_grad()
def accuracy(model: torch.nn.Module, val: TensorDataset) -> float:
    model.eval()
    x, y = val.tensors
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(512)])
    return float((predictions == y).float().mean())


def run(kappa: int, train: TensorDataset, val: TensorDataset, args: argparse.Namespace, directory: Path) -> dict:
    batch = kappa * args.base_batch
    torch.manual_seed(0)  # the same initial weights at both batch sizes
    model = Classifier(lr=args.lr)
    parallel = [
        EMAScalingCallback(
            momentum=momentum,
            base_batch_size=args.base_batch,
            optimizer_rule="sgd" if index == 0 else None,
            evaluate_with_ema=False,
            name=f"ema_{momentum}",
        )
        for index, momentum in enumerate(MOMENTA)  # one of them applies the SGD rule for the run
    ]
    post_hoc = PostHocEMACallback(
        snapshot_every_samples=args.snapshot_every, directory=directory, base_batch_size=args.base_batch
    )
    loader = DataLoader(
        train, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[*parallel, post_hoc], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    result: dict = {"kappa": kappa, "batch": batch, "samples": post_hoc.samples_seen, "raw": accuracy(model, val)}
    result["parallel"] = []
    for momentum, ema in zip(MOMENTA, parallel):
        with ema.ema_weights():
            result["parallel"].append({"momentum": momentum, "accuracy": accuracy(model, val)})

    def reconstructed(**target: float) -> dict:
        candidate = copy.deepcopy(model)
        state = reconstruct_post_hoc(directory, **target)
        candidate.load_state_dict(state)
        return {**target, "residual": state.residual, "accuracy": accuracy(candidate, val)}

    result["post_hoc_half_lives"] = [
        {"momentum": m, **reconstructed(half_life_samples=half_life_from_momentum(m, args.base_batch))} for m in MOMENTA
    ]
    result["post_hoc_sigma_rels"] = [reconstructed(sigma_rel=sigma_rel) for sigma_rel in SIGMA_RELS]
    parameters = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    snapshots = sorted(directory.glob("post_hoc-*.pt"))
    result["memory"] = {
        "parameters_and_float_buffers": parameters,
        "parallel_copies": len(MOMENTA),
        "post_hoc_copies": len(post_hoc.sigma_rels),
        "snapshots": len(snapshots),
        "snapshot_bytes": sum(path.stat().st_size for path in snapshots),
    }
    print_run(result)
    return result


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda row: row["accuracy"])


def print_run(result: dict) -> None:
    print(f"\nbatch {result['batch']} (kappa {result['kappa']}), {result['samples']} samples; raw {result['raw']:.4f}")
    print(f"{'momentum':>9} {'half-life':>10} {'5 EMAs':>8} {'post-hoc':>9} {'residual':>9}")
    for ema, rebuilt in zip(result["parallel"], result["post_hoc_half_lives"]):
        print(
            f"{ema['momentum']:>9} {rebuilt['half_life_samples']:>10.0f} {ema['accuracy']:>8.4f}"
            f" {rebuilt['accuracy']:>9.4f} {rebuilt['residual']:>9.4f}"
        )
    for row in result["post_hoc_sigma_rels"]:
        print(f"  sigma_rel {row['sigma_rel']:<5} post-hoc {row['accuracy']:.4f} (residual {row['residual']:.4f})")
    memory = result["memory"]
    print(
        f"best of the five EMAs {best(result['parallel'])['accuracy']:.4f};"
        f" best post-hoc {best(result['post_hoc_half_lives'] + result['post_hoc_sigma_rels'])['accuracy']:.4f};"
        f" EMA copies while training: {memory['parallel_copies']} against {memory['post_hoc_copies']},"
        f" plus {memory['snapshots']} snapshots ({memory['snapshot_bytes'] / 2**20:.1f} MiB on disk)",
        flush=True,
    )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True, squeeze=False)
    for axis, result in zip(axes[0], results):
        half_lives = [row["half_life_samples"] for row in result["post_hoc_half_lives"]]
        axis.plot(half_lives, [row["accuracy"] for row in result["parallel"]], "o-", label="five EMAs in parallel")
        axis.plot(half_lives, [row["accuracy"] for row in result["post_hoc_half_lives"]], "s--", label="post-hoc")
        axis.axhline(result["raw"], color="grey", ls=":", label="raw weights")
        axis.set_xscale("log")
        axis.set_xlabel("EMA half-life (samples)")
        axis.set_title(f"batch {result['batch']} (kappa {result['kappa']})")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--kappa", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--val-samples", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--snapshot-every", type=int, default=4096, help="samples seen between snapshots")
    parser.add_argument("--out-dir", type=Path, default=Path("post_hoc_study"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, val = generated_data(args.train_samples, args.val_samples)
    results = [run(kappa, train, val, args, args.out_dir / f"snapshots_kappa{kappa}") for kappa in (1, args.kappa)]
    plot(results, args.out_dir / "post_hoc_study.png")
    write_results(args, "post_hoc_study.png", runs=results)


if __name__ == "__main__":
    main()
