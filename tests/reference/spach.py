"""SPACH-MLP as the authors compute it (microsoft/SPACH `models/spach/`, dcede1e), re-written from its semantics
without allmlp: tokens (B, N, C); the depthwise position conv and the downsampling reshape to NCHW copies and back
(`Reshape2HW` infers a square grid from N); the spatial MLP transposes to (B, C, N); the stem asserts the input
size; stages are `nn.Sequential`s whose first entry (stages 2-4) is the downsampling; a shared spatial MLP is one
module object set in every block."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def reshape2n(x):  # 'b c h w -> b (h w) c'
    return x.flatten(2).transpose(1, 2).contiguous()


def reshape2hw(x):  # 'b (h w) c -> b c h w', h = w = sqrt(n)
    n = x.shape[1]
    side = int(n**0.5)
    assert n == side * side
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side).contiguous()


class Reshape2N(nn.Module):
    def forward(self, x):
        return reshape2n(x)


class Reshape2HW(nn.Module):
    def forward(self, x):
        return reshape2hw(x)


class DownsampleConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.net = nn.Sequential(
            Reshape2HW(),
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 2, stride=2, bias=False),
                nn.GroupNorm(num_groups=1, num_channels=out_channels),
            ),
            Reshape2N(),
        )

    def forward(self, x):
        return self.net(x)


class ChannelMLP(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SpatialMLP(ChannelMLP):
    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return x.transpose(1, 2)


class DWConv(nn.Module):
    def __init__(self, dim, kernel_size=3):
        super().__init__()
        self.net = nn.Sequential(
            Reshape2HW(), nn.Conv2d(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim), Reshape2N()
        )

    def forward(self, x):
        return self.net(x)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        return x * x.new_empty((x.shape[0], 1, 1)).bernoulli_(keep) / keep


class MixingBlock(nn.Module):
    def __init__(self, dim, spatial_func, shared_spatial_func, spatial_kwargs, channel_ratio, drop, drop_path):
        super().__init__()
        self.valid_spatial_func = spatial_func is not None
        if spatial_func is not None:
            self.spatial_func = spatial_func if shared_spatial_func else spatial_func(**spatial_kwargs)
            self.norm1 = LayerNorm(dim)
            self.gamma_1 = nn.Parameter(1e-4 * torch.ones(1, 1, dim))
        self.channel_func = ChannelMLP(dim, int(dim * channel_ratio), drop)
        self.norm2 = LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe_net = DWConv(dim)

    def forward(self, x):
        in_x = x
        if self.valid_spatial_func:
            x = x + self.drop_path(self.gamma_1 * self.spatial_func(self.norm1(in_x)))
        x = x + self.cpe_net(in_x)
        return x + self.drop_path(self.channel_func(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        assert x.shape[2] == self.img_size and x.shape[3] == self.img_size
        return self.proj(x)


class Conv4PatchEmbed(PatchEmbed):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, hidden_chans=64):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        sub = patch_size // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden_chans, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, embed_dim, kernel_size=sub, stride=sub),
        )


STEMS = {"conv1": PatchEmbed, "conv4": Conv4PatchEmbed}
SPATIAL = {"mlp": SpatialMLP, "pass": None}


class Spach(nn.Module):
    def __init__(
        self, num_classes=1000, img_size=224, in_chans=3, hidden_dim=384, patch_size=16, net_arch=None,
        stem_type="conv1", drop_path_rate=0.0, shared_spatial_func=False, token_ratio=0.5, channel_ratio=2.0,
        drop_rate=0.0, **kwargs,
    ):  # fmt: skip
        super().__init__()
        self.stem = STEMS[stem_type](img_size, patch_size, in_chans, hidden_dim)
        self.norm1 = LayerNorm(hidden_dim)
        n = self.stem.num_patches
        spatial_kwargs = dict(in_features=n, hidden_features=int(n * token_ratio), drop=drop_rate)
        if shared_spatial_func:
            assert len(net_arch) == 1 and net_arch[0][0] != "pass"
            spatial_func = SPATIAL[net_arch[0][0]](**spatial_kwargs)
        else:
            spatial_func = None
        blocks = []
        for func_type, depth in net_arch:
            for _ in range(depth):
                blocks.append(
                    MixingBlock(
                        hidden_dim, spatial_func or SPATIAL[func_type], shared_spatial_func, spatial_kwargs,
                        channel_ratio, drop_rate, drop_path_rate,
                    )
                )  # fmt: skip
        self.blocks = nn.Sequential(*blocks)
        self.norm2 = LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward_features(self, x):
        x = self.norm1(reshape2n(self.stem(x)))
        return self.norm2(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x).mean(1))


class SpachMS(nn.Module):
    def __init__(
        self, num_classes=1000, img_size=224, in_chans=3, hidden_dim=384, patch_size=16, net_arch=None,
        stem_type="conv1", drop_path_rate=0.0, shared_spatial_func=False, token_ratio=0.5, channel_ratio=2.0,
        drop_rate=0.0, **kwargs,
    ):  # fmt: skip
        super().__init__()
        assert len(net_arch) == 4
        self.stem = STEMS[stem_type](img_size, patch_size, in_chans, hidden_dim)
        self.norm1 = LayerNorm(hidden_dim)
        dim, seq_len = hidden_dim, self.stem.num_patches
        num_blocks = sum(sum(depth for _, depth in stage) for stage in net_arch)
        block_idx = 0
        for stage_idx, stage_arch in enumerate(net_arch):
            blocks = []
            if stage_idx > 0:
                blocks.append(DownsampleConv(dim, dim * 2))
                dim, seq_len = dim * 2, seq_len // 4
            spatial_kwargs = dict(in_features=seq_len, hidden_features=int(seq_len * token_ratio), drop=drop_rate)
            if stage_idx > 0 and shared_spatial_func:
                assert len(stage_arch) == 1 and stage_arch[0][0] != "pass"
                spatial_func = SPATIAL[stage_arch[0][0]](**spatial_kwargs)
            else:
                spatial_func = None
            for func_type, depth in stage_arch:
                for _ in range(depth):
                    rate = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                    blocks.append(
                        MixingBlock(
                            dim, spatial_func or SPATIAL[func_type], shared_spatial_func, spatial_kwargs,
                            channel_ratio, drop_rate, rate,
                        )
                    )  # fmt: skip
                    block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
        self.norm2 = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        x = self.norm1(reshape2n(self.stem(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.norm2(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean(1))


def _config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "global_pool"}


def _authors(cls):
    """The authors' model for an allmlp config (`global_pool` ignored: theirs always averages); with num_classes 0,
    timm's convention: no head (pre-logits out)."""

    def build(**config) -> nn.Module:
        model = cls(**_config(config))
        if config.get("num_classes") == 0:
            model.head = nn.Identity()
        return model

    return build


AUTHORS = {"Spach": _authors(Spach), "SpachMS": _authors(SpachMS)}
