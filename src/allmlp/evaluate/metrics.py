"""Classification metrics: top-k, per-class accuracy, and ImageNet ReaL (Beyer et al., 2020).

Counts are kept as tensors so that processes can sum them (`counts()` -> all-reduce -> `from_counts`); the
fractions are computed only at the end, over every image of every process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

import torch

_VAL_INDEX = re.compile(r"ILSVRC2012_val_(\d{8})")


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Per image, whether the target is among the top-k logits, for each k (k is capped at the class count)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, classes) and targets (N,), got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return [hits[:, : min(k, logits.shape[1])].any(dim=1) for k in ks]


class Accuracy:
    """Accumulates top-1, top-5 and per-class hits over batches."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.top1 = torch.zeros((), dtype=torch.long, device=device)
        self.top5 = torch.zeros((), dtype=torch.long, device=device)
        self.per_class_correct = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.per_class_total = torch.zeros(num_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns the top-1 predictions."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the metric was set up for {self.num_classes}")
        top1, top5 = topk_correct(logits, targets, (1, 5))
        self.top1 += top1.sum()
        self.top5 += top5.sum()
        self.per_class_total += torch.bincount(targets, minlength=self.num_classes)
        self.per_class_correct += torch.bincount(targets[top1], minlength=self.num_classes)
        return logits.argmax(dim=1)

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the counts of every process (pass distributed.all_reduce_sum)."""
        packed = torch.cat([self.top1[None], self.top5[None], self.per_class_correct, self.per_class_total])
        all_reduce(packed)
        c = self.num_classes
        self.top1, self.top5 = packed[0], packed[1]
        self.per_class_correct, self.per_class_total = packed[2 : 2 + c], packed[2 + c :]

    @property
    def count(self) -> int:
        return int(self.per_class_total.sum())

    def result(self) -> dict:
        """eval_top1 / eval_top5 as fractions in [0, 1]; per_class lists the accuracy of each class (None: absent)."""
        n = max(self.count, 1)
        per_class = [
            (c / t if t else None)
            for c, t in zip(self.per_class_correct.tolist(), self.per_class_total.tolist(), strict=True)
        ]
        return {
            "eval_top1": int(self.top1) / n,
            "eval_top5": int(self.top5) / n,
            "eval_images": self.count,
            "per_class": per_class,
        }


def load_real_labels(path: str | os.PathLike) -> list[list[int]]:
    """ReaL labels: a JSON list with, for each of the 50,000 ImageNet validation images in file order, its list
    of correct class indices (empty where the raters found none; those images are left out of ReaL accuracy)."""
    with open(path) as f:
        labels = json.load(f)
    if not isinstance(labels, list) or not all(
        isinstance(x, list) and all(isinstance(i, int) for i in x) for x in labels
    ):
        raise ValueError(f"{path}: expected a JSON list of lists of class indices (the ReaL real.json)")
    return labels


def imagenet_val_index(path: str | os.PathLike) -> int:
    """0-based index of an ImageNet validation file from its name (ILSVRC2012_val_00000001.JPEG -> 0)."""
    match = _VAL_INDEX.search(os.path.basename(path))
    if match is None:
        raise ValueError(f"{path}: not an ImageNet validation file name (ILSVRC2012_val_NNNNNNNN.JPEG)")
    return int(match.group(1)) - 1


class RealAccuracy:
    """Top-1 against the ReaL labels: a prediction is right when it is any of the image's ReaL labels."""

    def __init__(self, real_labels: list[list[int]]):
        self.labels = real_labels
        self.correct = 0
        self.total = 0

    def update(self, predictions: Sequence[int], indices: Sequence[int]) -> None:
        for prediction, index in zip(predictions, indices, strict=True):
            if not 0 <= index < len(self.labels):
                raise ValueError(f"image index {index} is outside the ReaL labels (0..{len(self.labels) - 1})")
            if self.labels[index]:
                self.total += 1
                self.correct += int(prediction) in self.labels[index]

    def result(self) -> dict:
        return {"real_top1": self.correct / max(self.total, 1), "real_images": self.total}
