"""Pseudo-labelling with an EMA teacher: a few labels per class, a large unlabelled pool, the EMA as the teacher.

    python examples/pseudo_label.py [--batch-size 128] [--base-batch-size 32] [--epochs 12] [--momentum 0.99]

The third use of a model EMA in *How to Scale Your EMA*: the student trains on the labelled batch plus the
unlabelled batch, with the EMA teacher's confident predictions as targets. The teacher is the callback's Polyak
EMA read through ``functional_call`` (no copy of the module). Each step's batch holds a labelled and an unlabelled
part of different sizes, so the callback counts κ on the unlabelled stream by overriding ``batch_size_of``.
At ``--batch-size`` B' = κ x ``--base-batch-size`` the rule gives ρ^κ and lr x κ (SGD). The script first trains on
the labels alone (the teacher never confident enough: no pseudo-labels), then with pseudo-labels, and prints
the teacher's pseudo-label accuracy on the unlabelled pool against samples seen. Generated data (overlapping
Gaussian clusters, 4 labels per class, 4096 unlabelled points).
"""

from __future__ import annotations

import argparse

from emascale_examples.pseudo import few_label_clusters, fit_pseudo_labeler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="unlabelled samples per step")
    parser.add_argument("--base-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--momentum", type=float, default=0.99, help="EMA momentum at the base batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate at the base batch size")
    parser.add_argument("--threshold", type=float, default=0.8, help="teacher confidence for a pseudo-label")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = few_label_clusters(args.seed)
    if len(data[1]) % args.batch_size:
        parser.error(f"--batch-size must divide the {len(data[1])} unlabelled samples, got {args.batch_size}")
    print(f"{len(data[0])} labelled, {len(data[1])} unlabelled; batch {args.batch_size} (base {args.base_batch_size})")
    for name, threshold in (("labels only", 2.0), ("pseudo-labels", args.threshold)):
        options = {"momentum": args.momentum, "base_batch_size": args.base_batch_size, "optimizer_rule": "sgd"}
        ema, probe = fit_pseudo_labeler(
            data, args.batch_size, args.epochs, options, args.lr, seed=args.seed, order=args.seed, threshold=threshold
        )
        records = probe.records
        print(
            f"\n{name}: kappa {ema.scaled_ema.kappa:g}, rho-hat {ema.ema_momentum:.6f}, {ema.optimizer_steps} steps,"
            f" teacher validation accuracy {records['teacher_acc'][-1]:.4f} (student {records['student_acc'][-1]:.4f})"
        )
        print(f"{'unlabelled seen':>16} {'pseudo-label acc':>17} {'confident':>10} {'of those right':>15}")
        for samples, accuracy, confident, right in zip(
            records["samples"], records["pseudo_acc"], records["confident"], records["confident_acc"]
        ):
            print(f"{samples:>16} {accuracy:>17.4f} {confident:>10.3f} {right:>15.4f}")


if __name__ == "__main__":
    main()
