"""Swin-MLP (Liu et al., the MLP variant of the Swin Transformer, ICCV 2021, arXiv 2103.14030), exact to the authors'
code (microsoft/Swin-Transformer, models/swin_mlp.py at f82860b). The hierarchy (patch embedding, stages of blocks
then patch merging, final norm, mean pool, head) is AS-MLP's (asmlp.SwinStyleMLP).

A block replaces Swin's window attention by a spatial MLP inside each window: the tokens of a window (ws x ws) are
mixed per head by a grouped Conv1d (`spatial_mlp`, groups = heads, heads are contiguous blocks of C / heads
channels), then the channel MLP. Blocks alternate between plain windows and shifted ones; a shifted block pads the
map with zeros, (ws - ws // 2) rows / columns before and ws // 2 after (asymmetric for odd windows: 4 and 3 at
ws = 7), so the windows straddle the plain ones; nothing wraps around and no mask is needed. The padding is cut
off again after the mixing. Where a stage's grid is not larger than the window, the window is clamped to the grid
and the shift dropped (Swin-MLP-B at 224: stage 4's 7x7; the 256 px tiny models keep window 8 there, unshifted).

Exact as the authors compute: LayerNorm eps 1e-5, exact (erf) GELU, patch merging gathers (row 0, col 0), (row 1,
col 0), (row 0, col 1), (row 1, col 1) neighbours along channels (AS-MLP's order), then LayerNorm(4C) and a bias-free
Linear. Tokens stay (B, H, W, C); a window partition and its reverse are one permuted copy each.

Input size: the window layout (which blocks shift, which windows are clamped, and the `spatial_mlp` shapes of a
clamped stage) is fixed by `img_size` at construction, as in the authors' code, whose patch embedding asserts the
input size. So a model takes exactly `img_size`; build it with another `img_size` for another size (weights load
wherever the shapes agree, e.g. the 256 px tiny models at 512, where stage 4 is then shifted as the authors' model
built at 512 would be).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .asmlp import PatchEmbed, Stage, SwinStyleMLP, check_swin_style_config, merge_2x2
from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import pretrained_cfg
from .layers import DropPath, Mlp, to_pair
from .vip import init_trunc_normal_

PAPER = (
    "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, ICCV 2021 "
    "(arXiv 2103.14030); Swin-MLP in microsoft/Swin-Transformer"
)

# The authors' configs/swinmlp/*.yaml (drop path: their training setting).
CONFIGS = {
    "t_c24": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[4, 8, 16, 32], window_size=8),
    "t_c12": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[8, 16, 32, 64], window_size=8),
    "t_c6": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[16, 32, 64, 128], window_size=8),
    "b": dict(img_size=224, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7),
}
_DROP_PATH = {"t_c24": 0.2, "t_c12": 0.2, "t_c6": 0.2, "b": 0.5}


class SwinMLPBlock(nn.Module):
    """x + spatial MLP over (shifted) windows of norm1(x), then x + mlp(norm2(x)); `window_size` and `shift_size`
    are the block's own, after the authors' clamping to the stage's grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
    ):
        super().__init__()
        self.dim, self.num_heads, self.window_size, self.shift_size = dim, num_heads, window_size, shift_size
        # P_l, P_r, P_t, P_b as the authors pad
        self.padding = [window_size - shift_size, shift_size, window_size - shift_size, shift_size]
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_mlp = nn.Conv1d(
            num_heads * window_size**2, num_heads * window_size**2, kernel_size=1, groups=num_heads
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu="erf", drop=drop)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial MLP over the windows of x (B, H, W, C), padded first when the block shifts."""
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        ws, heads = self.window_size, self.num_heads
        if self.shift_size > 0:
            x = F.pad(x, [0, 0, self.padding[0], self.padding[1], self.padding[2], self.padding[3]])
        rows, cols = x.shape[1] // ws, x.shape[2] // ws
        # (B, rows, ws, cols, ws, heads, C / heads) -> (B, heads * ws * ws, windows * C / heads): the Conv1d's
        # channels are head-major, then the window's tokens row by row, as the authors order them; its length runs
        # over the windows and each head's channels, which a kernel-1 conv maps alike (the authors fold the windows
        # into the batch instead: the same products, but the batch dimension stays the sample's here, as per-sample
        # gradient tools such as Opacus need)
        windows = x.reshape(batch, rows, ws, cols, ws, heads, self.dim // heads).permute(0, 5, 2, 4, 1, 3, 6)
        mixed = self.spatial_mlp(windows.reshape(batch, heads * ws * ws, rows * cols * (self.dim // heads)))
        mixed = mixed.reshape(batch, heads, ws, ws, rows, cols, self.dim // heads).permute(0, 4, 2, 5, 3, 1, 6)
        x = mixed.reshape(batch, rows * ws, cols * ws, self.dim)
        if self.shift_size > 0:
            top, left = self.padding[2], self.padding[0]
            x = x[:, top : top + height, left : left + width]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.spatial(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift_size}"


class PatchMerging(nn.Module):
    """Swin's patch merging: 2x2 neighbours along channels (`merge_2x2`), LayerNorm(4C), Linear 4C -> 2C, no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_2x2(x)))


def stage_windows(grid: tuple[int, int], stages: int, window_size: int) -> list[tuple[tuple[int, int], int, int]]:
    """((height, width), window, shift) of each stage as the authors build it for a patch grid, or a ValueError."""
    layout = []
    for i in range(stages):
        resolution = (grid[0] // 2**i, grid[1] // 2**i)
        window, shift = window_size, window_size // 2
        if min(resolution) <= window_size:  # the authors: no partition into windows, the grid is one window
            window, shift = min(resolution), 0
        if window < 1 or resolution[0] % window or resolution[1] % window:
            raise ValueError(
                f"stage {i} works on a {resolution[0]}x{resolution[1]} token grid, which windows of {window} do not "
                f"tile; choose img_size so that every stage's grid is a multiple of window_size {window_size}"
            )
        if i < stages - 1 and (resolution[0] % 2 or resolution[1] % 2):
            raise ValueError(
                f"stage {i} works on a {resolution[0]}x{resolution[1]} token grid, which the 2x2 patch merging cannot "
                f"halve; choose img_size so that every stage but the last has an even grid"
            )
        layout.append((resolution, window, shift))
    return layout


class SwinMLP(SwinStyleMLP):
    """Swin-MLP with the authors' argument names; `forward_features` gives (B, H, W, C) tokens after the final norm.
    Takes inputs of exactly `img_size` (see the module docstring)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_swin_style_config(patch_size, embed_dim, depths, mlp_ratio, drop_rate, drop_path_rate)
        if num_heads is None or len(num_heads) != len(depths):
            raise ValueError(f"num_heads needs one entry per stage ({len(depths)} stages), got {num_heads!r}")
        for i, heads in enumerate(num_heads):
            dim = embed_dim * 2**i
            if not (isinstance(heads, int) and heads >= 1 and dim % heads == 0):
                raise ValueError(
                    f"stage {i}: num_heads must be a positive int that divides the width {dim}, got {heads!r}"
                )
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        size = to_pair(img_size, "img_size")
        grid = (size[0] // patch_size, size[1] // patch_size)
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size!r} is smaller than one patch of {patch_size}")
        try:
            layout = stage_windows(grid, len(depths), window_size)
        except ValueError as err:
            raise ValueError(f"img_size {img_size!r} with patch_size {patch_size}: {err}") from None
        self.config = dict(
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            ape=ape,
            patch_norm=patch_norm,
            global_pool=global_pool,
        )
        stages = len(depths)
        self._init_model(num_classes, embed_dim * 2 ** (stages - 1), drop_rate, global_pool)
        self.grid = grid
        self.accepts = (
            "SwinMLP",
            in_chans,
            (size[0], size[0], size[1], size[1]),
            f"(B, {in_chans}, {size[0]}, {size[1]}) (img_size: the window layout is built for it; build the model "
            f"with another img_size for other inputs)",
        )
        self.pretrained_cfg = pretrained_cfg((in_chans, *size), "patch_embed.proj", True, num_classes)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, "layer" if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(
            Stage(
                [
                    SwinMLPBlock(
                        embed_dim * 2**i,
                        num_heads[i],
                        window,
                        0 if j % 2 == 0 else shift,
                        mlp_ratio,
                        drop_rate,
                        rate,
                    )
                    for j, rate in enumerate(rates)
                ],
                PatchMerging(embed_dim * 2**i) if i < stages - 1 else None,
            )
            for i, ((_, window, shift), rates) in enumerate(
                zip(layout, self._rates(depths, drop_path_rate), strict=True)
            )
        )
        self.feature_info = self._stage_feature_info(embed_dim, patch_size)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = self._new_head(num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear and Conv1d trunc-normal(0.02) with zero bias, LayerNorm 1 / 0, the
        position embedding trunc-normal(0.02); the patch embedding conv at PyTorch's default."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.absolute_pos_embed is not None:
            init_trunc_normal_(self.absolute_pos_embed)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"} if self.absolute_pos_embed is not None else set()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        position = self.absolute_pos_embed
        if position is not None:
            x = x + position.reshape(1, self.grid[0], self.grid[1], -1)
        return self.pos_drop(x)


ENTRIES = [
    ModelEntry(
        name=f"swinmlp_{variant}",
        architecture=SwinMLP,
        config=dict(num_classes=1000, **config, drop_path_rate=_DROP_PATH[variant]),
        preprocessing=imagenet_preprocessing(
            0.875,
            f"the authors' evaluation (data/build.py): shorter side to {config['img_size'] * 8 // 7} (bicubic), "
            f"centre crop {config['img_size']}",
        ),
        releases=(
            hosted(
                "imagenet1k",
                f"https://github.com/SwinTransformer/storage/releases/download/v1.0.5/{file}.pth "
                "(microsoft/Swin-Transformer MODELHUB.md)",
                1000,
                IN1K,
                top1,
                f"https://github.com/SwinTransformer/storage/releases/download/v1.0.5/{file}.pth",
            ),
        ),
        paper=PAPER,
    )
    for (variant, config), (file, top1) in zip(
        CONFIGS.items(),
        [
            ("swin_mlp_tiny_c24_patch4_window8_256", 79.4),
            ("swin_mlp_tiny_c12_patch4_window8_256", 79.6),
            ("swin_mlp_tiny_c6_patch4_window8_256", 79.7),
            ("swin_mlp_base_patch4_window7_224", 81.3),
        ],
        strict=True,
    )
]
