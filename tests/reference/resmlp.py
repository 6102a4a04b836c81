"""ResMLP as the authors compute it (facebookresearch/deit `resmlp_models.py` @ 7e160fe4, on 2021 timm's
PatchEmbed and Mlp), re-written from its semantics without allmlp: the patch embedding asserts the input size and
flattens the conv output to (B, N, C); Affine is `alpha * x + beta`; each block adds
`gamma_1 * attn(norm1(x).transpose(1, 2)).transpose(1, 2)` and `gamma_2 * mlp(norm2(x))`; the head reads the
mean over tokens after the final Affine, reshaped to (B, 1, C) and indexed [:, 0] as the authors do."""

from __future__ import annotations

import torch
from torch import nn


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Affine(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.alpha * x + self.beta


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, patch_size = _pair(img_size), _pair(patch_size)
        self.num_patches = (self.img_size[1] // patch_size[1]) * (self.img_size[0] // patch_size[0])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        assert H == self.img_size[0] and W == self.img_size[1], "Input image size doesn't match model"
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayersScaleMlpBlocks(nn.Module):
    def __init__(self, dim, drop, init_values, num_patches):
        super().__init__()
        self.norm1 = Affine(dim)
        self.attn = nn.Linear(num_patches, num_patches)
        self.norm2 = Affine(dim)
        self.mlp = Mlp(dim, int(4.0 * dim), drop)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ResMLPModels(nn.Module):
    """The authors' `resmlp_models` (drop_path_rate must be 0 here: stochastic depth is random)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=768,
        depth=12,
        drop_rate=0.0,
        drop_path_rate=0.0,
        init_scale=1e-4,
        global_pool="avg",
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.blocks = nn.ModuleList(
            [LayersScaleMlpBlocks(embed_dim, drop_rate, init_scale, num_patches) for _ in range(depth)]
        )
        self.norm = Affine(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = x.mean(dim=1).reshape(B, 1, -1)
        return x[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


AUTHORS = {"ResMLP": ResMLPModels}
