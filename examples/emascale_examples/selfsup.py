"""lightly's BYOL and DINO modules, their image data (generated or CIFAR-10), kNN accuracy, the run's record, fit."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
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

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback

from . import probes
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
        return torch.cat(features), torch.cat(labels)

    bank, bank_labels = embed(train)
    query, labels = embed(val)
    backbone.train(was_training)
    return probes.knn_accuracy(bank, bank_labels, query, labels, k=k, classes=classes)


@torch.no_grad()
def teacher_lag(model: torch.nn.Module, teachers: dict[str, str]) -> float:
    """||teacher - online|| / ||online|| over the parameters the teachers average (a relative L2 distance)."""
    gaps, norms = [], []
    for online_name, teacher_name in teachers.items():
        online, teacher = model.get_submodule(online_name), model.get_submodule(teacher_name)
        for o, t in zip(online.parameters(), teacher.parameters(), strict=True):
            gaps.append((t - o).pow(2).sum())
            norms.append(o.pow(2).sum())
    return float(torch.stack(gaps).sum().sqrt() / torch.stack(norms).sum().sqrt())


class RunTrace(Trace):
    """``Trace``'s mechanics, plus what the run does with them.

    Per optimizer step (the rows of ``Trace``): the training loss (mean over the step's micro-batches) and the
    teacher's lag after the step (``teacher_lag``). At the start and at every epoch end: the kNN accuracy of the
    online ``backbone`` and of its teacher (``ema.teachers[backbone]``), with the random state put back afterwards
    so that measuring does not change the run.
    """

    def __init__(self, ema: EMAScalingCallback, data: ImageData, backbone: str) -> None:
        super().__init__(ema)
        self.data, self.backbone = data, backbone
        self.losses: list[float] = []
        self.lags: list[float] = []
        self.knn: list[tuple[int, float, float]] = []  # (samples seen, online accuracy, teacher accuracy)
        self._micro_losses: list[float] = []

    def measure_knn(self, pl_module: L.LightningModule) -> None:
        online = pl_module.get_submodule(self.backbone)
        teacher = pl_module.get_submodule(self.ema.teachers[self.backbone])
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the global generator
            accuracies = knn_accuracy(online, self.data), knn_accuracy(teacher, self.data)
        self.knn.append((self.ema.samples_seen, *accuracies))

    def on_train_start(self, trainer, pl_module):
        self.measure_knn(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning divides the returned loss by accumulate_grad_batches for the backward pass
        self._micro_losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
        rows = len(self.rows)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if len(self.rows) > rows:  # an optimizer step, and the EMA callback (listed first) has moved the teacher
            self.losses.append(sum(self._micro_losses) / len(self._micro_losses))
            self.lags.append(teacher_lag(pl_module, self.ema.teachers))
            self._micro_losses = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.measure_knn(pl_module)

    def print_knn(self) -> None:
        teacher = self.ema.teachers[self.backbone]
        print(f"kNN accuracy (k=20) during the run: samples seen, {self.backbone}, {teacher}")
        for samples, online, teacher_accuracy in self.knn:
            print(f"{samples:>12} {online:>8.4f} {teacher_accuracy:>8.4f}")

    def record(self) -> dict[str, Any]:
        """What the figure draws, as JSON-ready lists: one entry per optimizer step, one per kNN measurement."""
        keys = ("samples_before", "global_batch", "kappa", "rho_hat", "lr", "epoch")
        steps = [
            {**dict(zip(keys, row)), "loss": loss, "teacher_lag": lag}
            for row, loss, lag in zip(self.rows, self.losses, self.lags, strict=True)
        ]
        knn = [{"samples_seen": s, "online": o, "teacher": t} for s, o, t in self.knn]
        return {"backbone": self.backbone, "teacher": self.ema.teachers[self.backbone], "steps": steps, "knn": knn}

    def plot_run(self, path: str, title: str, loss_label: str) -> None:
        """The mechanics (left column, ``Trace.draw``) beside the run (right): loss, kNN accuracy, teacher lag."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(13, 9), layout="constrained")
        grid = fig.add_gridspec(12, 2)
        left = [fig.add_subplot(grid[3 * i : 3 * i + 3, 0]) for i in range(4)]
        right = [fig.add_subplot(grid[4 * i : 4 * i + 4, 1]) for i in range(3)]
        for axis in left[1:] + right:
            axis.sharex(left[0])
        for axis in left[:-1] + right[:-1]:
            axis.tick_params(labelbottom=False)
        self.draw(left)
        left[0].set_title("the mechanics: what the callbacks set at each optimizer step")

        after = [row[0] + row[1] for row in self.rows]  # samples seen once the step is done
        loss, knn, lag = right
        loss.plot(after, self.losses, label="training loss of each optimizer step")
        loss.set_ylabel(loss_label)
        loss.set_title("the run: what the model does")
        samples = [point[0] for point in self.knn]
        teacher = self.ema.teachers[self.backbone]
        knn.plot(samples, [point[1] for point in self.knn], "o-", label=f"online network ({self.backbone})")
        knn.plot(samples, [point[2] for point in self.knn], "s--", label=f"teacher ({teacher})")
        knn.axhline(1 / 10, color="grey", linestyle=":", label="chance (10 classes)")
        knn.set_ylim(0, 1)
        knn.set_ylabel(f"kNN accuracy (k=20)\non {len(self.data.val)} held-out images")
        lag.plot(after, [100 * value for value in self.lags], label="after each optimizer step")
        lag.set_ylabel("teacher lag (%)\n|teacher - online| / |online|")
        lag.set_xlabel("samples seen")
        first_steps: dict[int, tuple[int, int]] = {}  # epoch -> (samples seen, global batch) at its first step
        for before, batch, *_, epoch in self.rows:
            first_steps.setdefault(epoch, (before, batch))
        for (_, old), (before, new) in itertools.pairwise(first_steps.values()):
            if new != old:
                for axis in right:
                    axis.axvline(before, color="grey", linewidth=0.8, label=f"global batch {old} -> {new}")
        for axis in right:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.suptitle(title)
        fig.savefig(path, dpi=120)


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """The command line shared by byol.py and dino.py."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule", type=parse_schedule, default=parse_schedule("0:32,2:64"))
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--out", default=out)
    parser.add_argument("--record", metavar="JSON", help="also write the numbers the figure draws to this file")
    parser.add_argument("--cifar10", metavar="ROOT", help="train on CIFAR-10 from ROOT (downloads it)")
    return parser.parse_args()


def fit(
    model: L.LightningModule,
    data: ImageData,
    ema: EMAScalingCallback,
    args: argparse.Namespace,
    backbone: str,
    loss_label: str,
) -> tuple[L.Trainer, RunTrace]:
    """Fit with the batch-size schedule and the EMA callback; print the dynamics per epoch and plot them.

    ``backbone`` names the online backbone whose kNN accuracy (and its teacher's) is measured every epoch.
    """
    trace = RunTrace(ema, data, backbone)
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
    trace.print_knn()
    title = f"{type(model).__name__} teacher, progressive batch growth, on the sample clock (x: samples seen)"
    trace.plot_run(args.out, title, loss_label)
    print(f"wrote {args.out}")
    if args.record:
        with open(args.record, "w") as file:
            json.dump(trace.record(), file, indent=1)
        print(f"wrote {args.record}")
    return trainer, trace


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
