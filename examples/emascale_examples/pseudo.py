"""Pseudo-labelling with an EMA teacher (pseudo_label.py, studies/pseudo_label_study.py): the data, the student
module, the callback that counts the unlabelled stream, and the probe that scores the teacher's pseudo-labels."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, SampleClockLR, WarmupCosine


def few_label_clusters(
    seed: int, labels_per_class: int = 4, unlabeled: int = 4096, classes: int = 10, dim: int = 32
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Overlapping Gaussian clusters in ``dim`` dimensions: a few labelled points per class (where a classifier
    trained on them alone stays poor), a large unlabelled pool (its labels are kept for scoring only) and a
    validation set. ``seed`` draws everything but the cluster centres' layout."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(7)) * 0.7
    g = torch.Generator().manual_seed(1000 + seed)

    def draw(n: int, balanced: bool = False) -> TensorDataset:
        y = (
            torch.arange(classes).repeat_interleave(n // classes)
            if balanced
            else torch.randint(0, classes, (n,), generator=g)
        )
        return TensorDataset(centres[y] + torch.randn(len(y), dim, generator=g), y)

    return draw(labels_per_class * classes, balanced=True), draw(unlabeled), draw(2048)


def few_label_fashion_mnist(
    seed: int, labeled: int = 1000, unlabeled: int = 8192, val: int = 2048, folder: Optional[str] = None
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Fashion-MNIST as flat, standardized pixel vectors: ``labeled`` training images (the same number per class),
    a pool of ``unlabeled`` other training images (their labels are kept for scoring only) and ``val`` test
    images, each drawn at random by ``seed``."""
    from emascale_examples import fashion_mnist

    classes = len(fashion_mnist.CLASSES)
    if labeled % classes:
        raise ValueError(f"labeled must be a multiple of the {classes} classes, got {labeled}")
    images, labels = fashion_mnist.load("train", folder)
    smallest = int(labels.bincount().min())
    if not 0 < labeled // classes <= smallest or not 0 < unlabeled <= len(labels) - labeled:
        raise ValueError(f"labeled must be in [{classes}, {classes * smallest}] and unlabeled in [1, {len(labels)} -"
                         f" labeled], got {labeled} and {unlabeled}")  # fmt: skip
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen = torch.cat([order[labels[order] == c][: labeled // classes] for c in range(classes)])
    rest = order[~torch.isin(order, chosen)][:unlabeled]
    x_val, y_val, _ = fashion_mnist.subset("test", val, seed, folder)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return ((x - 0.2860) / 0.3530).flatten(1)  # the training split's pixel mean and standard deviation

    return (TensorDataset(flat(images[chosen]), labels[chosen]), TensorDataset(flat(images[rest]), labels[rest]),
            TensorDataset(flat(x_val), y_val))  # fmt: skip


class PseudoLabeler(L.LightningModule):
    """A student MLP trained on the labelled batch plus the unlabelled batch's confident pseudo-labels.

    The teacher is the EMA of the student (``teacher``: an ``EMAScalingCallback``, read with
    ``functional_call``). Each optimizer step sees ``batch_size`` unlabelled and ``batch_size // 4`` labelled
    samples (cycled), both noised (a weak augmentation); SGD with momentum, warm-up and cosine on samples seen.
    """

    def __init__(
        self,
        labeled: TensorDataset,
        unlabeled: TensorDataset,
        batch_size: int = 32,
        lr: float = 0.05,
        threshold: float = 0.8,
        noise: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.labeled, self.unlabeled = labeled, unlabeled
        self.batch_size, self.lr, self.threshold, self.noise, self.seed = batch_size, lr, threshold, noise, seed
        dim = labeled.tensors[0].shape[1]
        self.net = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        self.teacher: Optional[EMAScalingCallback] = None
        self.order = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> CombinedLoader:
        x_u = self.unlabeled.tensors[0]  # the pool's labels stay out of training
        labeled_batch = max(1, self.batch_size // 4)
        steps, labeled_steps = len(x_u) // self.batch_size, -(-len(self.labeled) // labeled_batch)
        if steps < labeled_steps:  # the combined loader would run the epoch on the labelled stream, cycling the pool
            raise ValueError(
                f"batch {self.batch_size} gives {steps} unlabelled batches per epoch but {labeled_steps} labelled ones"
                f" ({len(self.labeled)} labels, {labeled_batch} per batch): an epoch must be one pass over the pool,"
                " so use more unlabelled samples or a larger batch"
            )
        loaders = {
            "labeled": DataLoader(self.labeled, batch_size=labeled_batch, shuffle=True,
                                  generator=self.order, drop_last=False),
            "unlabeled": DataLoader(TensorDataset(x_u), batch_size=self.batch_size, shuffle=True,
                                    generator=self.order, drop_last=True),
        }  # fmt: skip
        return CombinedLoader(loaders, mode="max_size_cycle")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x_l, y_l = batch["labeled"]
        (x_u,) = batch["unlabeled"]
        assert self.teacher is not None, "set `module.teacher` to the EMAScalingCallback"
        with torch.no_grad():  # the teacher: the EMA weights, without touching the student's
            confidence, pseudo = self.teacher.functional_call(self, (x_u,)).softmax(1).max(1)
        mask = (confidence >= self.threshold).float()
        supervised = nn.functional.cross_entropy(self(x_l + self.noise * torch.randn_like(x_l)), y_l)
        student = self(x_u + self.noise * torch.randn_like(x_u))
        unsupervised = (nn.functional.cross_entropy(student, pseudo, reduction="none") * mask).mean()
        self.log_dict({"supervised": supervised, "unsupervised": unsupervised, "mask": mask.mean()}, batch_size=1)
        return supervised + unsupervised

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.1, final=0.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class UnlabeledEMA(EMAScalingCallback):
    """κ counted on the unlabelled stream: the batch holds a labelled and an unlabelled part of other sizes."""

    def batch_size_of(self, batch: Any) -> int:
        return len(batch["unlabeled"][0])


class PseudoLabelProbe(L.Callback):
    """At the start and after every epoch: samples seen (unlabelled), the teacher's pseudo-label accuracy on the
    whole unlabelled pool, the share it labels confidently and how accurate those are, the share of the pool it
    gives its most common label (``top_label``: about 0.1 for ten balanced classes, 1 for a teacher collapsed to
    one class), validation accuracy of the teacher and the student, and the L2 norm of the student's parameters
    (``student_norm``: it grows by orders of magnitude when SGD diverges)."""

    def __init__(self, teacher: EMAScalingCallback, unlabeled: TensorDataset, val: TensorDataset) -> None:
        self.teacher, self.unlabeled, self.val = teacher, unlabeled, val
        keys = ("samples", "pseudo_acc", "confident", "confident_acc", "top_label", "teacher_acc", "student_acc",
                "student_norm")  # fmt: skip
        self.records: dict[str, list[float]] = {key: [] for key in keys}

    @torch.no_grad()
    def record(self, pl_module: PseudoLabeler) -> None:
        x_u, y_u = self.unlabeled.tensors
        probs = self.teacher.functional_call(pl_module, (x_u,)).softmax(1)
        confidence, pseudo = probs.max(1)
        confident = confidence >= pl_module.threshold
        x_v, y_v = self.val.tensors
        self.records["samples"].append(self.teacher.samples_seen)
        self.records["pseudo_acc"].append(float((pseudo == y_u).float().mean()))
        self.records["confident"].append(float(confident.float().mean()))
        self.records["confident_acc"].append(
            float((pseudo[confident] == y_u[confident]).float().mean()) if confident.any() else 0.0
        )
        self.records["top_label"].append(float(pseudo.bincount().max()) / len(pseudo))
        self.records["teacher_acc"].append(
            float((self.teacher.functional_call(pl_module, (x_v,)).argmax(1) == y_v).float().mean())
        )
        self.records["student_acc"].append(float((pl_module(x_v).argmax(1) == y_v).float().mean()))
        self.records["student_norm"].append(float(torch.cat([p.flatten() for p in pl_module.parameters()]).norm()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(pl_module)  # type: ignore[arg-type]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(pl_module)  # type: ignore[arg-type]


def fit_pseudo_labeler(
    data: tuple[TensorDataset, TensorDataset, TensorDataset],
    batch_size: int,
    epochs: int,
    ema_options: dict[str, Any],
    lr: float,
    seed: int,
    order: int,
    callbacks: tuple[L.Callback, ...] = (),
    threshold: float = 0.8,
) -> tuple[UnlabeledEMA, PseudoLabelProbe]:
    """One pseudo-labelling run with an ``UnlabeledEMA(**ema_options)`` teacher; returns it and the probe.

    Every batch size used must divide the unlabelled pool, so that an epoch is the whole pool at any size and
    the run sees ``epochs`` x the pool (the total the sample clock needs: a combined loader hides it).
    """
    labeled, unlabeled, val = data
    ema = UnlabeledEMA(**ema_options, total_samples=epochs * len(unlabeled))
    torch.manual_seed(seed)  # the initial weights
    module = PseudoLabeler(labeled, unlabeled, batch_size=batch_size, lr=lr, threshold=threshold, seed=order)
    module.teacher = ema
    probe = PseudoLabelProbe(ema, unlabeled, val)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[ema, probe, *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
    )  # fmt: skip
    torch.manual_seed(order)  # the augmentation noise
    trainer.fit(module)
    assert ema.samples_seen == epochs * len(unlabeled), (ema.samples_seen, epochs * len(unlabeled))
    return ema, probe
