"""Hire-MLP (Guo et al., Hire-MLP: Vision MLP via Hierarchical Rearrangement, CVPR 2022, arXiv 2108.13341), exact to
the authors' code: ggjy/Hire-Wave-MLP.pytorch, mlp_based/hire_mlp.py at commit 7ef7ddd7.

The token mixer rearranges the map so that an MLP over channels mixes tokens: the height branch regroups every
`pixel` consecutive rows into the channels (channel c * pixel + i holds row g * pixel + i of channel c), mixes them
with a bottleneck of 1x1 convolutions (`mlp_h1`, BatchNorm, ReLU, `mlp_h2`) and puts the rows back; the width
branch does the same with columns. Before regrouping, block j of a stage shifts the map by
(j mod step_stride) * step_dilation rows / columns (cross-region rearrangement) and pads it to a multiple of `pixel`.
A channel map (`mlp_c`) of the unshifted input is the third branch; split attention fuses the three (branch k of
channel c is `reweight` output 3c + k, as in Wave-MLP) before the projection.

Exact, not approximately: the same layers, shapes and key names (the authors' state dicts load unchanged), the same
order of operations, BatchNorm everywhere (eps 1e-5), exact GELU in the MLPs, ReLU after the stem, the downsampling
and in the rearranged bottlenecks. Kept from the authors' code as it is:
- with step_pad_mode 'c' the shift is a roll, undone after the mixing; with '0' it is a zero-filled shift that is
  not undone;
- the padding is at the bottom / right only: circular (pixel_pad_mode 'c', the released models: the first rows /
  columns repeat), zeros ('0') or the last row / column repeated ('replicate'), and is cropped after the mixing;
- circular padding cannot take more rows than the map has: where the authors' code fails there ("Padding value
  causes wrapping around more than once"), allmlp refuses the input with the smallest size that works;
- `drop_rate` is recorded but, as in the authors' code, applied nowhere.
Not kept: the stem reads `in_chans` channels (the authors' always 3).

Layout: channels-last tokens (B, H, W, C) between blocks; the authors' Conv2d layers run on NCHW views in
channels_last memory format (see wavemlp.py, whose scaffold this shares). The shift, padding and regrouping are
slicing, concatenation and one reshape-permute copy per branch and direction, on the channels-last tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import pretrained_cfg
from .layers import to_pair
from .vip import DenseStagedMLP, check_stage_lists, init_trunc_normal_
from .wavemlp import (
    ConvBlock,
    ConvDownsample,
    ConvMlp,
    ConvPatchEmbed,
    TokenBatchNorm,
    check_choice,
    fuse_branches,
    pooled_sum,
)

STEP_PAD_MODES = ("c", "0")
PIXEL_PAD_MODES = ("c", "0", "replicate")
PAPER = "Guo et al., Hire-MLP: Vision MLP via Hierarchical Rearrangement, CVPR 2022 (arXiv 2108.13341)"

# The authors' hire_mlp_tiny / small / base / large constructors (all with pixel [4, 3, 3, 2], step_stride
# [2, 2, 3, 2], step_dilation [2, 2, 1, 1], circular padding for both).
_REARRANGEMENT = dict(
    pixel=[4, 3, 3, 2], step_stride=[2, 2, 3, 2], step_dilation=[2, 2, 1, 1], step_pad_mode="c", pixel_pad_mode="c"
)
CONFIGS = {
    "tiny": dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], **_REARRANGEMENT),
    "small": dict(layers=[3, 4, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], **_REARRANGEMENT),
    "base": dict(layers=[4, 6, 24, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], **_REARRANGEMENT),
    "large": dict(layers=[4, 6, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4], **_REARRANGEMENT),
}


def roll(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """torch.roll(x, shift, dim) for shift >= 0, as two slices: the same values for any shift, also one larger than
    the map (which the TorchScript-based ONNX exporter's roll, without the modulo, gets wrong)."""
    size = x.shape[dim]
    shift = shift % size
    return torch.cat([x.narrow(dim, size - shift, shift), x.narrow(dim, 0, size - shift)], dim)


class HireTokenMixer(nn.Module):
    """The authors' HireMLP token mixer on NCHW maps (channels_last memory format in allmlp's models)."""

    def __init__(self, dim: int, pixel: int = 2, step: int = 1, step_pad_mode: str = "c", pixel_pad_mode: str = "c"):
        super().__init__()
        self.pixel = pixel
        self.step = step
        self.step_pad_mode = step_pad_mode
        self.pixel_pad_mode = pixel_pad_mode
        self.mlp_h1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_h1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_h2 = nn.Conv2d(dim // 2, dim * pixel, 1)
        self.mlp_w1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_w1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_w2 = nn.Conv2d(dim // 2, dim * pixel, 1)
        self.mlp_c = nn.Conv2d(dim, dim, 1)
        self.act = nn.ReLU()
        self.reweight = ConvMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(0.0)

    def _shift(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Cross-region rearrangement of channels-last x along `dim` (1: rows, 2: columns) by `step`: a roll ('c')
        or a zero-filled shift towards the end ('0')."""
        if self.step_pad_mode == "c":
            return roll(x, self.step, dim)
        size = x.shape[dim]
        before = [0, 0, self.step, 0] if dim == 2 else [0, 0, 0, 0, self.step, 0]
        return F.pad(x, before).narrow(dim, 0, size)

    def _pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x padded at the end of `dim` to a multiple of `pixel`: circularly, with zeros or the last row repeated."""
        size = x.shape[dim]
        # (pixel - size % pixel) % pixel, spelled so that the padded size is visibly a multiple of pixel (export)
        pad = (size + self.pixel - 1) // self.pixel * self.pixel - size
        if self.pixel_pad_mode == "c":
            return torch.cat([x, x.narrow(dim, 0, pad)], dim)
        if self.pixel_pad_mode == "0":
            return F.pad(x, [0, 0, 0, pad] if dim == 2 else [0, 0, 0, 0, 0, pad])
        # replicate: F.pad pads the last two dimensions of the NCHW view (H, W)
        pads = [0, pad, 0, 0] if dim == 2 else [0, 0, 0, pad]
        return F.pad(x.permute(0, 3, 1, 2), pads, mode="replicate").permute(0, 2, 3, 1)

    def _mix_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The height branch on channels-last x (B, H, W, C)."""
        batch, height, width, channels = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if self.step:
            x = self._shift(x, 1)
        x = self._pad(x, 1)
        groups = (height + self.pixel - 1) // self.pixel
        x = x.reshape(batch, groups, self.pixel, width, channels).permute(0, 1, 3, 4, 2)
        x = x.reshape(batch, groups, width, channels * self.pixel).permute(0, 3, 1, 2)
        x = self.act(self.mlp_h1_norm(self.mlp_h1(x)).permute(0, 2, 3, 1))  # on the channels-last view: faster
        x = self.mlp_h2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x.reshape(batch, groups, width, channels, self.pixel).permute(0, 1, 4, 2, 3)
        x = x.reshape(batch, groups * self.pixel, width, channels).narrow(1, 0, height)
        if self.step and self.step_pad_mode == "c":
            x = roll(x, height - self.step % height, 1)
        return x

    def _mix_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The width branch on channels-last x (B, H, W, C)."""
        batch, height, width, channels = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if self.step:
            x = self._shift(x, 2)
        x = self._pad(x, 2)
        groups = (width + self.pixel - 1) // self.pixel
        x = x.reshape(batch, height, groups, self.pixel, channels).permute(0, 1, 2, 4, 3)
        x = x.reshape(batch, height, groups, channels * self.pixel).permute(0, 3, 1, 2)
        x = self.act(self.mlp_w1_norm(self.mlp_w1(x)).permute(0, 2, 3, 1))
        x = self.mlp_w2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x.reshape(batch, height, groups, channels, self.pixel).permute(0, 1, 2, 4, 3)
        x = x.reshape(batch, height, groups * self.pixel, channels).narrow(2, 0, width)
        if self.step and self.step_pad_mode == "c":
            x = roll(x, width - self.step % width, 2)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1)
        h, w, c = self._mix_rows(tokens), self._mix_columns(tokens), self.mlp_c(x).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(fuse_branches(h, w, c, self.reweight(pooled_sum(h, w, c)))))

    def extra_repr(self) -> str:
        return (
            f"pixel={self.pixel}, step={self.step}, step_pad_mode={self.step_pad_mode!r}, "
            f"pixel_pad_mode={self.pixel_pad_mode!r}"
        )


def stage_grid_sides(side: int, stages: int) -> list[int]:
    """The token grid side of each stage for an input side: the 7x7 stride-4 stem (padding 2), then ceil halves."""
    sides = [(side - 3) // 4 + 1]
    for _ in range(stages - 1):
        sides.append((sides[-1] + 1) // 2)
    return sides


def smallest_input_side(pixel: Sequence[int], pixel_pad_mode: str) -> int:
    """The smallest input height (and width) the model takes: 3 (the stem's kernel), and with circular padding one
    where every stage's grid side g has pad = (pixel - g mod pixel) mod pixel <= g, i.e. 2 g >= pixel (the grid
    sides grow with the input, so the first side that fits is the bound)."""
    side = 3
    if pixel_pad_mode != "c":
        return side
    while not all(2 * g >= p for g, p in zip(stage_grid_sides(side, len(pixel)), pixel, strict=True)):
        side += 1
    return side


def _check_ints(name: str, values: Sequence, minimum: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise ValueError(f"{name} must be ints >= {minimum}, one per stage, got {list(values)!r}")


class HireMLP(DenseStagedMLP):
    """Hire-MLP with the authors' argument names (their class HireMLPNet); any input size from a few pixels up
    (`accepts` says which: with circular padding the smallest stage grids must hold half a region).

    Stage i regroups `pixel[i]` rows / columns; block j of stage i shifts by (j mod step_stride[i]) *
    step_dilation[i]. A conv 3x3 stride 2 with BatchNorm and ReLU follows every stage but the last.
    `forward_features` gives the (B, H, W, C) tokens after the final BatchNorm. `img_size` and `patch_size` are
    recorded only; the authors' code ignores them too.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 4, 2),
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pixel: Sequence[int] = (4, 3, 3, 2),
        step_stride: Sequence[int] = (2, 2, 3, 2),
        step_dilation: Sequence[int] = (2, 2, 1, 1),
        step_pad_mode: str = "c",
        pixel_pad_mode: str = "c",
        global_pool: str = "avg",
    ):
        super().__init__()
        check_stage_lists(
            layers,
            embed_dims=embed_dims,
            mlp_ratios=mlp_ratios,
            pixel=pixel,
            step_stride=step_stride,
            step_dilation=step_dilation,
        )
        _check_ints("pixel", pixel, 1)
        _check_ints("step_stride", step_stride, 1)
        _check_ints("step_dilation", step_dilation, 0)
        check_choice("step_pad_mode", step_pad_mode, STEP_PAD_MODES)
        check_choice("pixel_pad_mode", pixel_pad_mode, PIXEL_PAD_MODES)
        self.config = dict(
            layers=list(layers),
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dims=list(embed_dims),
            mlp_ratios=list(mlp_ratios),
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            pixel=list(pixel),
            step_stride=list(step_stride),
            step_dilation=list(step_dilation),
            step_pad_mode=step_pad_mode,
            pixel_pad_mode=pixel_pad_mode,
            global_pool=global_pool,
        )
        self._init_model(num_classes, embed_dims[-1], drop_rate, global_pool)
        self.head_drop = nn.Identity()  # the authors accept drop_rate and apply it nowhere
        smallest = smallest_input_side(pixel, pixel_pad_mode)
        why = "" if smallest == 3 else f" (circular padding to regions of {list(pixel)} pixels needs that much)"
        self.accepts = ("HireMLP", in_chans, (smallest, -1, smallest, -1),
                        f"(B, {in_chans}, H, W) with any H, W >= {smallest}{why}")  # fmt: skip
        size = to_pair(img_size, "img_size")
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=False, num_classes=num_classes
        )

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dims[0], nn.BatchNorm2d(embed_dims[0]), nn.ReLU())
        network: list[nn.Module] = []
        for i, rates in enumerate(self._drop_path_rates(layers, drop_path_rate)):
            dim = embed_dims[i]
            blocks = [
                ConvBlock(
                    nn.BatchNorm2d(dim),
                    HireTokenMixer(
                        dim, pixel[i], (j % step_stride[i]) * step_dilation[i], step_pad_mode, pixel_pad_mode
                    ),
                    nn.BatchNorm2d(dim),
                    ConvMlp(dim, int(dim * mlp_ratios[i])),
                    rate,
                )
                for j, rate in enumerate(rates)
            ]
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                network.append(ConvDownsample(dim, embed_dims[i + 1], nn.BatchNorm2d(embed_dims[i + 1]), nn.ReLU()))
        self.network = nn.ModuleList(network)
        self.feature_info = self._feature_info(embed_dims, 4)
        self.norm = TokenBatchNorm(embed_dims[-1])
        self.head = self._new_head(num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear and Conv2d weights trunc-normal(0.02) with zero bias, BatchNorm 1 / 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


_RELEASE = "https://github.com/ggjy/Hire-Wave-MLP.pytorch/releases/download/log/hire_mlp_{}.pth"
_TOP1 = {"tiny": 79.7, "small": 82.1, "base": 83.2}  # the authors' README; large: 83.8, weights not released

ENTRIES = [
    ModelEntry(
        name=f"hiremlp_{variant}",
        architecture=HireMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.875,
            "the authors' evaluation (DeiT's datasets.py): bicubic resize of the shorter side to 256, centre crop 224",
        ),
        releases=()
        if variant not in _TOP1
        else (
            hosted(
                "imagenet1k",
                _RELEASE.format(variant) + " (DeiT training checkpoint; the weights under 'model', which the authors "
                "evaluate)",
                1000,
                IN1K,
                _TOP1[variant],
                _RELEASE.format(variant),
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
