"""BYOL with a batch-size-invariant teacher: lightly's BYOL example, minus its own momentum update.

    python examples/byol.py [--epochs 4] [--schedule 0:32,2:64] [--out byol.png] [--cifar10 ROOT]

The module below is lightly's published BYOL example (ResNet-18 backbone) with the two ``update_momentum``
lines and the step-counted ``cosine_schedule`` deleted. ``EMAScalingCallback(teachers=...)`` moves the
momentum backbone and projection head instead, once per optimizer step, with the momentum's cosine (0.99 -> 1)
evaluated on samples seen and raised to kappa; ``ProgressiveBatchCallback`` grows the batch mid-run. The
images are generated (or CIFAR-10 with --cifar10). The progress bar shows kappa, rho-hat and the batch; at the
end the script prints a kNN accuracy of the backbone and writes a PNG of the dynamics.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torchvision
from emascale_examples.selfsup import ImageData, fit, knn_accuracy, parse_args
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad

from lightning_emascale import EMAScalingCallback

TEACHERS = {"backbone": "backbone_momentum", "projection_head": "projection_head_momentum"}


class BYOL(L.LightningModule):
    def __init__(self, lr: float = 0.06) -> None:
        super().__init__()
        self.lr = lr
        resnet = torchvision.models.resnet18()
        self.backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = BYOLProjectionHead(512, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_step(self, batch, batch_idx):
        # deleted: momentum = cosine_schedule(self.current_epoch, max_epochs, 0.996, 1)
        # deleted: update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        # deleted: update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x0, x1 = batch[0]
        p0, z0 = self.forward(x0), self.forward_momentum(x0)
        p1, z1 = self.forward(x1), self.forward_momentum(x1)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


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
        teachers=TEACHERS,
    )
    model = BYOL()
    fit(model, data, ema, args)
    print(
        f"kNN accuracy (k=20): backbone {knn_accuracy(model.backbone, data):.4f}, "
        f"momentum backbone {knn_accuracy(model.backbone_momentum, data):.4f} (chance 0.1)"
    )


if __name__ == "__main__":
    main()
