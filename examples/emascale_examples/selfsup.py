"""lightly's BYOL and DINO modules, their image data (generated or CIFAR-10), kNN accuracy, the run's record, fit."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import textwrap
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

    Per optimizer step (the rows of ``Trace``): the training loss (mean over the step's micro-batches), any other
    number the ``training_step`` returns beside ``"loss"`` (``extras``, e.g. DINO's teacher entropy; mean over the
    micro-batches) and the teacher's lag after the step (``teacher_lag``). At the start and at every epoch end: the
    kNN accuracy of the online ``backbone`` and of its teacher (``ema.teachers[backbone]``), with the random state
    put back afterwards so that measuring does not change the run.
    """

    def __init__(self, ema: EMAScalingCallback, data: ImageData, backbone: str) -> None:
        super().__init__(ema)
        self.data, self.backbone = data, backbone
        self.losses: list[float] = []
        self.extras: dict[str, list[float]] = {}
        self.lags: list[float] = []
        self.knn: list[tuple[int, float, float]] = []  # (samples seen, online accuracy, teacher accuracy)
        self._micro_losses: list[float] = []
        self._micro_extras: dict[str, list[float]] = {}

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
        for key, value in outputs.items():
            if key != "loss":
                self._micro_extras.setdefault(key, []).append(float(value))
        rows = len(self.rows)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if len(self.rows) > rows:  # an optimizer step, and the EMA callback (listed first) has moved the teacher
            self.losses.append(sum(self._micro_losses) / len(self._micro_losses))
            for key, values in self._micro_extras.items():
                self.extras.setdefault(key, []).append(sum(values) / len(values))
            self.lags.append(teacher_lag(pl_module, self.ema.teachers))
            self._micro_losses, self._micro_extras = [], {}

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
        extras = [dict(zip(self.extras, values)) for values in zip(*self.extras.values())] or [{}] * len(self.rows)
        steps = [
            {**dict(zip(keys, row)), "loss": loss, **extra, "teacher_lag": lag}
            for row, loss, extra, lag in zip(self.rows, self.losses, extras, self.lags, strict=True)
        ]
        knn = [{"samples_seen": s, "online": o, "teacher": t} for s, o, t in self.knn]
        return {"backbone": self.backbone, "teacher": self.ema.teachers[self.backbone], "steps": steps, "knn": knn}

    def plot_run(
        self, path: str, title: str, loss_label: str, extra_labels: Optional[dict[str, str]] = None, note: str = ""
    ) -> None:
        """The mechanics (left column, ``Trace.draw``) beside the run (right): loss, kNN accuracy, teacher lag.

        ``extra_labels`` plots those ``extras`` on the loss axis under those labels; ``note`` is a caption under the
        figure (what the run shows, and what it does not).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        caption = note.count("\n") + 1 if note else 0  # lines
        caption_height = caption * 9 * 1.35 / 72 + 0.15 if note else 0.0  # inches, at 9 points
        fig = plt.figure(figsize=(13, 9 + caption_height), layout="constrained")
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
        for key, label in (extra_labels or {}).items():
            loss.plot(after, self.extras[key], linewidth=1, label=label)
        if extra_labels:  # room above the lines for the longer legend
            bottom, top = loss.get_ylim()
            loss.set_ylim(bottom, top + 0.6 * (top - bottom))
        loss.set_ylabel(loss_label)
        loss.set_title("the run: what the model does")
        samples = [point[0] for point in self.knn]
        teacher = self.ema.teachers[self.backbone]
        knn.plot(samples, [point[1] for point in self.knn], "o-", label=f"online network ({self.backbone})")
        knn.plot(samples, [point[2] for point in self.knn], "s--", label=f"teacher ({teacher})")
        knn.axhline(self.knn[0][1], color="C2", linestyle=":", label=f"untrained backbone ({self.knn[0][1]:.2f})")
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
        if note:  # the caption below the panels, in the height added for it
            share = caption_height / (9 + caption_height)
            fig.text(0.01, 0.005, note, fontsize=9, va="bottom", ha="left")
            fig.get_layout_engine().set(rect=(0, share, 1, 1 - share))
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


def knn_reading(trace: RunTrace, generated: bool, study: str) -> str:
    """What the kNN panel shows, in words and the run's numbers. On the generated images (``generated``) an
    untrained ResNet-18 already scores high; if the run ends below its start, say so and where to look instead
    (``study``: the evidence study of the same method)."""
    (_, start, _), (_, online, teacher) = trace.knn[0], trace.knn[-1]
    online_name, teacher_name = trace.backbone, trace.ema.teachers[trace.backbone]
    numbers = f"{start:.2f} at the start, {online:.2f} ({online_name}) and {teacher:.2f} ({teacher_name}) at the end"
    if not generated:
        return f"kNN accuracy: {numbers}."
    text = f"kNN accuracy: {numbers}. The start is an untrained ResNet-18's"
    if start >= 0.5:
        text += (
            ": each class of these generated images is one fixed colour pattern at a random shift, which random"
            " features already separate well (chance 0.10)."
        )
    else:
        text += " (chance 0.10)."
    if max(online, teacher) < start:
        text += (
            f" {len(trace.rows)} optimizer steps on {len(trace.data.train)} images do not learn better features than"
            " these random ones, so the kNN falls. This demo shows the mechanics (left) and the teacher trailing"
            f" the online network (bottom right), not feature learning: for that see examples/studies/{study}"
            " (generated shapes that random features do not separate) or --cifar10."
        )
    return text


def fit(
    model: L.LightningModule,
    data: ImageData,
    ema: EMAScalingCallback,
    args: argparse.Namespace,
    backbone: str,
    loss_label: str,
    study: str,
    extra_labels: Optional[dict[str, str]] = None,
    loss_reading: Optional[Callable[[RunTrace], str]] = None,
) -> tuple[L.Trainer, RunTrace]:
    """Fit with the batch-size schedule and the EMA callback; print the dynamics per epoch and plot them.

    ``backbone`` names the online backbone whose kNN accuracy (and its teacher's) is measured every epoch;
    ``extra_labels`` the ``extras`` drawn on the loss axis. What the run shows (``loss_reading`` of the trace, if
    given, and ``knn_reading``) is printed and written under the figure.
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
    readings = [*([loss_reading(trace)] if loss_reading else []), knn_reading(trace, not args.cifar10, study)]
    print("\nwhat the run shows:")
    for text in readings:
        print(textwrap.fill(text, width=118, initial_indent="- ", subsequent_indent="  "))
    note = "\n".join(textwrap.fill(text, width=185) for text in readings)
    title = f"{type(model).__name__} teacher, progressive batch growth, on the sample clock (x: samples seen)"
    trace.plot_run(args.out, title, loss_label, extra_labels, note)
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
        targets = self.target_entropies(teacher_out)  # added for the figure, before the loss moves the centre
        loss = self.criterion(teacher_out, student_out, epoch=self.current_epoch)
        self.log("loss", loss, prog_bar=True)
        # the loss is the cross-entropy H(teacher targets, student) = H(targets) + KL(targets || student)
        return {"loss": loss, **targets, "kl": float(loss.detach()) - targets["teacher_entropy"]}

    @torch.no_grad()
    def target_entropies(self, teacher_out: list[torch.Tensor]) -> dict[str, float]:
        """Not in lightly's example: the targets the loss makes of the teacher's output (centred, sharpened at the
        teacher temperature of this epoch), as ``probes.entropies`` measures them: the mean per-image entropy and
        the entropy of their batch mean, in nats (both log(output_dim) for uniform targets); and the per-image
        entropy the same outputs would give without the centre subtracted (``uncentred_entropy``)."""
        criterion, epoch = self.criterion, self.current_epoch
        warming = epoch < criterion.warmup_teacher_temp_epochs
        temperature = float(criterion.teacher_temp_schedule[epoch]) if warming else criterion.teacher_temp
        logits = torch.cat(teacher_out)
        per_image, batch_mean = probes.entropies(logits, temperature, criterion.center)
        uncentred, _ = probes.entropies(logits, temperature, torch.zeros_like(criterion.center))
        return {"teacher_entropy": per_image, "teacher_mean_entropy": batch_mean, "uncentred_entropy": uncentred}

    def on_after_backward(self):
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
