"""What the self-supervised studies measure on frozen features: kNN and linear-probe accuracy, effective rank
(RankMe), linear CKA between two runs' features, and the entropies that show a DINO teacher collapsing.
Plain functions of tensors."""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The backbone's features of ``images`` (centred on 0.5, as the training views are) in eval mode; the
    backbone's mode is restored after."""
    was_training = backbone.training
    backbone.eval()
    features = torch.cat([backbone(part - 0.5).flatten(1) for part in images.split(chunk)])
    backbone.train(was_training)
    return features


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, labels: torch.Tensor,
                 k: int = 20, classes: Optional[int] = None) -> float:  # fmt: skip
    """Top-1 accuracy of a cosine-similarity vote among the ``k`` nearest ``bank`` features (``classes``: the
    number of classes, by default the bank's largest label + 1)."""
    bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    neighbours = (query @ bank.T).topk(k, dim=1).indices
    votes = F.one_hot(bank_labels[neighbours], classes or int(bank_labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean())


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 steps: int = 300, weight_decay: float = 1e-4) -> float:  # fmt: skip
    """Test accuracy of a multinomial logistic regression on standardized frozen features (full-batch L-BFGS,
    deterministic)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(train_labels.max()) + 1
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_labels).float().mean())


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """The effective rank of ``features`` (Garrido et al., 2023): exp of the entropy of the normalized singular
    values. Between 1 (every image on one direction) and the feature dimension."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + eps
    return float((-(p * p.log()).sum()).exp())


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment of two runs' features of the same images (Kornblith et al., 2019): 1 for
    features equal up to a rotation and scale, near 0 for unrelated ones (about d / n for d features of n
    random images)."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    cross = (b.T @ a).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def entropies(logits: torch.Tensor, temperature: float, centre: torch.Tensor) -> tuple[float, float]:
    """A DINO teacher's output as its loss turns it into targets, ``softmax((logits - centre) / temperature)``: the mean
    per-image entropy and the entropy of the batch-mean distribution, in nats.

    Collapse to one dimension drives both to 0; collapse to the uniform drives both to log(dimension); a healthy
    teacher has a low per-image entropy and a high batch-mean one.
    """
    p = F.softmax((logits - centre.reshape(-1)) / temperature, dim=1)
    per_image = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
    mean = p.mean(0)
    return float(per_image), float(-(mean * mean.clamp_min(1e-12).log()).sum())
