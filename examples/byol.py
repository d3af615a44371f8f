"""BYOL with a batch-size-invariant teacher: lightly's BYOL example, minus its own momentum update.

    python examples/byol.py [--epochs 4] [--schedule 0:32,2:64] [--out byol.png] [--record run.json] [--cifar10 ROOT]

The module (``BYOL`` in ``emascale_examples/selfsup.py``) is lightly's published BYOL example (ResNet-18
backbone) with the two ``update_momentum`` lines and the step-counted ``cosine_schedule`` deleted.
``EMAScalingCallback(teachers=...)`` moves the momentum backbone and projection head instead, once per
optimizer step, with the momentum's cosine (0.99 -> 1) evaluated on samples seen and raised to kappa;
``ProgressiveBatchCallback`` grows the batch mid-run. The images are generated (or CIFAR-10 with --cifar10).
The progress bar shows kappa, rho-hat and the batch. At the end the script prints the kNN accuracy of the
backbone and of the momentum backbone (measured at the start and after every epoch) and writes a PNG: the
mechanics (batch, kappa, rho-hat, LR) beside the run (loss, kNN accuracy, the teacher's lag behind the online
network), all against samples seen; ``--record`` writes the same numbers as JSON.
"""

from __future__ import annotations

import lightning as L
from emascale_examples.selfsup import BYOL, BYOL_TEACHERS, ImageData, fit, parse_args

from lightning_emascale import EMAScalingCallback


def main() -> None:
    args = parse_args(__doc__, "byol.png")

    L.seed_everything(0)
    base = args.schedule[min(args.schedule)]
    data = ImageData("byol", batch_size=base, n_train=args.train_samples, cifar10_root=args.cifar10)
    ema = EMAScalingCallback(
        momentum=0.99,
        momentum_schedule="cosine",
        final_momentum=1.0,
        base_batch_size=base,
        optimizer_rule="sgd",
        teachers=BYOL_TEACHERS,
    )
    model = BYOL()
    loss_label = "training loss: -cos(online prediction,\nteacher projection), -1 = agree"
    _, run = fit(model, data, ema, args, backbone="backbone", loss_label=loss_label)
    _, online, teacher = run.knn[-1]
    print(f"kNN accuracy (k=20): backbone {online:.4f}, momentum backbone {teacher:.4f} (chance 0.1)")


if __name__ == "__main__":
    main()
