"""AS-MLP as the authors compute it (svip-lab/AS-MLP, models/as_mlp.py at dd1eb4f), re-written from its semantics:
NCHW maps throughout, the axial shift as their pure-PyTorch formulation (zero pad on all four sides, torch.chunk
into shift_size channel chunks, torch.roll of chunk j by j - pad, narrow back), which equals their CUDA kernel;
GroupNorm(1, C) norms; PatchMerging by strided slicing and torch.cat; AdaptiveAvgPool2d before the head."""

import torch
import torch.nn.functional as F
from torch import nn


def torch_shift(x, shift_size, dim):
    _, _, height, width = x.shape
    pad = shift_size // 2
    x = F.pad(x, (pad, pad, pad, pad), "constant", 0)
    chunks = torch.chunk(x, shift_size, 1)  # fewer than shift_size chunks when C is small
    shifted = [torch.roll(chunk, shift, dim) for chunk, shift in zip(chunks, range(-pad, pad + 1), strict=False)]
    x = torch.cat(shifted, 1)
    return torch.narrow(torch.narrow(x, 2, pad, height), 3, pad, width)


def kernel_shift(x, shift_size, dim):
    """The CUDA kernel's rule, element by element (for checking `torch_shift` on small tensors): channel c of group
    g = c // ceil(C / k) reads position i + (k // 2 - g) along dim, zero outside."""
    _, channels, height, width = x.shape
    group = -(-channels // shift_size)
    out = torch.zeros_like(x)
    for c in range(channels):
        s = shift_size // 2 - c // group
        for i in range(height if dim == 2 else width):
            if 0 <= i + s < (height if dim == 2 else width):
                if dim == 2:
                    out[:, c, i, :] = x[:, c, i + s, :]
                else:
                    out[:, c, :, i] = x[:, c, :, i + s]
    return out


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class AxialShift(nn.Module):
    def __init__(self, dim, shift_size, as_bias=True):
        super().__init__()
        self.shift_size = shift_size
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, 1, 0, bias=as_bias)
        self.conv2_2 = nn.Conv2d(dim, dim, 1, 1, 0, bias=as_bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, 1, 0, bias=as_bias)
        self.actn = nn.GELU()
        self.norm1 = nn.GroupNorm(1, dim)
        self.norm2 = nn.GroupNorm(1, dim)

    def forward(self, x):
        x = self.actn(self.norm1(self.conv1(x)))
        if self.shift_size == 1:
            x_lr = x_td = x
        else:
            x_lr, x_td = torch_shift(x, self.shift_size, 3), torch_shift(x, self.shift_size, 2)
        x = self.actn(self.conv2_1(x_lr)) + self.actn(self.conv2_2(x_td))
        return self.conv3(self.norm2(x))


class AxialShiftedBlock(nn.Module):
    def __init__(self, dim, shift_size, mlp_ratio, as_bias, drop):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.axial_shift = AxialShift(dim, shift_size, as_bias)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.axial_shift(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, 1, bias=False)
        self.norm = nn.GroupNorm(1, 4 * dim)

    def forward(self, x):
        _, _, height, width = x.shape
        assert height % 2 == 0 and width % 2 == 0, f"x size ({height}*{width}) are not even."
        x0 = x[:, :, 0::2, 0::2]
        x1 = x[:, :, 1::2, 0::2]
        x2 = x[:, :, 0::2, 1::2]
        x3 = x[:, :, 1::2, 1::2]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], 1)))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, shift_size, mlp_ratio, as_bias, drop, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(AxialShiftedBlock(dim, shift_size, mlp_ratio, as_bias, drop) for _ in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim, patch_norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.GroupNorm(1, embed_dim) if patch_norm else None

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class AS_MLP(nn.Module):
    """Without the authors' input-size assertion (the parity tests run odd sizes; nothing else depends on it)."""

    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        shift_size=5,
        mlp_ratio=4.0,
        as_bias=True,
        drop_rate=0.0,
        drop_path_rate=0.0,
        patch_norm=True,
        global_pool="avg",
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(
            BasicLayer(
                embed_dim * 2**i, depth, shift_size, mlp_ratio, as_bias, drop_rate, downsample=i < len(depths) - 1
            )
            for i, depth in enumerate(depths)
        )
        num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.GroupNorm(1, num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return torch.flatten(self.avgpool(self.norm(x)), 1)

    def forward(self, x):
        return self.head(self.forward_features(x))


AUTHORS = {"ASMLP": AS_MLP}
