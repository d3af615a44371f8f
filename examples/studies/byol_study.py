"""BYOL at kappa x the base batch on images where the features must be learned: paired seeds, the EMA rule isolated.

    python examples/studies/byol_study.py [--base-batch 32] [--kappas 2,4,8] [--seeds 3] [--epochs 12]
        [--momentum 0.99] [--lr 0.1] [--size 16] [--train-samples 4096] [--val-samples 1024] [--grow-at 2]
        [--out-dir byol_study] [--pilot] [--every-growth] [--fashion-mnist [DIR] | --cifar10 ROOT]

The data (``emascale_examples.shapes``): ten shapes, each image with random colours, position, scale and a
distractor, so that an untrained backbone scores near chance in kNN; ``--pilot`` measures that and a supervised
backbone on the same views first (run it alone: ``--pilot --seeds 0``). The model: BYOL (lightly's projection and
prediction heads and loss) on a CIFAR-stem ResNet-8, SGD with momentum, warm-up and cosine on samples seen; the
teacher (backbone and projection head) is moved by ``EMAScalingCallback(teachers=...)`` with a constant momentum
rho at the base batch B: a horizon of B / (1 - rho) samples, 3200 by default, so the default run of 12 x 4096
samples is 15 horizons. A seed fixes the data, the initial weights and the data order of every arm. Per seed:

* ``base``: batch B; ``floor``: the base with another data order and augmentations;

and at every kappa K, batch K x B from the start:

* ``rule``: lr x K (``optimizer_rule="sgd"``) and rho^K;
* ``no EMA rule``: lr x K, rho per step: isolates the EMA rule (a by-hand LR with rho unchanged is the same
  training, as the pseudo-labelling study checks);

and at the largest K ``progressive``: the rule, batch B until epoch ``--grow-at``, then doubling every epoch up to
K x B. With ``--every-growth`` also, at the largest K: ``sharp, rule`` and ``sharp, no EMA rule`` (batch B until
``--grow-at``, then K x B) and ``progressive, no EMA rule``. The growing arms' first records are the base run's by
construction; the *late* gaps leave them out.

``--fashion-mnist [DIR]`` trains on a seed's random ``--train-samples`` of Fashion-MNIST's training images and
measures on ``--val-samples`` of its test images, resized to ``--size`` and repeated to three channels; the pilot
then measures the same images.

Measured at the start and after every epoch: the kNN accuracy (k = 20) of the online and teacher backbones on the
held-out images, the teacher's RankMe; at the end: linear probes of both backbones, and the CKA of the teacher's
held-out features to the base run's (as 1 - CKA, over the floor run's). Per arm: the paired gaps to the base run
against the noise floor F, with the verdicts decided in advance (kept <= 1.5 F, separated > 3 F). Writes
``byol_study.png`` and ``results.json`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import ClassVar

# examples/ on the path, so that `python examples/studies/byol_study.py` finds the helper package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from emascale_examples.selfsup_study import (
    Arm,
    ShapeSSL,
    backbone,
    check_study_arguments,
    pilot,
    run_study,
    study_arguments,
    study_data,
)
from emascale_examples.shapes import view
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad


class ShapeBYOL(ShapeSSL):
    online, teacher = "backbone", "backbone_momentum"
    teachers: ClassVar[dict[str, str]] = {
        "backbone": "backbone_momentum",
        "projection_head": "projection_head_momentum",
    }

    def __init__(self, images: torch.Tensor, size: int, batch_size: int, lr: float, order: int) -> None:
        super().__init__(images, size, batch_size, lr, order)
        self.backbone = backbone()
        self.projection_head = BYOLProjectionHead(64, 256, 64)
        self.prediction_head = BYOLPredictionHead(64, 256, 64)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        views = [view(x, self.size, (0.3, 1.0)) for _ in range(2)]
        predictions = [self.prediction_head(self.projection_head(self.backbone(v))) for v in views]
        with torch.no_grad():
            targets = [self.projection_head_momentum(self.backbone_momentum(v)) for v in views]
        loss = 0.5 * (self.criterion(predictions[0], targets[1]) + self.criterion(predictions[1], targets[0]))
        self.log("loss", loss, batch_size=len(x))
        return loss


def arms(args: argparse.Namespace) -> list[Arm]:
    """Every run of a seed but the base and floor."""
    base, top = args.base_batch, max(args.kappas)
    cells = [Arm(arm, k, {0: k * base}, arm == "rule") for k in args.kappas for arm in ("rule", "no EMA rule")]
    grow = {0: base, **{args.grow_at + i: base * 2 ** (i + 1) for i in range(top.bit_length() - 1)}}
    if not args.every_growth:
        return [*cells, Arm("progressive", top, grow)]
    sharp = {0: base, args.grow_at: top * base}
    return [*cells, Arm("sharp, rule", top, sharp), Arm("sharp, no EMA rule", top, sharp, ema_rule=False),
            Arm("progressive", top, grow), Arm("progressive, no EMA rule", top, grow, ema_rule=False)]  # fmt: skip


def main() -> None:
    parser = study_arguments(__doc__, epochs=12, lr=0.1, momentum=0.99, out_dir="byol_study", grow_at=2)
    args = parser.parse_args()
    check_study_arguments(parser, args)
    hardness = pilot(study_data(args, 0), args.size, epochs=40) if args.pilot else None
    if hardness:
        print("pilot:", hardness, flush=True)
    if args.seeds:
        title = "BYOL on Fashion-MNIST" if args.fashion_mnist else "BYOL"
        run_study(args, ShapeBYOL, arms(args), metrics=("knn_teacher", "knn_online"), shared=args.grow_at + 1,
                  momentum=lambda progress: args.momentum, title=title, figure="byol_study.png", pilot=hardness)  # fmt: skip


if __name__ == "__main__":
    main()
