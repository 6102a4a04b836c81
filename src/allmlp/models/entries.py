"""What a registry entry says: the architecture and config of a named model, how its images are prepared and
where its published weights come from. Each family module lists its entries (`ENTRIES`); `registry` collects them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

IN1K = "ImageNet-1k from scratch"


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for weights of this entry (pixels in [0, 1] are normalised by mean/std)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"
    crop_pct: float  # 1.0: plain resize to the input size; < 1: resize to size / crop_pct, centre crop
    note: str = ""


@dataclass(frozen=True)
class WeightRelease:
    """One published weight set that fits an entry; `create_model(name, pretrained=tag)` fetches it (weights.hub).

    `file_name` is the file's path in the cache and on a mirror: the host's URL path, so that a cache folder
    served over HTTP is a mirror. `url` is empty where the host needs a browser (`page`). `size` and `sha256`
    are None where they are not known: the cache then checks the byte count the server announced and the format.
    """

    tag: str
    source: str
    num_classes: int
    trained_on: str
    top1: float | None = None  # ImageNet-1k top-1 as published, where the release is an ImageNet-1k classifier
    url: str = ""
    file_name: str = ""
    size: int | None = None
    sha256: str | None = None
    page: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: type[nn.Module]
    config: Mapping
    preprocessing: Preprocessing
    releases: tuple[WeightRelease, ...] = field(default_factory=tuple)
    paper: str = ""


def hosted(tag: str, source: str, classes: int, trained_on: str, top1: float | None, url: str) -> WeightRelease:
    """A release a program can download: its cache path is the URL's path."""
    return WeightRelease(tag, source, classes, trained_on, top1, url=url, file_name=url.split("/", 3)[3])


def imagenet_preprocessing(crop_pct: float, note: str) -> Preprocessing:
    return Preprocessing(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=crop_pct, note=note
    )
