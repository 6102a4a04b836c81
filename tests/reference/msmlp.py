"""MS-MLP as the authors compute it (JegZheng/MS-MLP `models/ms_mlp.py` at a10d34d), re-written from their code's
semantics without allmlp: NCHW maps between blocks; a block splits the channels with torch.chunk, rolls every
group with torch.roll along the width and the height, mixes each with its own depthwise conv, concatenates both
directions and adds them, then permutes to channels-last for LayerNorm / pwconv1 / GELU / pwconv2 / gamma and back;
the patch embeddings flatten to (B, L, C) for their LayerNorm, assert the input size they were built for and view
the tokens back to NCHW; the head averages the map (AdaptiveAvgPool2d), then normalises, then classifies. Their
own LayerNorm class (channels_last: F.layer_norm) with eps 1e-6 throughout; exact GELU; timm's DropPath.
"""

import torch
import torch.nn.functional as F
from torch import nn


class AuthorsLayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class AuthorsDropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class AuthorsMixShiftBlock(nn.Module):
    def __init__(self, dim, shift_size, shift_dist, mix_size, mlp_ratio, drop_path):
        super().__init__()
        self.shift_size = shift_size
        self.shift_dist = shift_dist
        self.chunk_size = [c.shape[0] for c in torch.chunk(torch.zeros(dim), shift_size)]
        kernels = [(k, k // 2) for k in mix_size]
        self.dwconv_lr = nn.ModuleList(
            [
                nn.Conv2d(c, c, kernel_size=k[0], padding=k[1], groups=c)
                for c, k in zip(self.chunk_size, kernels, strict=False)
            ]
        )
        self.dwconv_td = nn.ModuleList(
            [
                nn.Conv2d(c, c, kernel_size=k[0], padding=k[1], groups=c)
                for c, k in zip(self.chunk_size, kernels, strict=False)
            ]
        )
        self.norm = AuthorsLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = AuthorsDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        groups = torch.chunk(x, self.shift_size, 1)
        lr = [torch.roll(g, s, 3) for g, s in zip(groups, self.shift_dist, strict=False)]
        td = [torch.roll(g, s, 2) for g, s in zip(groups, self.shift_dist, strict=False)]
        for i in range(self.shift_size):
            lr[i] = self.dwconv_lr[i](lr[i])
            td[i] = self.dwconv_td[i](td[i])
        x = torch.cat(lr, 1) + torch.cat(td, 1)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class AuthorsPatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, norm):
        super().__init__()
        self.img_size = img_size
        self.grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = AuthorsLayerNorm(embed_dim) if norm else None

    def forward(self, x):
        B, C, H, W = x.shape
        assert (H, W) == tuple(self.img_size), f"input {H}x{W}, model {self.img_size}"
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x.view(B, self.grid[0], self.grid[1], self.embed_dim).permute(0, 3, 1, 2).contiguous()


class AuthorsBasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, shift_size, shift_dist, mix_size, mlp_ratio, drop_path, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            [AuthorsMixShiftBlock(dim, shift_size, shift_dist, mix_size, mlp_ratio, drop_path[i]) for i in range(depth)]
        )
        self.downsample = AuthorsPatchEmbed(resolution, (2, 2), dim, 2 * dim, norm=True) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


class AuthorsMSMLP(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        shift_size=5,
        shift_dist=(-2, -1, 0, 1, 2),
        mix_size=((1, 1, 3, 5, 7), (1, 1, 3, 5, 5), (1, 1, 3, 3, 3), (1, 1, 1, 1, 3)),
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.1,
        patch_norm=True,
        global_pool="avg",
    ):
        super().__init__()
        img_size, patch_size = pair(img_size), pair(patch_size)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = AuthorsPatchEmbed(img_size, patch_size, in_chans, embed_dim, norm=patch_norm)
        grid = self.patch_embed.grid
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList(
            [
                AuthorsBasicLayer(
                    embed_dim * 2**i,
                    (grid[0] // 2**i, grid[1] // 2**i),
                    depths[i],
                    shift_size,
                    shift_dist,
                    mix_size[i],
                    mlp_ratio,
                    dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < len(depths) - 1,
                )
                for i in range(len(depths))
            ]
        )
        self.norm = AuthorsLayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(torch.flatten(self.avgpool(x), 1))

    def forward(self, x):
        return self.head(self.forward_features(x))


AUTHORS = {"MSMLP": AuthorsMSMLP}
