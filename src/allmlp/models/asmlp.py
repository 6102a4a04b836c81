"""AS-MLP (Lian et al., ICLR 2022, arXiv 2107.08391), exact to the authors' code (svip-lab/AS-MLP, models/as_mlp.py
at dd1eb4f), and the Swin-style hierarchy it shares with Swin-MLP (swinmlp.py).

The axial shift: channels are cut into groups of ceil(C / k) (k = `shift_size`; fewer than k groups when C is
small), group g is read at offset k // 2 - g along one axis, zero where that falls outside. The authors run it with
a cupy CUDA kernel; here it is a zero pad and one slice per group, concatenated: the same values bit for bit
(their commented-out pure-PyTorch shift in as_mlp.py gives the same too), on any device and dtype, exportable.

Exact as the authors compute: every norm is GroupNorm(1, C) (eps 1e-5) over (C, H, W), the patch embedding's,
the patch merging's and the final one included; all channel maps are 1x1 Conv2d (their keys, their types); exact
(erf) GELU, one module used three times in the axial shift; patch merging gathers the 2x2 neighbours in the order
(row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1) along channels, then norm, then a bias-free 1x1
conv; the final norm comes before the mean pool. Tokens stay channels-last (B, H, W, C) between modules; every
Conv2d and GroupNorm is called as itself on a channels-last NCHW view (a permute, no copy), which PyTorch's CPU
kernels run as matrix products.

Input sizes: the authors' patch embedding asserts H, W == img_size, but nothing in AS-MLP depends on the size
except the 2x2 patch merging, which needs an even grid. So any input works whose patch grid (H // patch_size,
W // patch_size) is divisible by 2 ** (stages - 1): at patch 4 and four stages, H and W in 32k .. 32k + 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .entries import IN1K, ModelEntry, WeightRelease, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, check_input, pretrained_cfg
from .layers import DropPath, linear_drop_path_rates, to_pair
from .vip import init_trunc_normal_

PAPER = "Lian et al., AS-MLP: An Axial Shifted MLP Architecture for Vision, ICLR 2022 (arXiv 2107.08391)"

# The authors' configs/as_{tiny,small,base}_patch4_shift5_224.yaml (drop path: their training setting).
CONFIGS = {
    "t": dict(embed_dim=96, depths=[2, 2, 6, 2], shift_size=5, drop_path_rate=0.2),
    "s": dict(embed_dim=96, depths=[2, 2, 18, 2], shift_size=5, drop_path_rate=0.3),
    "b": dict(embed_dim=128, depths=[2, 2, 18, 2], shift_size=5, drop_path_rate=0.5),
}


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last tokens (B, H, W, C) as the NCHW view a Conv2d or GroupNorm takes (no copy: its channels-last
    kernels run on it and give channels-last maps, which `to_nhwc` views back)."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def axial_shift(x: torch.Tensor, shift_size: int, dim: int, channels: int) -> torch.Tensor:
    """x (B, H, W, C = `channels`) shifted along `dim` (1: height, 2: width) as the authors' CUDA kernel does:
    channel group g (groups of ceil(C / shift_size) channels) at position i takes the value at
    i + shift_size // 2 - g, zero outside. shift_size 1 is the identity, as in the authors' `Shift`. The channel
    count comes from the module (a Python int), so that the loop over groups traces with torch.fx."""
    if shift_size == 1:
        return x
    pad = shift_size // 2
    length = x.shape[dim]
    group = (channels + shift_size - 1) // shift_size
    padding = [0, 0, pad, pad] if dim == 2 else [0, 0, 0, 0, pad, pad]
    padded = F.pad(x, padding)
    pieces: list[torch.Tensor] = []
    for g in range((channels + group - 1) // group):
        # output i reads input i + pad - g, i.e. padded position i + 2 * pad - g
        start = g * group
        pieces.append(padded.narrow(dim, 2 * pad - g, length).narrow(3, start, min(group, channels - start)))
    return torch.cat(pieces, dim=3)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 neighbourhood's tokens along channels in the order both
    authors' PatchMerging concatenate them, x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (the row
    offset varies first). One copy, by a reshape and permute."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return x.permute(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2, 4 * channels)


class ConvMlp(nn.Module):
    """The authors' Mlp of 1x1 convolutions `fc1`, GELU, dropout, `fc2`, dropout, on channels-last tokens."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(to_nhwc(self.fc1(to_nchw(x)))))
        return self.drop(to_nhwc(self.fc2(to_nchw(x))))


class AxialShift(nn.Module):
    """conv1, norm1, GELU; the width shift through conv2_1 and the height shift through conv2_2, each GELU'd,
    summed; norm2, conv3. All convs 1x1 (bias: `as_bias`), norms GroupNorm(1, C)."""

    def __init__(self, dim: int, shift_size: int, as_bias: bool = True):
        super().__init__()
        self.dim, self.shift_size = dim, shift_size
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv2_2 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, 1, 0, groups=1, bias=as_bias)
        self.actn = nn.GELU()
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm2 = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the activations run on the channels-last (B, H, W, C) views: elementwise ops on channels_last NCHW
        # tensors are about twice as slow on CPU (bfloat16) as on the same memory seen as contiguous NHWC
        x = self.actn(to_nhwc(self.norm1(self.conv1(to_nchw(x)))))
        x_lr = self.actn(to_nhwc(self.conv2_1(to_nchw(axial_shift(x, self.shift_size, 2, self.dim)))))
        x_td = self.actn(to_nhwc(self.conv2_2(to_nchw(axial_shift(x, self.shift_size, 1, self.dim)))))
        return to_nhwc(self.conv3(self.norm2(to_nchw(x_lr + x_td))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, shift_size={self.shift_size}"


class AxialShiftedBlock(nn.Module):
    """x + axial_shift(norm1(x)), then x + mlp(norm2(x)) (pre-norm, GroupNorm(1, C))."""

    def __init__(self, dim: int, shift_size: int, mlp_ratio: float, as_bias: bool, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.axial_shift = AxialShift(dim, shift_size, as_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.axial_shift(to_nhwc(self.norm1(to_nchw(x)))))
        return x + self.drop_path(self.mlp(to_nhwc(self.norm2(to_nchw(x)))))


class ConvPatchMerging(nn.Module):
    """AS-MLP's patch merging: 2x2 neighbours along channels (`merge_2x2`), GroupNorm(1, 4C), 1x1 conv to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, 1, bias=False)
        self.norm = nn.GroupNorm(1, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.reduction(self.norm(to_nchw(merge_2x2(x)))))


class PatchEmbed(nn.Module):
    """Both families' patch embedding: a patch_size-strided conv to channels-last tokens, then the optional norm
    (`norm_kind` 'group': GroupNorm(1, C) on the map, AS-MLP; 'layer': LayerNorm over channels, Swin-MLP)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_kind: str | None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm_kind = norm_kind or ""
        if norm_kind == "group":
            self.norm = nn.GroupNorm(1, embed_dim)
        elif norm_kind == "layer":
            self.norm = nn.LayerNorm(embed_dim)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return to_nhwc(self.norm(to_nchw(x))) if self.norm_kind == "group" else self.norm(x)


class Stage(nn.Module):
    """One of the authors' BasicLayers: `blocks` (their ModuleList as a Sequential: the same keys, and a module
    feature extraction can name), then `downsample` (patch merging) or None in the last stage."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def check_swin_style_config(
    patch_size: int, embed_dim: int, depths: Sequence[int], mlp_ratio: float, drop_rate: float, drop_path_rate: float
) -> None:
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
    if not depths or not all(isinstance(d, int) and d >= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of block counts >= 1, got {depths!r}")
    if not mlp_ratio > 0 or int(embed_dim * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must be > 0 (at least one hidden channel), got {mlp_ratio!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")


class SwinStyleMLP(ModelInterface, nn.Module):
    """What AS-MLP and Swin-MLP share: patch embedding, `layers` of Stages (blocks, then patch merging), the final
    norm, mean pooling over tokens and the head, and the model interface. Features (`feature_info`,
    `forward_intermediates`) are each stage's blocks' output, before its patch merging: strides 4, 8, 16, 32."""

    def _init_model(self, num_classes: int, num_features: int, drop_rate: float, global_pool: str) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        self.num_classes = num_classes
        self.num_features = num_features
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.head_drop = nn.Identity()  # the authors have no dropout before the head (drop_rate acts in the blocks)

    @staticmethod
    def _rates(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        return [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]

    def _stage_feature_info(self, embed_dim: int, patch_size: int) -> list[dict]:
        return [
            dict(module=f"layers.{i}.blocks", num_chs=embed_dim * 2**i, reduction=patch_size * 2**i)
            for i in range(len(self.layers))
        ]

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        stem = r"^patch_embed|^absolute_pos_embed"
        if coarse:
            return dict(stem=stem, blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])
        blocks = [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None),
            (r"^layers\.(\d+)\.downsample", (99998,)),  # after its stage's blocks (the authors' order)
            (r"^norm", (99999,)),
        ]
        return dict(stem=stem, blocks=blocks)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.patch_embed(x)

    def _feature_stages(self) -> list[list[nn.Module]]:
        stages: list[list[nn.Module]] = []
        for i, layer in enumerate(self.layers):
            previous = self.layers[i - 1].downsample if i > 0 else None
            stages.append(([previous] if previous is not None else []) + [layer.blocks])
        return stages

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        return self.norm if index == len(self.layers) - 1 else None

    def _truncate(self, last: int) -> None:
        if last < len(self.layers) - 1:
            self.norm = nn.Identity()  # the final norm has the last stage's width, which is gone
        self.layers = self.layers[: last + 1]
        self.layers[last].downsample = None

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final norm."""
        x = self._embed(x)
        for layer in self.layers:
            # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(layer.blocks, x)
            else:
                x = layer.blocks(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self._final_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_grid_input(x: torch.Tensor, family: str, in_chans: int, patch_size: int, multiple: int, hint: str) -> None:
    """check_input for any size whose patch grid is divisible by `multiple` (wrapped for torch.fx, as it is)."""
    side = patch_size * multiple
    check_input(x, family, in_chans, (side, -1, side, -1), hint)
    if torch.jit.is_tracing():
        return
    if (x.shape[2] // patch_size) % multiple != 0 or (x.shape[3] // patch_size) % multiple != 0:
        got = "(" + ", ".join([str(size) for size in x.shape]) + ")"
        raise ValueError(f"{family} expects input of shape {hint}, got {got}")


torch.fx.wrap("check_grid_input")


class ASMLP(SwinStyleMLP):
    """AS-MLP with the authors' argument names (their class AS_MLP); `forward_features` gives (B, H, W, C) tokens
    after the final norm. `img_size` is recorded (and is the default input size of `pretrained_cfg`); the model
    takes any H, W whose patch grid is divisible by 2 ** (len(depths) - 1) (see the module docstring)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        shift_size: int = 5,
        mlp_ratio: float = 4.0,
        as_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_swin_style_config(patch_size, embed_dim, depths, mlp_ratio, drop_rate, drop_path_rate)
        if not isinstance(shift_size, int) or shift_size < 1 or shift_size % 2 == 0:
            raise ValueError(f"shift_size must be an odd int >= 1 (the authors' Shift), got {shift_size!r}")
        size = to_pair(img_size, "img_size")
        self.config = dict(
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depths=list(depths),
            shift_size=shift_size,
            mlp_ratio=mlp_ratio,
            as_bias=as_bias,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            patch_norm=patch_norm,
            global_pool=global_pool,
        )
        stages = len(depths)
        self._init_model(num_classes, embed_dim * 2 ** (stages - 1), drop_rate, global_pool)
        self.in_chans, self.patch_size, self.grid_multiple = in_chans, patch_size, 2 ** (stages - 1)
        step = patch_size * self.grid_multiple
        self.accepts = (
            "ASMLP",
            in_chans,
            (step, -1, step, -1),
            f"(B, {in_chans}, H, W) with H // {patch_size} and W // {patch_size} divisible by {self.grid_multiple} "
            f"(H, W in {step}k .. {step}k + {patch_size - 1}: the patch merging halves an even grid)",
        )
        self.pretrained_cfg = pretrained_cfg((in_chans, *size), "patch_embed.proj", False, num_classes)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, "group" if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(
            Stage(
                [
                    AxialShiftedBlock(embed_dim * 2**i, shift_size, mlp_ratio, as_bias, drop_rate, rate)
                    for rate in rates
                ],
                ConvPatchMerging(embed_dim * 2**i) if i < stages - 1 else None,
            )
            for i, rates in enumerate(self._rates(depths, drop_path_rate))
        )
        self.feature_info = self._stage_feature_info(embed_dim, patch_size)
        self.norm = nn.GroupNorm(1, self.num_features)
        self.head = self._new_head(num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: the head trunc-normal(0.02) with zero bias; convs and norms default."""
        if isinstance(self.head, nn.Linear):
            init_trunc_normal_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        check_grid_input(x, "ASMLP", self.in_chans, self.patch_size, self.grid_multiple, self.accepts[3])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.pos_drop(self.patch_embed(x))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.norm(to_nchw(x)))

    @torch.jit.unused
    def _apply_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """forward_intermediates' norms (the final GroupNorm, or an Identity once pruned) on channels-last tokens."""
        return to_nhwc(norm(to_nchw(x)))


# The authors' checkpoints: OneDrive share links from the README (a browser is needed), published top-1.
_RELEASES = {
    "t": (
        "https://shanghaitecheducn-my.sharepoint.com/:u:/g/personal/liandz_shanghaitech_edu_cn/"
        "Eb2lPJI2BshEjJxf9CmRkCUBnB63Wj25-FVVc6zJvgRg6w?e=dEQd5q",
        81.3,
    ),
    "s": (
        "https://shanghaitecheducn-my.sharepoint.com/:u:/g/personal/liandz_shanghaitech_edu_cn/"
        "EVIbw8xHKk1Aq9MBQL-cRbIBVJA_hJE-HEVNf_GVgkw2iQ?e=QIIp2e",
        83.1,
    ),
    "b": (
        "https://shanghaitecheducn-my.sharepoint.com/:u:/g/personal/liandz_shanghaitech_edu_cn/"
        "EZVBFW_LKctLqgrnnINy88wBRtGFava9wp_65emsvVW2KQ?e=clNjuw",
        83.3,
    ),
}
_NAMES = {"t": "tiny", "s": "small", "b": "base"}

ENTRIES = [
    ModelEntry(
        name=f"asmlp_{variant}",
        architecture=ASMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.875, "the authors' evaluation (Swin's data/build.py): shorter side to 256 (bicubic), centre crop 224"
        ),
        releases=(
            WeightRelease(
                "imagenet1k",
                f"{_RELEASES[variant][0]} (svip-lab/AS-MLP README, OneDrive)",
                1000,
                IN1K,
                _RELEASES[variant][1],
                # OneDrive answers a program with a sign-in page: a person downloads the file.
                file_name=f"svip-lab/AS-MLP/asmlp_{_NAMES[variant]}_patch4_shift5_224.pth",
                page=_RELEASES[variant][0],
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
