"""Datasets, augmentation and loaders for training and evaluation (ImageFolder, CIFAR, WebDataset, the demo set)."""

from .augment import BatchAugment, MixUpCutMix
from .config import DataConfig
from .loaders import (
    EvalLoader,
    Loaders,
    TooManyUnreadableImages,
    TrainStream,
    build_eval_loader,
    build_loaders,
)
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "BatchAugment",
    "DataConfig",
    "EvalLoader",
    "Loaders",
    "MixUpCutMix",
    "TrainStream",
    "TooManyUnreadableImages",
    "build_eval_loader",
    "build_eval_transform",
    "build_loaders",
    "build_train_transform",
]
