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

What the run shows (printed, and written under the figure). The loss rises (7.1 -> 8.1 nats) although the student
matches the teacher better: it is the cross-entropy H(targets) + KL(targets || student), and the figure draws both
parts. The targets' entropy rises (4.6 -> 6.0); the KL, the part the student can reduce, falls (2.5 -> 2.0). Without
the centre subtracted, the same teacher outputs would give targets of entropy 4.1 -> 4.4: the centring, which keeps
DINO's teacher from collapsing onto one output, is mostly what flattens the targets. The kNN accuracy falls from
0.81, an untrained ResNet-18's on these generated images, to 0.50 / 0.49, as in byol.py: the demo shows the
mechanics, not feature learning (``studies/dino_study.py`` for that, ``--cifar10`` for real images).

Takes about 1 min on a 2-core CPU at load ~1 (``/usr/bin/time -v``: 58-61 s, 1.25 GB peak). The time scales with
the machine's load, and more than in proportion: at load ~3.4-5.1 the same run took 9.1 min.
"""

from __future__ import annotations

import math
import statistics

import lightning as L
from emascale_examples.selfsup import DINO, DINO_TEACHERS, ImageData, RunTrace, fit, parse_args
from lightly.loss import DINOLoss

from lightning_emascale import EMAScalingCallback

EXTRA_LABELS = {
    "teacher_entropy": "H(targets): the teacher's targets' entropy per image",
    "kl": "KL(targets || student) = loss - H(targets)",
    "uncentred_entropy": "H(targets) of the same outputs without the centre subtracted",
}


def loss_reading(trace: RunTrace, criterion: DINOLoss) -> str:
    """What the loss panel shows, from the run's numbers (means over the first and the last tenth of the steps)."""
    tenth, extras = max(1, len(trace.losses) // 10), trace.extras

    def ends(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values[:tenth]), statistics.fmean(values[-tenth:])

    (loss0, loss1), (h0, h1), (kl0, kl1) = ends(trace.losses), ends(extras["teacher_entropy"]), ends(extras["kl"])
    (u0, u1), (_, batch_mean) = ends(extras["uncentred_entropy"]), ends(extras["teacher_mean_entropy"])
    output_dim = criterion.center.shape[-1]
    text = (
        "Loss: DINO's loss is the cross-entropy of the student against the teacher's targets, H(targets) +"
        f" KL(targets || student), in nats. It went from {loss0:.2f} to {loss1:.2f} (means of the first and last"
        f" {tenth} steps): H(targets) {h0:.2f} -> {h1:.2f}, KL {kl0:.2f} -> {kl1:.2f}."
    )
    if loss1 > loss0 and h1 > h0 and kl1 < kl0:
        text += (
            f" The rise is the targets' own entropy (at most log {output_dim} = {math.log(output_dim):.2f}, for"
            " uniform targets); the part the student can reduce, the KL, fell."
        )
        if u1 - u0 < (h1 - h0) / 2 and u1 < h1 - 0.5:
            text += (
                " The targets flatten mostly through the centring: without the centre subtracted, the same teacher"
                f" outputs would give {u0:.2f} -> {u1:.2f} (both at teacher temperature {criterion.teacher_temp:g})."
                " Centring is what keeps DINO's teacher from collapsing onto one output: the entropy of the"
                f" targets' batch mean ends at {batch_mean:.2f}, near the maximum."
            )
    return text


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
        model, data, ema, args, backbone="student_backbone", loss_label="training loss: DINO\ncross-entropy (nats)",
        study="dino_study.py", extra_labels=EXTRA_LABELS,
        loss_reading=lambda trace: loss_reading(trace, model.criterion),
    )  # fmt: skip
    print(f"loss center momentum after the last step: {trainer.callback_metrics['ema/criterion.center_momentum']:.4f}")
    _, student, teacher = run.knn[-1]
    print(f"kNN accuracy (k=20): student backbone {student:.4f}, teacher backbone {teacher:.4f} (chance 0.1)")


if __name__ == "__main__":
    main()
