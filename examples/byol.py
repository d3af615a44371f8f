"""BYOL with a batch-size-invariant teacher: lightly's BYOL example, minus its own momentum update.

    python examples/byol.py [--epochs 4] [--schedule 0:32,2:64] [--out byol.png] [--cifar10 ROOT]

The module (``BYOL`` in ``emascale_examples/selfsup.py``) is lightly's published BYOL example (ResNet-18
backbone) with the two ``update_momentum`` lines and the step-counted ``cosine_schedule`` deleted.
``EMAScalingCallback(teachers=...)`` moves the momentum backbone and projection head instead, once per
optimizer step, with the momentum's cosine (0.99 -> 1) evaluated on samples seen and raised to kappa;
``ProgressiveBatchCallback`` grows the batch mid-run. The images are generated (or CIFAR-10 with --cifar10).
The progress bar shows kappa, rho-hat and the batch; at the end the script prints a kNN accuracy of the
backbone and writes a PNG of the dynamics.
"""

from __future__ import annotations

import lightning as L
from emascale_examples.selfsup import BYOL, BYOL_TEACHERS, ImageData, fit, knn_accuracy, parse_args

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
    fit(model, data, ema, args)
    print(
        f"kNN accuracy (k=20): backbone {knn_accuracy(model.backbone, data):.4f}, "
        f"momentum backbone {knn_accuracy(model.backbone_momentum, data):.4f} (chance 0.1)"
    )


if __name__ == "__main__":
    main()
