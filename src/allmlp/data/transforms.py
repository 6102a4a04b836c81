"""Per-image preprocessing: evaluation presets and the training augmentation, following each model's registry entry
(normalisation, interpolation)."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..models.layers import to_pair
from ..models.registry import Preprocessing

EVAL_PRESETS = ("resize", "resize_crop", "resmall_crop")
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def interpolation_mode(name: str) -> InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {name!r}")
    return _INTERPOLATIONS[name]


def build_eval_transform(
    preprocessing: Preprocessing,
    img_size: int | tuple[int, int],
    preset: str = "resize",
    crop_pct: float | None = None,
    in_chans: int = 3,
) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor (C, H, W).

    resize: plain resize to the input size (the official Mixer fine-tuning evaluation);
    resize_crop: resize to size / crop_pct on both sides, then centre crop (paper Table 2, 256 -> 224);
    resmall_crop: shorter side to size / crop_pct, then centre crop (paper Table 3, DeiT-style).
    crop_pct defaults to the entry's, or 0.875 (224 of 256) where the entry evaluates with a plain resize.
    """
    if preset not in EVAL_PRESETS:
        raise ValueError(f"eval preset must be one of {EVAL_PRESETS}, got {preset!r}")
    height, width = to_pair(img_size, "img_size")
    interpolation = interpolation_mode(preprocessing.interpolation)
    crop_pct = crop_pct or (preprocessing.crop_pct if preprocessing.crop_pct < 1.0 else 0.875)
    if preset == "resize":
        geometry = [T.Resize((height, width), interpolation=interpolation, antialias=True)]
    elif preset == "resize_crop":
        scaled = (round(height / crop_pct), round(width / crop_pct))
        geometry = [T.Resize(scaled, interpolation=interpolation, antialias=True), T.CenterCrop((height, width))]
    else:
        geometry = [
            T.Resize(round(min(height, width) / crop_pct), interpolation=interpolation, antialias=True),
            T.CenterCrop((height, width)),
        ]
    return T.Compose([*_as_image(in_chans), *geometry, *_normalise(preprocessing, in_chans)])


def build_train_transform(
    preprocessing: Preprocessing,
    img_size: int | tuple[int, int],
    *,
    in_chans: int = 3,
    inception_crop: bool = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = False,
    shift_pixels: int = 0,
    randaugment_layers: int = 0,
    randaugment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> T.Compose:
    """PIL image / uint8 tensor -> augmented, normalised float tensor (C, H, W). Draws from torch's global RNG.

    Geometry: Inception crop (RandomResizedCrop, area fraction in crop_scale, aspect 3/4..4/3) or a plain resize
    to the input size, then a random translation by up to shift_pixels (zero padding) and a horizontal flip.
    Then RandAugment on the uint8 image and random erasing (timm's "pixel" mode: normal noise) on the normalised one.
    """
    height, width = to_pair(img_size, "img_size")
    interpolation = interpolation_mode(preprocessing.interpolation)
    if inception_crop:
        geometry = [T.RandomResizedCrop((height, width), scale=crop_scale, interpolation=interpolation, antialias=True)]
    else:
        geometry = [T.Resize((height, width), interpolation=interpolation, antialias=True)]
    if shift_pixels:
        geometry.append(T.RandomCrop((height, width), padding=shift_pixels))
    if hflip:
        geometry.append(T.RandomHorizontalFlip())
    photometric = [T.RandAugment(randaugment_layers, randaugment_magnitude, interpolation=interpolation)]
    erasing = [T.RandomErasing(random_erasing, value="random")]
    return T.Compose(
        [
            *_as_image(in_chans),
            *geometry,
            *(photometric if randaugment_layers else []),
            *_normalise(preprocessing, in_chans),
            *(erasing if random_erasing else []),
        ]
    )


def _as_image(in_chans: int) -> list[T.Transform]:
    if in_chans not in (1, 3):
        raise ValueError(f"images can be read as 1 (grey) or 3 (RGB) channels, got in_chans={in_chans}")
    return [T.ToImage(), T.RGB() if in_chans == 3 else T.Grayscale()]


def mean_std(preprocessing: Preprocessing, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The entry's normalisation for in_chans channels: grey images use the mean of its RGB statistics."""
    if in_chans == 1:
        return (sum(preprocessing.mean) / 3,), (sum(preprocessing.std) / 3,)
    return tuple(preprocessing.mean), tuple(preprocessing.std)


def _normalise(preprocessing: Preprocessing, in_chans: int) -> list[T.Transform]:
    """uint8 -> float in [0, 1] -> (x - mean) / std."""
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std(preprocessing, in_chans))]
