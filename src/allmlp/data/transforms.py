"""Evaluation preprocessing presets, following each model's registry entry (normalisation, interpolation)."""

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
    if in_chans not in (1, 3):
        raise ValueError(f"images can be read as 1 (grey) or 3 (RGB) channels, got in_chans={in_chans}")
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
    return T.Compose(
        [
            T.ToImage(),
            T.RGB() if in_chans == 3 else T.Grayscale(),
            *geometry,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
