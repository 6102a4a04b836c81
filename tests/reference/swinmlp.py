"""Swin-MLP as the authors compute it (microsoft/Swin-Transformer, models/swin_mlp.py at f82860b), re-written from its
semantics: (B, L, C) tokens, the window and shift clamped per block from the stage's input resolution, F.pad with
(ws - shift) before and shift after, window_partition / view / transpose to heads, the grouped Conv1d, and back
through window_reverse and the [P_t:-P_b, P_l:-P_r] crop; PatchMerging by strided slicing; AdaptiveAvgPool1d."""

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x, window_size):
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, channels)


def window_reverse(windows, window_size, height, width):
    batch = int(windows.shape[0] / (height * width / window_size / window_size))
    x = windows.view(batch, height // window_size, width // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(batch, height, width, -1)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinMLPBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, drop):
        super().__init__()
        self.input_resolution, self.num_heads = input_resolution, num_heads
        self.window_size, self.shift_size = window_size, shift_size
        if min(input_resolution) <= window_size:
            self.shift_size = 0
            self.window_size = min(input_resolution)
        assert 0 <= self.shift_size < self.window_size
        self.padding = [
            self.window_size - self.shift_size,
            self.shift_size,
            self.window_size - self.shift_size,
            self.shift_size,
        ]
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_mlp = nn.Conv1d(
            num_heads * self.window_size**2, num_heads * self.window_size**2, kernel_size=1, groups=num_heads
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        height, width = self.input_resolution
        batch, length, channels = x.shape
        assert length == height * width, "input feature has wrong size"
        ws, heads = self.window_size, self.num_heads
        shortcut = x
        x = self.norm1(x).view(batch, height, width, channels)
        if self.shift_size > 0:
            p_l, p_r, p_t, p_b = self.padding
            shifted = F.pad(x, [0, 0, p_l, p_r, p_t, p_b], "constant", 0)
        else:
            shifted = x
        _, padded_h, padded_w, _ = shifted.shape
        windows = window_partition(shifted, ws).view(-1, ws * ws, channels)
        windows = windows.view(-1, ws * ws, heads, channels // heads).transpose(1, 2)
        windows = windows.reshape(-1, heads * ws * ws, channels // heads)
        mixed = self.spatial_mlp(windows)
        mixed = mixed.view(-1, heads, ws * ws, channels // heads).transpose(1, 2).reshape(-1, ws * ws, channels)
        shifted = window_reverse(mixed.reshape(-1, ws, ws, channels), ws, padded_h, padded_w)
        if self.shift_size > 0:
            p_l, p_r, p_t, p_b = self.padding
            x = shifted[:, p_t:-p_b, p_l:-p_r, :].contiguous()
        else:
            x = shifted
        x = shortcut + x.view(batch, height * width, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim):
        super().__init__()
        self.input_resolution = input_resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        height, width = self.input_resolution
        batch, _, channels = x.shape
        assert height % 2 == 0 and width % 2 == 0
        x = x.view(batch, height, width, channels)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(batch, -1, 4 * channels)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio, drop, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinMLPBlock(
                dim, input_resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, patch_norm):
        super().__init__()
        self.img_size = img_size
        self.patches_resolution = [img_size[0] // patch_size, img_size[1] // patch_size]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        assert tuple(x.shape[2:]) == tuple(self.img_size)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class SwinMLP(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        ape=False,
        patch_norm=True,
        global_pool="avg",
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.ape = ape
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        resolution = self.patch_embed.patches_resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(
            BasicLayer(
                embed_dim * 2**i,
                (resolution[0] // 2**i, resolution[1] // 2**i),
                depth,
                num_heads[i],
                window_size,
                mlp_ratio,
                drop_rate,
                downsample=i < len(depths) - 1,
            )
            for i, depth in enumerate(depths)
        )
        num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)

    def forward(self, x):
        return self.head(self.forward_features(x))


AUTHORS = {"SwinMLP": SwinMLP}
