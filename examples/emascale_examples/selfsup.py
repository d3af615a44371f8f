"""lightly's BYOL and DINO modules, their image data (generated or CIFAR-10), kNN accuracy, command line and fit."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any, Literal, Optional

import lightning as L
import torch
import torchvision
import torchvision.transforms as T
from lightly.loss import DINOLoss, NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback

from .data import pattern_images
from .tracing import Trace, parse_schedule

NORMALIZE = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


class SyntheticImages(Dataset):
    """``n`` 32x32 RGB images of ``classes`` patterns: (PIL image, label) pairs, the same for every seed."""

    def __init__(self, n: int, classes: int = 10, size: int = 32, seed: int = 0) -> None:
        self.images, self.labels = pattern_images(n, classes, size, seed=seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        array = (self.images[index].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        return Image.fromarray(array), int(self.labels[index])


def view_transform(views: str) -> Callable:
    """lightly's published BYOL / DINO augmentations, sized for 32x32 images."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform

    if views == "byol":
        return BYOLTransform(BYOLView1Transform(input_size=32), BYOLView2Transform(input_size=32))
    if views == "dino":
        return DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=2)
    raise ValueError(f"`views` must be one of ['byol', 'dino'], got {views!r}")


class Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


class ImageData(L.LightningDataModule):
    """Train views from lightly's BYOL or DINO transform at 32x32; ``knn_loaders()`` gives plain images."""

    def __init__(
        self,
        views: Literal["byol", "dino"] = "byol",
        batch_size: int = 32,
        n_train: int = 1024,
        n_val: int = 512,
        cifar10_root: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size  # ProgressiveBatchCallback sets this, as BatchSizeFinder would
        self.transform = view_transform(views)
        if cifar10_root:  # pragma: no cover - needs a download
            import torchvision

            self.train = torchvision.datasets.CIFAR10(cifar10_root, train=True, download=True)
            self.val = torchvision.datasets.CIFAR10(cifar10_root, train=False, download=True)
        else:
            self.train, self.val = SyntheticImages(n_train, seed=0), SyntheticImages(n_val, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            Transformed(self.train, self.transform), batch_size=self.batch_size, shuffle=True, drop_last=True
        )

    def knn_loaders(self) -> tuple[DataLoader, DataLoader]:
        plain = T.Compose([T.ToTensor(), NORMALIZE])
        return (
            DataLoader(Transformed(self.train, plain), batch_size=256),
            DataLoader(Transformed(self.val, plain), batch_size=256),
        )


@torch.no_grad()
def knn_accuracy(backbone: torch.nn.Module, data: ImageData, k: int = 20, classes: int = 10) -> float:
    """Top-1 accuracy of a cosine-similarity kNN vote (k neighbours) on the backbone's features."""
    was_training = backbone.training
    backbone.eval()
    train, val = data.knn_loaders()

    def embed(loader):
        features, labels = zip(*[(backbone(x).flatten(1), y) for x, y in loader])
        return torch.nn.functional.normalize(torch.cat(features), dim=1), torch.cat(labels)

    bank, bank_labels = embed(train)
    query, labels = embed(val)
    neighbours = (query @ bank.T).topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(bank_labels[neighbours], classes).sum(1)
    backbone.train(was_training)
    return float(MulticlassAccuracy(num_classes=classes, average="micro")(votes.argmax(1), labels))


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """The command line shared by byol.py and dino.py."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule", type=parse_schedule, default=parse_schedule("0:32,2:64"))
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--out", default=out)
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    return parser.parse_args()


def fit(model: L.LightningModule, data: ImageData, ema: EMAScalingCallback, args: argparse.Namespace) -> L.Trainer:
    """Fit with the batch-size schedule and the EMA callback; print the dynamics per epoch and plot them."""
    trace = Trace(ema)
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
    trace.plot(args.out, f"{type(model).__name__} teacher, progressive batch growth, on the sample clock")
    print(f"wrote {args.out}")
    return trainer


BYOL_TEACHERS = {"backbone": "backbone_momentum", "projection_head": "projection_head_momentum"}


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


DINO_TEACHERS = {"student_backbone": "teacher_backbone", "student_head": "teacher_head"}


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
