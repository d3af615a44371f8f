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

What the run shows (printed, and written under the figure): the mechanics and the teacher trailing the online
network, not feature learning. On the generated images an untrained ResNet-18 already scores 0.81 in kNN (each
class is one fixed colour pattern, which random features separate); 96 steps on 1024 images do not learn better
features than those, and the kNN falls (0.70 online, 0.56 teacher). ``studies/byol_study.py`` shows BYOL learning,
on generated shapes that random features do not separate; ``--cifar10`` trains on real images.

Takes about 45 s on a 2-core CPU at load ~1 (``/usr/bin/time -v``: 44-45 s, 1.2 GB peak). The time scales with
the machine's load, and more than in proportion: at load ~4.8 the same run took 8.8 min.
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
    _, run = fit(model, data, ema, args, backbone="backbone", loss_label=loss_label, study="byol_study.py")
    _, online, teacher = run.knn[-1]
    print(f"kNN accuracy (k=20): backbone {online:.4f}, momentum backbone {teacher:.4f} (chance 0.1)")


if __name__ == "__main__":
    main()
