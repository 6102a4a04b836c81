"""Wave-MLP as the authors compute it (huawei-noah/Efficient-AI-Backbones, wavemlp_pytorch/models/wavemlp.py at
f90e129b), re-written from its semantics without allmlp: NCHW maps throughout, 1x1 convolutions, the phase terms
concatenated [x cos | x sin] and mixed by grouped convolutions, the pooled sum fed to the reweight MLP reshaped
(B, C, 3) and softmaxed over the branches, the head on adaptive_avg_pool2d. Same module names as the authors' (and
so allmlp's) state dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind, dim):
    return nn.BatchNorm2d(dim) if kind == "batch" else nn.GroupNorm(1, dim)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None, drop=0.0):
        super().__init__()
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, 1)
        self.fc2 = nn.Conv2d(hidden_features, out_features or in_features, 1, 1)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PATM(nn.Module):
    def __init__(self, dim, qkv_bias=False, mode="fc"):
        super().__init__()
        self.fc_h = nn.Conv2d(dim, dim, 1, 1, bias=qkv_bias)
        self.fc_w = nn.Conv2d(dim, dim, 1, 1, bias=qkv_bias)
        self.fc_c = nn.Conv2d(dim, dim, 1, 1, bias=qkv_bias)
        self.tfc_h = nn.Conv2d(2 * dim, dim, (1, 7), stride=1, padding=(0, 3), groups=dim, bias=False)
        self.tfc_w = nn.Conv2d(2 * dim, dim, (7, 1), stride=1, padding=(3, 0), groups=dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1, 1, bias=True)
        if mode == "fc":
            self.theta_h_conv = nn.Sequential(nn.Conv2d(dim, dim, 1, 1, bias=True), nn.BatchNorm2d(dim), nn.ReLU())
            self.theta_w_conv = nn.Sequential(nn.Conv2d(dim, dim, 1, 1, bias=True), nn.BatchNorm2d(dim), nn.ReLU())
        else:
            self.theta_h_conv = nn.Sequential(
                nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.ReLU()
            )
            self.theta_w_conv = nn.Sequential(
                nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.ReLU()
            )

    def forward(self, x):
        B, C, H, W = x.shape
        theta_h = self.theta_h_conv(x)
        theta_w = self.theta_w_conv(x)
        x_h = self.fc_h(x)
        x_w = self.fc_w(x)
        x_h = torch.cat([x_h * torch.cos(theta_h), x_h * torch.sin(theta_h)], dim=1)
        x_w = torch.cat([x_w * torch.cos(theta_w), x_w * torch.sin(theta_w)], dim=1)
        h = self.tfc_h(x_h)
        w = self.tfc_w(x_w)
        c = self.fc_c(x)
        a = F.adaptive_avg_pool2d(h + w + c, output_size=1)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(-1).unsqueeze(-1)
        x = h * a[0] + w * a[1] + c * a[2]
        return self.proj(x)


class WaveBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, qkv_bias, norm, mode):
        super().__init__()
        self.norm1 = _norm(norm, dim)
        self.attn = PATM(dim, qkv_bias=qkv_bias, mode=mode)
        self.norm2 = _norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedOverlapping(nn.Module):
    def __init__(self, in_chans, embed_dim, norm, use_norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2)
        self.norm = _norm(norm, embed_dim) if use_norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


class Downsample(nn.Module):
    def __init__(self, in_dim, out_dim, norm, use_norm):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=(3, 3), stride=(2, 2), padding=1)
        self.norm = _norm(norm, out_dim) if use_norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


class WaveNet(nn.Module):
    """The authors' WaveNet (drop rates left out: the parity tests run without them)."""

    def __init__(
        self,
        layers,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dims=None,
        transitions=None,
        mlp_ratios=None,
        qkv_bias=False,
        drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer="batch",
        fork_feat=False,
        mode="fc",
        ds_use_norm=True,
        global_pool="avg",
    ):
        super().__init__()
        self.fork_feat = fork_feat
        self.patch_embed = PatchEmbedOverlapping(in_chans, embed_dims[0], norm_layer, ds_use_norm)
        network = []
        for i in range(len(layers)):
            network.append(
                nn.Sequential(
                    *(WaveBlock(embed_dims[i], mlp_ratios[i], qkv_bias, norm_layer, mode) for _ in range(layers[i]))
                )
            )
            if i >= len(layers) - 1:
                break
            if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], norm_layer, ds_use_norm))
        self.network = nn.ModuleList(network)
        if fork_feat:
            self.out_indices = [0, 2, 4, 6]
            for i_emb, i_layer in enumerate(self.out_indices):
                self.add_module(f"norm{i_layer}", _norm(norm_layer, embed_dims[i_emb]))
        else:
            self.norm = _norm(norm_layer, embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        outs = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if self.fork_feat and idx in self.out_indices:
                outs.append(getattr(self, f"norm{idx}")(x))
        if self.fork_feat:
            return outs
        x = self.norm(x)
        return self.head(F.adaptive_avg_pool2d(x, output_size=1).flatten(1))


AUTHORS = {"WaveMLP": WaveNet}
