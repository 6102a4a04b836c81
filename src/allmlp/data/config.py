"""The `data` section of a recipe: which dataset, how to augment it, how to evaluate it. Checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .permute import PERMUTE_KINDS
from .transforms import EVAL_PRESETS

KINDS = ("demo", "imagefolder", "cifar10", "cifar100", "webdataset")
# torchvision's RandAugment draws magnitudes from 31 bins: 0 (identity) .. 30 (strongest)
MAX_RANDAUGMENT_MAGNITUDE = 30


def _doc(default, doc: str):
    """A field with its `--help` text in the metadata (where the recipe layer reads it)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    """Dataset and augmentation settings. Paths are checked when the loaders are built, not here, so that a recipe
    naming a dataset that lives on another machine can still be read, printed and overridden."""

    kind: str = _doc("demo", "demo | imagefolder | cifar10 | cifar100 | webdataset")
    root: str | None = _doc(None, "imagefolder: folder holding train/ and val/; cifar: folder of the python download")
    train_split: str = _doc("train", "imagefolder: subfolder of root with the training images")
    val_split: str = _doc("val", "imagefolder: subfolder of root with the evaluation images")
    train_shards: str | None = _doc(None, "webdataset: train shard pattern, e.g. /data/train-{000000..000146}.tar")
    val_shards: str | None = _doc(None, "webdataset: evaluation shard pattern")
    num_classes: int | None = _doc(None, "webdataset: number of classes (null: counted from the train shards)")
    train_samples: int | None = _doc(None, "webdataset: train samples per epoch (null: counted from the shards)")
    shuffle_buffer: int = _doc(1000, "webdataset: samples each stream holds for shuffling")
    num_workers: int = _doc(2, "loader worker processes for per-image work (files, shards, RandAugment)")
    inception_crop: bool = _doc(False, "train: Inception crop (RandomResizedCrop, aspect 3/4..4/3), else resize")
    crop_scale: tuple[float, float] = _doc((0.08, 1.0), "train: [min, max] area fraction of the Inception crop")
    hflip: bool = _doc(False, "train: random horizontal flip")
    shift_pixels: int = _doc(0, "train: random translation by up to this many pixels (zero padding)")
    randaugment_layers: int = _doc(0, "train: RandAugment operations per image (0: off)")
    randaugment_magnitude: int = _doc(9, "train: RandAugment magnitude, 0..30")
    random_erasing: float = _doc(0.0, "train: probability of erasing a random box with noise (after normalising)")
    mixup_alpha: float = _doc(0.0, "train: MixUp Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = _doc(0.0, "train: CutMix Beta(alpha, alpha) (0: off); with MixUp, one of them per batch")
    mix_prob: float = _doc(1.0, "train: probability that a batch is mixed")
    eval_preset: str = _doc("resize", "eval: resize | resize_crop | resmall_crop")
    crop_pct: float | None = _doc(None, "eval: crop fraction of the crop presets (null: the model's, or 0.875)")
    max_bad_fraction: float = _doc(0.01, "stop when more than this fraction of images is unreadable")
    permute: str | None = _doc(None, "train and eval: null | patches | pixels, one fixed shuffle of every image")
    permute_seed: int = _doc(0, "seed of the fixed permutation (independent of train.seed)")
    permute_patch: int | None = _doc(None, "permute=patches: the patch size (a Mixer's patch_size)")

    def __post_init__(self) -> None:
        _choice(self, "kind", KINDS)
        _choice(self, "eval_preset", EVAL_PRESETS)
        for name in ("root", "train_shards", "val_shards"):
            _optional_str(self, name)
        for name in ("train_split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, "a non-empty folder name", getattr(self, name))
        for name in ("inception_crop", "hflip"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "true or false", getattr(self, name))
        _int(self, "num_workers", 0)
        _int(self, "shift_pixels", 0)
        _int(self, "randaugment_layers", 0)
        _int(self, "randaugment_magnitude", 0, MAX_RANDAUGMENT_MAGNITUDE)
        _int(self, "shuffle_buffer", 1)
        _int(self, "num_classes", 1, optional=True)
        _int(self, "train_samples", 1, optional=True)
        if self.permute is not None and self.permute not in PERMUTE_KINDS:
            _fail("permute", f"null or one of {', '.join(PERMUTE_KINDS)}", self.permute)
        _int(self, "permute_seed", 0)
        _int(self, "permute_patch", 1, optional=True)
        if self.permute == "patches" and self.permute_patch is None:
            _fail("permute_patch", "the patch size (an integer >= 1) when data.permute=patches", None)
        for name in ("random_erasing", "mix_prob", "max_bad_fraction"):
            _number(self, name, 0.0, 1.0)
        for name in ("mixup_alpha", "cutmix_alpha"):
            _number(self, name, 0.0, None)
        if self.crop_pct is not None:
            _number(self, "crop_pct", 0.0, 1.0)
            if self.crop_pct == 0.0:
                _fail("crop_pct", "a number in (0, 1] or null", self.crop_pct)
        scale = self.crop_scale
        if not (
            isinstance(scale, list | tuple)
            and len(scale) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale)
            and 0.0 < scale[0] <= scale[1] <= 1.0
        ):
            _fail("crop_scale", "[min, max] area fractions with 0 < min <= max <= 1", scale)
        self.crop_scale = (float(scale[0]), float(scale[1]))

    @property
    def per_sample_augmentation(self) -> bool:
        """Photometric augmentations are per-image torchvision ops, so they run in loader workers for every kind."""
        return self.randaugment_layers > 0 or self.random_erasing > 0.0


def _fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"data.{name} must be {expected}, got {got!r}")


def _choice(cfg: DataConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        _fail(name, f"one of {', '.join(choices)}", getattr(cfg, name))


def _optional_str(cfg: DataConfig, name: str) -> None:
    value = getattr(cfg, name)
    if value is not None and (not isinstance(value, str) or not value):
        _fail(name, "a non-empty path or null", value)


def _int(cfg: DataConfig, name: str, low: int, high: int | None = None, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    in_range = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or value)
    if not in_range:
        bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        _fail(name, bound + (" or null" if optional else ""), value)


def _number(cfg: DataConfig, name: str, low: float, high: float | None) -> None:
    value = getattr(cfg, name)
    is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (is_number and low <= value <= (high if high is not None else value)):
        _fail(name, f"a number in [{low}, {high}]" if high is not None else f"a number >= {low}", value)
    setattr(cfg, name, float(value))
