"""RepMLPNet as the authors compute it (DingXiaoH/RepMLP `repmlpnet.py`, commit 3eff13f), re-written from their
code's semantics without allmlp: NCHW throughout, partitions by reshape + permute into (-1, S*h*w, 1, 1) rows for
fc3 (a grouped 1x1 Conv2d), fc3_bn on (-1, S, h, w), the local convs on (-1, S, h, w) added to it, the global
perceptron by adaptive_avg_pool2d, and the locality injection by fusing BN into each conv and pushing an identity
basis through the padded kernel. The authors' module names, so state dicts are interchangeable with allmlp's.
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride, padding, groups=1, relu=False):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    if relu:
        seq.add_module("relu", nn.ReLU())
    return seq


def fuse(conv_weight, bn):
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    bias = bn.bias - bn.running_mean * t
    repeats = conv_weight.shape[0] // t.shape[0]
    return conv_weight * t.repeat_interleave(repeats).reshape(-1, 1, 1, 1), bias.repeat_interleave(repeats)


class GlobalPerceptron(nn.Module):
    def __init__(self, cin, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(cin, hidden, 1, 1, bias=True)
        self.fc2 = nn.Conv2d(hidden, cin, 1, 1, bias=True)
        self.cin = cin

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.sigmoid(self.fc2(F.relu(self.fc1(x))))
        return x.view(-1, self.cin, 1, 1)


class RepMLPBlock(nn.Module):
    def __init__(self, channels, h, w, reparam_conv_k, reduce, sets, deploy):
        super().__init__()
        self.C, self.S, self.h, self.w, self.deploy = channels, sets, h, w, deploy
        self.gp = GlobalPerceptron(channels, channels // reduce)
        self.fc3 = nn.Conv2d(h * w * sets, h * w * sets, 1, 1, 0, bias=deploy, groups=sets)
        self.fc3_bn = nn.Identity() if deploy else nn.BatchNorm2d(sets)
        self.ks = reparam_conv_k
        if not deploy and reparam_conv_k is not None:
            for k in reparam_conv_k:
                setattr(self, f"repconv{k}", conv_bn(sets, sets, k, 1, k // 2, groups=sets))

    def forward(self, inputs):
        gv = self.gp(inputs)
        shape = inputs.size()
        hp, wp = shape[2] // self.h, shape[3] // self.w
        parts = inputs.reshape(-1, self.C, hp, self.h, wp, self.w).permute(0, 2, 4, 1, 3, 5)
        out = self.fc3(parts.reshape(-1, self.S * self.h * self.w, 1, 1))
        out = self.fc3_bn(out.reshape(-1, self.S, self.h, self.w)).reshape(-1, hp, wp, self.S, self.h, self.w)
        if self.ks is not None and not self.deploy:
            conv_in = parts.reshape(-1, self.S, self.h, self.w)
            conv_out = 0
            for k in self.ks:
                conv_out += getattr(self, f"repconv{k}")(conv_in)
            out += conv_out.reshape(-1, hp, wp, self.S, self.h, self.w)
        out = out.permute(0, 3, 1, 4, 2, 5).reshape(*shape)
        return out * gv

    @torch.no_grad()
    def local_inject(self):
        weight, bias = fuse(self.fc3.weight, self.fc3_bn)
        if self.ks is not None:
            big = max(self.ks)
            kernel = torch.zeros(self.S, 1, big, big)
            kbias = torch.zeros(self.S)
            for k in self.ks:
                branch = getattr(self, f"repconv{k}")
                kk, kb = fuse(branch.conv.weight, branch.bn)
                kernel += F.pad(kk, [(big - k) // 2] * 4)
                kbias += kb
                delattr(self, f"repconv{k}")
            hw = self.h * self.w
            eye = torch.eye(hw).repeat(1, self.S).reshape(hw, self.S, self.h, self.w)
            fc = F.conv2d(eye, kernel, padding=big // 2, groups=self.S).reshape(hw, self.S * hw).t()
            weight = weight + fc.reshape_as(weight)
            bias = bias + kbias.repeat_interleave(hw)
        self.fc3 = nn.Conv2d(self.S * self.h * self.w, self.S * self.h * self.w, 1, 1, 0, bias=True, groups=self.S)
        self.fc3.weight.copy_(weight)
        self.fc3.bias.copy_(bias)
        self.fc3_bn = nn.Identity()
        self.deploy = True


class FFNBlock(nn.Module):
    def __init__(self, cin, hidden):
        super().__init__()
        self.ffn_fc1 = conv_bn(cin, hidden, 1, 1, 0)
        self.ffn_fc2 = conv_bn(hidden, cin, 1, 1, 0)
        self.act = nn.GELU()

    def forward(self, x):
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    def __init__(self, channels, h, w, reparam_conv_k, reduce, sets, deploy):
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, h, w, reparam_conv_k, reduce, sets, deploy)
        self.ffn_block = FFNBlock(channels, channels * 4)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


class AuthorsRepMLPNet(nn.Module):
    def __init__(self, in_channels=3, num_class=1000, patch_size=(4, 4), num_blocks=(2, 2, 6, 2),
                 channels=(192, 384, 768, 1536), hs=(64, 32, 16, 8), ws=(64, 32, 16, 8), sharesets_nums=(4, 8, 16, 32),
                 reparam_conv_k=(3,), globalperceptron_reduce=4, deploy=False):  # fmt: skip
        super().__init__()
        self.conv_embedding = conv_bn(in_channels, channels[0], tuple(patch_size), tuple(patch_size), 0, relu=True)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                RepMLPNetUnit(
                    channels[i], hs[i], ws[i], reparam_conv_k, globalperceptron_reduce, sharesets_nums[i], deploy
                )  # fmt: skip
                for _ in range(num_blocks[i])
            )
            for i in range(len(num_blocks))
        )
        self.embeds = nn.ModuleList(
            conv_bn(channels[i], channels[i + 1], 2, 2, 0, relu=True) for i in range(len(num_blocks) - 1)
        )
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_class)

    def forward(self, x):
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if i < len(self.stages) - 1:
                x = self.embeds[i](x)
        x = F.adaptive_avg_pool2d(self.head_norm(x), 1)
        return self.head(x.view(x.size(0), -1))

    def locality_injection(self):
        for m in self.modules():
            if hasattr(m, "local_inject"):
                m.local_inject()
        return self


def authors_repmlpnet(**config) -> nn.Module:
    """The authors' model for an allmlp RepMLPNet config, `authors_repmlpnet(**model.config)` (num_classes ->
    num_class, in_chans -> in_channels; allmlp-only options dropped: they must be at their defaults)."""
    for allmlp_name, authors_name in (("num_classes", "num_class"), ("in_chans", "in_channels")):
        if allmlp_name in config:
            config[authors_name] = config.pop(allmlp_name)
    for allmlp_only in ("global_pool", "drop_rate", "drop_path_rate", "img_size"):
        config.pop(allmlp_only, None)
    return AuthorsRepMLPNet(**config)


AUTHORS = {"RepMLPNet": authors_repmlpnet}
