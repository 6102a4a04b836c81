"""Batch-level augmentation: geometry of a whole in-memory uint8 batch in a few tensor ops, and MixUp / CutMix.

In-memory datasets (the demo set, CIFAR) are small images, where per-image PIL or torchvision calls would cost more
than the model; drawing every image's crop, shift and flip at once keeps the data side of the demo negligible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from ..models.layers import to_pair
from ..models.registry import Preprocessing
from .transforms import mean_std

_ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
_ATTEMPTS = 10  # as torchvision: draws per image before falling back to a centre crop


class BatchAugment:
    """uint8 (N, C, h, w) -> normalised float (N, in_chans, H, W): Inception crop (or resize), shift, flip.

    Semantics follow build_train_transform: the crop's area fraction in crop_scale and aspect in 3/4..4/3 (the
    bilinear resampling of crops averages several points per output pixel when shrinking, like antialiasing);
    translation by up to shift_pixels with zero padding; horizontal flip with probability 1/2.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        source_size: tuple[int, int],
        img_size: int | tuple[int, int],
        in_chans: int,
        *,
        inception_crop: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        shift_pixels: int = 0,
        hflip: bool = False,
    ):
        self.source_size, self.size = source_size, to_pair(img_size, "img_size")
        self.in_chans, self.inception_crop, self.crop_scale = in_chans, inception_crop, crop_scale
        self.shift_pixels, self.hflip = shift_pixels, hflip
        self.interpolation = "bicubic" if preprocessing.interpolation == "bicubic" else "bilinear"
        mean, std = mean_std(preprocessing, in_chans)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random parameters for n images (row i belongs to image i; a rank takes the rows of its images)."""
        params = {}
        if self.inception_crop:
            params["box"] = self._sample_boxes(n, generator)
        if self.shift_pixels:
            params["shift"] = torch.randint(0, 2 * self.shift_pixels + 1, (n, 2), generator=generator)
        if self.hflip:
            params["flip"] = torch.rand(n, generator=generator) < 0.5
        return params

    def _sample_boxes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 4) crop boxes (left, top, right, bottom) drawn as torchvision's RandomResizedCrop draws them."""
        height, width = self.source_size
        area = torch.empty(n, _ATTEMPTS).uniform_(*self.crop_scale, generator=generator) * (height * width)
        log_ratio = torch.empty(n, _ATTEMPTS).uniform_(math.log(_ASPECT[0]), math.log(_ASPECT[1]), generator=generator)
        crop_w = torch.sqrt(area * torch.exp(log_ratio)).round()
        crop_h = torch.sqrt(area / torch.exp(log_ratio)).round()
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)
        crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
        # no draw fits: the largest centred crop within the aspect range
        ratio = min(max(width / height, _ASPECT[0]), _ASPECT[1])
        fallback_w, fallback_h = min(width, round(height * ratio)), min(height, round(width / ratio))
        fitted = fits.any(dim=1)
        crop_w = torch.where(fitted, crop_w, torch.tensor(float(fallback_w)))
        crop_h = torch.where(fitted, crop_h, torch.tensor(float(fallback_h)))
        offsets = torch.rand(n, 2, generator=generator)
        top = torch.where(fitted, (offsets[:, 0] * (height - crop_h + 1)).floor(), (height - crop_h) // 2)
        left = torch.where(fitted, (offsets[:, 1] * (width - crop_w + 1)).floor(), (width - crop_w) // 2)
        return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment on the images' device (parameters are drawn on the CPU, so every device sees the same ones)."""
        device = images.device
        params = {name: value.to(device) for name, value in params.items()}
        if images.shape[1] == 3 and self.in_chans == 1:
            images = TF.rgb_to_grayscale(images)
        images = images.float().expand(-1, self.in_chans, -1, -1)
        if "box" in params:
            boxes = torch.cat([torch.arange(len(images), device=device).unsqueeze(1).float(), params["box"]], dim=1)
            images = roi_align(images, boxes, self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        elif tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, self.size, mode=self.interpolation, antialias=True, align_corners=False)
            images = images.clamp(0, 255)
        if "shift" in params:
            images = _translate(images, params["shift"], self.shift_pixels)
        if "flip" in params:
            images = torch.where(params["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
        return (images - self.mean.to(device)) / self.std.to(device)


def _translate(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image crop of the zero-padded batch at offsets (dy, dx) in [0, 2 * pad]: a shift by offset - pad.
    One gather over flattened planes (several times faster than 4-D advanced indexing)."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)).flatten(2)
    rows = (offsets[:, 0:1] + torch.arange(height, device=images.device)).view(n, height, 1)
    cols = (offsets[:, 1:2] + torch.arange(width, device=images.device)).view(n, 1, width)
    index = (rows * (width + 2 * pad) + cols).view(n, 1, height * width).expand(n, channels, height * width)
    return padded.gather(2, index).view(n, channels, height, width)


class MixUpCutMix:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with its reverse, one lambda per batch.

    With probability `prob` a batch is mixed; when both alphas are positive, CutMix or MixUp is chosen with equal
    odds (timm's convention, used by the DeiT / CycleMLP / ViP recipes). CutMix's lambda is corrected to the pasted
    box's actual area. Targets come back as probabilities (B, num_classes); label smoothing is the loss's job.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixUpCutMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha, self.prob = num_classes, mixup_alpha, cutmix_alpha, prob

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        soft = F.one_hot(targets, self.num_classes).to(images.dtype if images.is_floating_point() else torch.float32)
        # one numpy generator seeded from the torch one: Beta draws and box centres, same on every device
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        if rng.random() >= self.prob:
            return images, soft
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            height, width = images.shape[-2:]
            cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            images = images.clone()
            images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            images = images * lam + images.flip(0) * (1.0 - lam)
        return images, soft * lam + soft.flip(0) * (1.0 - lam)
