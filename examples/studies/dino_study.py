"""DINO at 8x the base batch: from the start, after a sharp jump, or grown progressively; paired seeds, with runs
expected to collapse, to show that the metrics can see it.

    python examples/studies/dino_study.py [--base-batch 32] [--kappas 8] [--seeds 3] [--epochs 12]
        [--momentum 0.99] [--lr 0.1] [--size 16] [--train-samples 4096] [--val-samples 1024] [--grow-at 3]
        [--out-dir dino_study] [--every-growth] [--fashion-mnist [DIR] | --cifar10 ROOT]

The data are the BYOL study's generated shapes (``emascale_examples.shapes``). The model: a CIFAR-stem ResNet-8
with lightly's DINO head (64 -> 128 -> 32 -> 256 prototypes, with batch norm) and loss (teacher temperature 0.04, student 0.1),
two global 16x16 and two local 8x8 views, SGD with momentum, warm-up and cosine on samples seen.
``EMAScalingCallback(teachers=...)`` moves the teacher (backbone and head) with a cosine from ``--momentum`` to 1
on samples seen, and ``momentum_attributes`` the loss centre's momentum (0.9 at the base batch). A seed fixes the
data, the initial weights and the data order of every arm. Per seed, at the base batch B:

* ``base``; ``floor``: the base with another data order and augmentations;
* calibration runs expected to collapse: ``rho 0.9 constant`` (a teacher that follows the student closely) and
  ``centering off`` (the loss centre stays at zero);

and at K = ``max(--kappas)`` (8 by default):

* ``KB, rule`` / ``KB, no EMA rule``: batch K x B from the start, lr x K (``optimizer_rule="sgd"``), the teacher
  and centre momenta raised to K, or kept per step;
* ``sharp, rule`` / ``sharp, no EMA rule``: batch B until epoch ``--grow-at`` (a quarter of the run by
  default), then K x B;
* ``progressive, rule``: batch B until epoch ``--grow-at``, then doubling every epoch up to K x B;
* with ``--every-growth``, ``progressive, no EMA rule`` too.

``--fashion-mnist [DIR]`` trains on Fashion-MNIST instead of the shapes, as ``byol_study.py`` does.

The sharp and progressive runs are the base run until ``--grow-at`` by construction: judge them by the *late*
gaps, which leave those records out. Measured at the start and after every epoch: the teacher's per-image entropy
and the entropy of its batch-mean output on the held-out images (eval mode, un-augmented, centred and at the
teacher temperature as the loss's targets are; both near 0 when it collapses to one prototype, both near
log 256 = 5.5 when it collapses to the uniform), the effective rank (RankMe) of the teacher's backbone features
and the kNN accuracy (k = 20) of both backbones; at the end, linear probes and the CKA of the teacher's features
to the base run's. Per arm: the paired gaps to the base run against the noise floor F, with the verdicts decided
in advance (kept <= 1.5 F, separated > 3 F). Writes ``dino_study.png`` and ``results.json`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import ClassVar

# examples/ on the path, so that `python examples/studies/dino_study.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from emascale_examples.probes import entropies
from emascale_examples.selfsup_study import (
    Arm,
    ShapeSSL,
    backbone,
    check_study_arguments,
    cosine,
    run_study,
    study_arguments,
)
from emascale_examples.shapes import view
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad

TEACHER_TEMPERATURE = 0.04


class ShapeDINO(ShapeSSL):
    online, teacher = "student_backbone", "teacher_backbone"
    teachers: ClassVar[dict[str, str]] = {"student_backbone": "teacher_backbone", "student_head": "teacher_head"}

    def __init__(
        self,
        images: torch.Tensor,
        size: int,
        batch_size: int,
        lr: float,
        order: int,
        prototypes: int = 256,
        centering: bool = True,
    ) -> None:
        super().__init__(images, size, batch_size, lr, order)
        self.centering = centering
        self.student_backbone = backbone()
        # batch norm in the head: without it every base run here collapsed to a uniform teacher (a pilot)
        self.student_head = DINOProjectionHead(64, 128, 32, prototypes, batch_norm=True)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = DINOProjectionHead(64, 128, 32, prototypes, batch_norm=True)  # weight norm: no deepcopy
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=prototypes,
            warmup_teacher_temp=TEACHER_TEMPERATURE,
            teacher_temp=TEACHER_TEMPERATURE,
            warmup_teacher_temp_epochs=0,
            center_momentum=0.9 if centering else 1.0,  # 1: the centre stays at its initial zero
        )

    @property
    def momentum_attributes(self) -> dict[str, float]:  # type: ignore[override]
        return {"criterion.center_momentum": 0.9} if self.centering else {}

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        global_views = [view(x, self.size, (0.4, 1.0)) for _ in range(2)]
        local_views = [view(x, self.size // 2, (0.1, 0.4)) for _ in range(2)]
        with torch.no_grad():
            teacher_out = [self.teacher_logits(v) for v in global_views]
        student_out = [self.student_head(self.student_backbone(v)) for v in global_views + local_views]
        loss = self.criterion(teacher_out, student_out)
        self.log("loss", loss, batch_size=len(x))
        return loss

    @torch.no_grad()
    def extra_metrics(self, held_out: torch.Tensor) -> dict[str, float]:
        was_training = self.training
        self.eval()
        logits = self.teacher_logits(held_out - 0.5)
        self.train(was_training)
        per_image, batch_mean = entropies(logits, TEACHER_TEMPERATURE, self.criterion.center)
        return {"entropy": per_image, "mean_entropy": batch_mean, "centre_norm": float(self.criterion.center.norm())}


def arms(args: argparse.Namespace) -> list[Arm]:
    """Every run of a seed but the base and floor."""
    base, k, at = args.base_batch, max(args.kappas), args.grow_at
    sharp = {0: base, at: k * base}
    grow = {0: base, **{at + i: base * 2 ** (i + 1) for i in range(k.bit_length() - 1)}}
    return [
        Arm("rho 0.9 constant", 1, {0: base}, momentum=lambda progress: 0.9),
        Arm("centering off", 1, {0: base}, module_options={"centering": False}),
        Arm(f"{k}B, rule", k, {0: k * base}),
        Arm(f"{k}B, no EMA rule", k, {0: k * base}, ema_rule=False),
        Arm("sharp, rule", k, sharp),
        Arm("sharp, no EMA rule", k, sharp, ema_rule=False),
        Arm("progressive, rule", k, grow),
        *([Arm("progressive, no EMA rule", k, grow, ema_rule=False)] if args.every_growth else []),
    ]


def main() -> None:
    parser = study_arguments(__doc__, epochs=12, lr=0.1, momentum=0.99, out_dir="dino_study", grow_at=3)
    parser.set_defaults(kappas=[8])
    args = parser.parse_args()
    check_study_arguments(parser, args)
    if args.pilot:
        parser.error("--pilot is byol_study.py's (the same backbone, views and data): run it there")
    metrics = ("knn_teacher", "rankme", "entropy", "mean_entropy")
    run_study(args, ShapeDINO, arms(args), metrics, shared=args.grow_at + 1, momentum=cosine(args.momentum, 1.0),
              title="DINO on Fashion-MNIST" if args.fashion_mnist else "DINO", figure="dino_study.png")  # fmt: skip


if __name__ == "__main__":
    main()
