"""Hire-MLP as the authors compute it (ggjy/Hire-Wave-MLP.pytorch, mlp_based/hire_mlp.py at 7ef7ddd7), re-written
from its semantics without allmlp: NCHW maps throughout; each shifted branch cloned, rolled (or zero-shifted by
F.pad + narrow), padded at the bottom / right with F.pad (circular, constant or replicate), regrouped by reshape and
permute into (B, C * pixel, H / pixel, W), mixed, regrouped back, narrowed and rolled back; the fusion on the
flattened mean. Same module names as the authors' (and so allmlp's) state dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None, drop=0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, out_features or in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class HireMLP(nn.Module):
    def __init__(self, dim, pixel=2, step=1, step_pad_mode="c", pixel_pad_mode="c"):
        super().__init__()
        self.pixel, self.step = pixel, step
        self.step_pad_mode, self.pixel_pad_mode = step_pad_mode, pixel_pad_mode
        self.mlp_h1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_h1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_h2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_w1 = nn.Conv2d(dim * pixel, dim // 2, 1, bias=False)
        self.mlp_w1_norm = nn.BatchNorm2d(dim // 2)
        self.mlp_w2 = nn.Conv2d(dim // 2, dim * pixel, 1, bias=True)
        self.mlp_c = nn.Conv2d(dim, dim, 1, bias=True)
        self.act = nn.ReLU()
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.pixel
        pad_h, pad_w = (p - H % p) % p, (p - W % p) % p
        h, w = x.clone(), x.clone()
        if self.step:
            if self.step_pad_mode == "0":
                h = torch.narrow(F.pad(h, (0, 0, self.step, 0), "constant", 0), 2, 0, H)
                w = torch.narrow(F.pad(w, (self.step, 0, 0, 0), "constant", 0), 3, 0, W)
            else:
                h = torch.roll(h, self.step, -2)
                w = torch.roll(w, self.step, -1)
        if self.pixel_pad_mode == "0":
            h = F.pad(h, (0, 0, 0, pad_h), "constant", 0)
            w = F.pad(w, (0, pad_w, 0, 0), "constant", 0)
        elif self.pixel_pad_mode == "c":
            h = F.pad(h, (0, 0, 0, pad_h), mode="circular")
            w = F.pad(w, (0, pad_w, 0, 0), mode="circular")
        else:
            h = F.pad(h, (0, 0, 0, pad_h), mode="replicate")
            w = F.pad(w, (0, pad_w, 0, 0), mode="replicate")
        h = h.reshape(B, C, (H + pad_h) // p, p, W).permute(0, 1, 3, 2, 4).reshape(B, C * p, (H + pad_h) // p, W)
        w = w.reshape(B, C, H, (W + pad_w) // p, p).permute(0, 1, 4, 2, 3).reshape(B, C * p, H, (W + pad_w) // p)
        h = self.mlp_h2(self.act(self.mlp_h1_norm(self.mlp_h1(h))))
        w = self.mlp_w2(self.act(self.mlp_w1_norm(self.mlp_w1(w))))
        h = h.reshape(B, C, p, (H + pad_h) // p, W).permute(0, 1, 3, 2, 4).reshape(B, C, H + pad_h, W)
        w = w.reshape(B, C, p, H, (W + pad_w) // p).permute(0, 1, 3, 4, 2).reshape(B, C, H, W + pad_w)
        h = torch.narrow(h, 2, 0, H)
        w = torch.narrow(w, 3, 0, W)
        if self.step and self.step_pad_mode == "c":
            h = torch.roll(h, -self.step, -2)
            w = torch.roll(w, -self.step, -1)
        c = self.mlp_c(x)
        a = (h + w + c).flatten(2).mean(2).unsqueeze(2).unsqueeze(2)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(3).unsqueeze(3)
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class HireBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, pixel, step, step_pad_mode, pixel_pad_mode):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = HireMLP(dim, pixel=pixel, step=step, step_pad_mode=step_pad_mode, pixel_pad_mode=pixel_pad_mode)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvNormReLU(nn.Module):
    """The authors' PatchEmbedOverlapping (7x7 / 4, padding 2) and Downsample (3x3 / 2, padding 1)."""

    def __init__(self, in_dim, out_dim, kernel_size, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.proj(x)))


class HireMLPNet(nn.Module):
    """The authors' HireMLPNet (drop rates left out: the parity tests run without them)."""

    def __init__(
        self,
        layers,
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dims=None,
        mlp_ratios=None,
        drop_rate=0.0,
        drop_path_rate=0.0,
        pixel=(2, 2, 2, 2),
        step_stride=(2, 2, 2, 2),
        step_dilation=(1, 1, 1, 1),
        step_pad_mode="c",
        pixel_pad_mode="c",
        global_pool="avg",
    ):
        super().__init__()
        self.patch_embed = ConvNormReLU(in_chans, embed_dims[0], 7, 4, 2)
        network = []
        for i in range(len(layers)):
            blocks = [
                HireBlock(
                    embed_dims[i],
                    mlp_ratios[i],
                    pixel[i],
                    (j % step_stride[i]) * step_dilation[i],
                    step_pad_mode,
                    pixel_pad_mode,
                )
                for j in range(layers[i])
            ]
            network.append(nn.Sequential(*blocks))
            if i >= len(layers) - 1:
                break
            network.append(ConvNormReLU(embed_dims[i], embed_dims[i + 1], 3, 2, 1))
        self.network = nn.ModuleList(network)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        x = self.norm(x)
        return self.head(x.flatten(2).mean(2))


AUTHORS = {"HireMLP": HireMLPNet}
