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

import argparse
import copy

import lightning as L
import torch
import torchvision
from dynamics import Trace
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from selfsup import ImageData, knn_accuracy

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback

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


def parse_schedule(text: str) -> dict[int, int]:
    return {int(epoch): int(size) for epoch, size in (item.split(":") for item in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule", type=parse_schedule, default=parse_schedule("0:32,2:64"))
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--out", default="byol.png")
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    args = parser.parse_args()

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
    trace = Trace(ema)
    model = BYOL()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[ProgressiveBatchCallback(args.schedule), ema, trace],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=data)
    print()
    trace.print_epochs()
    print(f"total: {ema.samples_seen} samples in {ema.optimizer_steps} optimizer steps, progress {ema.progress:.3f}")
    print(
        f"kNN accuracy (k=20): backbone {knn_accuracy(model.backbone, data):.4f}, "
        f"momentum backbone {knn_accuracy(model.backbone_momentum, data):.4f} (chance 0.1)"
    )
    trace.plot(args.out, "BYOL teacher, progressive batch growth, on the sample clock")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
