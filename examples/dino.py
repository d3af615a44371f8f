"""DINO with a batch-size-invariant teacher and loss center: lightly's DINO example, minus its own updates.

    python examples/dino.py [--epochs 4] [--schedule 0:32,2:64] [--out dino.png] [--cifar10 ROOT]

lightly's published DINO example (ResNet-18 backbone) with the ``update_momentum`` lines and the step-counted
``cosine_schedule`` deleted. ``EMAScalingCallback(teachers=...)`` moves the teacher backbone and head once per
optimizer step with the momentum's cosine (0.996 -> 1) on samples seen, raised to kappa, and
``momentum_attributes`` scales the loss center's own EMA (``DINOLoss.center_momentum``, 0.9, updated on
every forward) by the same rule. Generated images by default (CIFAR-10 with --cifar10); two global 32x32 and
two local 16x16 crops. Prints a kNN accuracy of the teacher backbone and writes a PNG of the dynamics.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torchvision
from emascale_examples.selfsup import ImageData, fit, knn_accuracy, parse_args
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad

from lightning_emascale import EMAScalingCallback

TEACHERS = {"student_backbone": "teacher_backbone", "student_head": "teacher_head"}


class DINO(L.LightningModule):
    def __init__(self, lr: float = 0.01, output_dim: int = 2048) -> None:
        super().__init__()
        self.lr = lr
        resnet = torchvision.models.resnet18()
        backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(512, 512, 64, output_dim, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(512, 512, 64, output_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=output_dim, warmup_teacher_temp_epochs=1)

    def forward(self, x):
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_idx):
        # deleted: momentum = cosine_schedule(self.current_epoch, max_epochs, 0.996, 1)
        # deleted: update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        # deleted: update_momentum(self.student_head, self.teacher_head, m=momentum)
        views = batch[0]
        teacher_out = [self.forward_teacher(view) for view in views[:2]]  # global views only
        student_out = [self.forward(view) for view in views]
        loss = self.criterion(teacher_out, student_out, epoch=self.current_epoch)
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_after_backward(self):
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


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
        teachers=TEACHERS,
        momentum_attributes={"criterion.center_momentum": 0.9},
    )
    model = DINO()
    trainer = fit(model, data, ema, args)
    print(f"loss center momentum after the last step: {trainer.callback_metrics['ema/criterion.center_momentum']:.4f}")
    print(f"kNN accuracy (k=20): teacher backbone {knn_accuracy(model.teacher_backbone, data):.4f} (chance 0.1)")


if __name__ == "__main__":
    main()
