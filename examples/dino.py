"""DINO with a batch-size-invariant teacher and loss center: lightly's DINO example, minus its own updates.

    python examples/dino.py [--epochs 4] [--schedule 0:32,2:64] [--out dino.png] [--record run.json] [--cifar10 ROOT]

lightly's published DINO example (ResNet-18 backbone; ``DINO`` in ``emascale_examples/selfsup.py``) with the
``update_momentum`` lines and the step-counted ``cosine_schedule`` deleted. ``EMAScalingCallback(teachers=...)``
moves the teacher backbone and head once per optimizer step with the momentum's cosine (0.996 -> 1) on samples
seen, raised to kappa, and ``momentum_attributes`` scales the loss center's own EMA (``DINOLoss.center_momentum``,
0.9, updated on every forward) by the same rule. Generated images by default (CIFAR-10 with --cifar10); two
global 32x32 and two local 16x16 crops. Prints the kNN accuracy of the student and teacher backbones (at the
start and after every epoch) and writes a PNG of the mechanics beside the run (loss, kNN accuracy, the
teacher's lag), as byol.py does.
"""

from __future__ import annotations

import lightning as L
from emascale_examples.selfsup import DINO, DINO_TEACHERS, ImageData, fit, parse_args

from lightning_emascale import EMAScalingCallback


def main() -> None:
    args = parse_args(__doc__, "dino.png")

    L.seed_everything(0)
    base = args.schedule[min(args.schedule)]
    data = ImageData("dino", batch_size=base, n_train=args.train_samples, cifar10_root=args.cifar10)
    ema = EMAScalingCallback(
        momentum=0.996,
        momentum_schedule="cosine",
        final_momentum=1.0,
        base_batch_size=base,
        optimizer_rule="sgd",
        teachers=DINO_TEACHERS,
        momentum_attributes={"criterion.center_momentum": 0.9},
    )
    model = DINO()
    trainer, run = fit(
        model, data, ema, args, backbone="student_backbone", loss_label="training loss: DINO\ncross-entropy (nats)"
    )
    print(f"loss center momentum after the last step: {trainer.callback_metrics['ema/criterion.center_momentum']:.4f}")
    _, student, teacher = run.knn[-1]
    print(f"kNN accuracy (k=20): student backbone {student:.4f}, teacher backbone {teacher:.4f} (chance 0.1)")


if __name__ == "__main__":
    main()
