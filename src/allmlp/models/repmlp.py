"""RepMLPNet (Ding et al., CVPR 2022, arXiv 2112.11081), exact to the authors' code (DingXiaoH/RepMLP,
`repmlpnet.py` at commit 3eff13f), with their module names, so that their released state dicts load unchanged.

A hierarchical MLP of BatchNorm-ed blocks: each unit is x + RepMLPBlock(prebn1(x)), then + FFN(prebn2(x)). The
RepMLP block cuts the map into h x w partitions and mixes the positions of each partition with one FC (`fc3`, a
1x1 Conv2d over the h*w positions, grouped into `num_sharesets` sets: channel c uses set c % S), adds local
convolutions (`repconv{k}`, k x k, zero-padded at the partition borders) at training time, and multiplies the
result by a global perceptron (channel gates from the mean of the map). `allmlp.reparameterize(model)` folds the
local convolutions and every BatchNorm on fc3 into fc3 (the authors' locality injection): the deploy model, whose
state dict is the authors' `deploy=True` layout (fc3 with a bias, no fc3_bn, no repconv).

Exactness: every op is the authors' (BatchNorm throughout, exact GELU in the FFN, ReLU after the stem and the
downsampling convs, sigmoid gates), including their reshape that, with several partitions per stage, reads a
sample's (partition, chunk) rows back in (chunk, partition) order (see RepMLPBlock.forward). Tokens are
channels-last (B, H, W, C) between modules and every convolution and BatchNorm sees an NCHW view of them in
channels_last memory, where oneDNN is fastest. fc3 gets a sample's (set, position) pairs as channels and its
(partition, chunk) rows as spatial extent (a view of the tokens where a stage is one partition of one set) and
computes one matrix product per set; one-channel and 1x1 local convs are sums of shifted inputs. Both are
nn.Conv2d subclasses that compute what nn.Conv2d computes. Parity with an independent port of the authors'
forward, in training and deploy form, is tested at 1e-5 (tests/test_repmlp.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .entries import IN1K, ModelEntry, Preprocessing, WeightRelease
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, linear_drop_path_rates, to_pair

PAPER = "Ding et al., RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality, CVPR 2022 (arXiv 2112.11081)"

# The authors' create_RepMLPNet_* constructors (repmlpnet.py); patch_size (4, 4), globalperceptron_reduce 4.
CONFIGS = {
    "t224": dict(channels=[64, 128, 256, 512], hs=[56, 28, 14, 7], ws=[56, 28, 14, 7], num_blocks=[2, 2, 6, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 16, 128]),
    "b224": dict(channels=[96, 192, 384, 768], hs=[56, 28, 14, 7], ws=[56, 28, 14, 7], num_blocks=[2, 2, 12, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 32, 128]),
    "t256": dict(channels=[64, 128, 256, 512], hs=[64, 32, 16, 8], ws=[64, 32, 16, 8], num_blocks=[2, 2, 6, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 16, 128]),
    "b256": dict(channels=[96, 192, 384, 768], hs=[64, 32, 16, 8], ws=[64, 32, 16, 8], num_blocks=[2, 2, 12, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 32, 128]),
    "d256": dict(channels=[80, 160, 320, 640], hs=[64, 32, 16, 8], ws=[64, 32, 16, 8], num_blocks=[2, 2, 18, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 16, 128]),
    "l256": dict(channels=[96, 192, 384, 768], hs=[64, 32, 16, 8], ws=[64, 32, 16, 8], num_blocks=[2, 2, 18, 2],
                 reparam_conv_k=[1, 3], sharesets_nums=[1, 4, 32, 256]),
}  # fmt: skip


class DepthwiseConv(nn.Conv2d):
    """nn.Conv2d (same constructor, same function on any input) for the local convs `repconv{k}.conv`: a
    depthwise (groups == in_channels == out_channels), stride-1, zero-padded convolution with one channel or a 1x1
    kernel is computed as a sum of shifted copies of the input times its taps, which oneDNN runs some 10x slower
    as a convolution of a one-channel image (the first stage of every released model). Any other configuration is
    nn.Conv2d's own convolution."""

    def _shifted_sum(self) -> bool:
        depthwise = self.groups == self.in_channels == self.out_channels
        plain = self.stride == (1, 1) and self.dilation == (1, 1) and self.padding_mode == "zeros"
        return depthwise and plain and (self.in_channels == 1 or self.kernel_size == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._shifted_sum() or isinstance(self.padding, str):
            return super().forward(x)
        k_h, k_w = self.kernel_size
        p_h, p_w = self.padding
        height, width = x.shape[2] + 2 * p_h - k_h + 1, x.shape[3] + 2 * p_w - k_w + 1
        padded = F.pad(x.permute(2, 3, 0, 1), (0, 0, 0, 0, p_w, p_w, p_h, p_h))  # (H, W, B, C): pad W, then H
        taps = self.weight[:, 0].permute(1, 2, 0)  # (k_h, k_w, C)
        out = padded[0:height, 0:width] * taps[0, 0]
        for dy in range(k_h):
            for dx in range(k_w):
                if dy or dx:
                    out = out + padded[dy : dy + height, dx : dx + width] * taps[dy, dx]
        if self.bias is not None:
            out = out + self.bias
        return out.permute(2, 3, 0, 1)


class ConvBN(nn.Sequential):
    """The authors' conv_bn / conv_bn_relu: a bias-free Conv2d (`conv`), BatchNorm2d (`bn`), optionally ReLU; NCHW.
    `depthwise`: the conv is a DepthwiseConv (groups == channels, stride 1)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, groups=1, relu=False,
        depthwise=False,
    ):  # fmt: skip
        super().__init__()
        if depthwise:
            self.conv = DepthwiseConv(in_channels, in_channels, kernel_size, 1, padding, groups=in_channels, bias=False)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if relu:
            self.relu = nn.ReLU()


class PatchEmbed(ConvBN):
    """`conv_embedding`: conv (kernel = stride = patch) + BN + ReLU, from the NCHW image to (B, H, W, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1).contiguous()


class Downsample(ConvBN):
    """`embeds.i`: conv 2x2 stride 2 + BN + ReLU between stages, on (B, H, W, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GlobalPerceptron(nn.Module):
    """Channel gates from the map's mean: sigmoid(fc2(relu(fc1(mean)))), (B, C, 1, 1); fc1/fc2 are 1x1 convs."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift per channel, in float64 (for folding)."""
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def conv_as_fc(kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (S * h * w, h * w) weight of a grouped FC over the positions of an h x w partition that computes the
    depthwise k x k convolution `kernel` (S, 1, k, k) zero-padded at the partition borders: row s * hw + q, column
    p is the tap of set s that output position q reads from input position p (each basis image through the conv)."""
    sets, k_h, k_w = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    basis = torch.eye(h * w, dtype=kernel.dtype, device=kernel.device).reshape(h * w, 1, h, w).expand(-1, sets, -1, -1)
    responses = F.conv2d(basis, kernel, padding=(k_h // 2, k_w // 2), groups=sets)  # (p, s, qy, qx)
    return responses.reshape(h * w, sets * h * w).t()


class GroupedPointwiseConv(nn.Conv2d):
    """nn.Conv2d (same constructor, same function on any input) for fc3, the authors' grouped 1x1 conv: a 1x1,
    stride-1, unpadded convolution is computed as one matrix product per group (`torch.bmm`) on its own weight and
    bias, several times faster on CPU than oneDNN's grouped 1x1 convolution for these shapes. Any other
    configuration is nn.Conv2d's own convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid")
        if not pointwise:
            return super().forward(x)
        batch, _, height, width = x.shape
        groups, per_in, per_out = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        columns = x.reshape(batch, groups, per_in, height * width).permute(1, 2, 0, 3)
        columns = columns.reshape(groups, per_in, batch * height * width)
        weight = self.weight.reshape(groups, per_out, per_in)
        if self.bias is None:
            out = torch.bmm(weight, columns)
        else:
            out = torch.baddbmm(self.bias.reshape(groups, per_out, 1), weight, columns)
        out = out.reshape(groups, per_out, batch, height * width).permute(2, 0, 1, 3)
        return out.reshape(batch, self.out_channels, height, width)


class RepMLPBlock(nn.Module):
    """The RepMLP block on an NCHW map whose height and width are multiples of (h, w); the authors' names.

    Training form: fc3 (bias-free) + fc3_bn (BatchNorm over the S sets) + sum of repconv{k} (k x k conv + BN per
    set, zero padding at partition borders); deploy form (`deploy=True` or `reparameterized()`): one fc3 with bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        h: int,
        w: int,
        reparam_conv_k: Sequence[int] | None = None,
        globalperceptron_reduce: int = 4,
        num_sharesets: int = 1,
        deploy: bool = False,
    ):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"RepMLPBlock needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.C, self.S, self.h, self.w = in_channels, num_sharesets, h, w
        self.globalperceptron_reduce = globalperceptron_reduce
        self.deploy = deploy
        self.gp = GlobalPerceptron(in_channels, in_channels // globalperceptron_reduce)
        positions = num_sharesets * h * w
        self.fc3 = GroupedPointwiseConv(positions, positions, 1, 1, 0, groups=num_sharesets, bias=deploy)
        self.fc3_bn = nn.Identity() if deploy else nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = None if reparam_conv_k is None else [int(k) for k in reparam_conv_k]
        if not deploy and self.reparam_conv_k is not None:
            for k in self.reparam_conv_k:
                self.add_module(f"repconv{k}", ConvBN(num_sharesets, num_sharesets, k, 1, k // 2, depthwise=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gp(x)
        batch, channels, height, width = x.shape
        h, w, sets = self.h, self.w, self.S
        rows, cols, chunks = height // h, width // w, channels // sets
        # The authors' rows: per sample, every (partition row, partition column, chunk), of S * h * w values each
        # (channel c = chunk * S + set). fc3 gets a sample's (set, position) pairs as channels and its rows as
        # spatial extent: one GEMM per sample, and a view of the tokens where a stage is one partition of one set.
        tokens = x.permute(0, 2, 3, 1).reshape(batch, rows, h, cols, w, chunks, sets)
        fc_in = tokens.permute(0, 6, 2, 4, 1, 3, 5).reshape(batch, sets * h * w, rows * cols * chunks, 1)
        out = self.fc3_bn(self.fc3(fc_in).reshape(batch, sets, h * w, rows * cols * chunks))
        if not self.deploy and self.reparam_conv_k is not None:
            local = self._local(tokens.permute(0, 6, 1, 3, 5, 2, 4).reshape(batch, sets, rows * cols * chunks, h, w))
            out = out + local.reshape(batch, sets, rows * cols * chunks, h * w).transpose(2, 3)
        # The authors read a sample's rows back as (chunk, partition row, partition column) in that order, not the
        # (partition row, partition column, chunk) they were written in: with several partitions and chunks, the
        # results of partition p, chunk j land elsewhere. Kept (a reshape); one partition per stage is unaffected.
        out = out.reshape(batch, sets, h, w, chunks, rows, cols).permute(0, 5, 2, 6, 3, 4, 1)
        return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2) * gates

    def _local(self, rows: torch.Tensor) -> torch.Tensor:
        """The sum of the local branches (each conv + BN) on a sample's (partition, chunk) rows, (B, S, R, h, w).

        The authors convolve every row as an image of its own; here each sample's rows are stacked into one tall
        image per set, with zero rows between them as wide as the largest kernel reaches, so that every
        convolution sees sample-first input (per-sample gradients, Opacus) with the same zero padding at the
        partition borders. The separators' outputs are dropped before each BatchNorm (its batch statistics)."""
        batch, sets, count, h, w = rows.shape
        gap = max(self.reparam_conv_k) // 2
        tall = F.pad(rows, (0, 0, 0, gap)).reshape(batch, sets, count * (h + gap), w)
        total = None
        for name, branch in self.named_children():
            if name.startswith("repconv"):
                conv = branch.conv(tall).reshape(batch, sets, count, h + gap, w)[:, :, :, :h]
                out = branch.bn(conv.reshape(batch, sets, count * h, w))
                total = out if total is None else total + out
        return total

    @torch.no_grad()
    def reparameterized(self) -> RepMLPBlock:
        """The deploy form (the authors' local_inject): fc3_bn, each repconv's conv and BN folded into one fc3 with
        a bias (computed in float64, stored in fc3's dtype). Equal to this block in eval mode."""
        if self.deploy:
            return copy.deepcopy(self)
        weight = self.fc3.weight
        with torch.device(weight.device):
            folded = RepMLPBlock(
                self.C, self.C, self.h, self.w, self.reparam_conv_k, self.globalperceptron_reduce, self.S, deploy=True
            ).to(weight.dtype)
        folded.gp.load_state_dict(self.gp.state_dict())
        positions = self.h * self.w
        scale, shift = bn_scale_shift(self.fc3_bn)
        fc_weight = weight.double().flatten(1) * scale.repeat_interleave(positions)[:, None]
        fc_bias = shift.repeat_interleave(positions)
        if self.reparam_conv_k is not None:
            largest = max(self.reparam_conv_k)
            kernel = weight.new_zeros(self.S, 1, largest, largest, dtype=torch.float64)
            for k in self.reparam_conv_k:
                branch = getattr(self, f"repconv{k}")
                k_scale, k_shift = bn_scale_shift(branch.bn)
                pad = (largest - k) // 2
                kernel[:, :, pad : pad + k, pad : pad + k] += branch.conv.weight.double() * k_scale[:, None, None, None]
                fc_bias = fc_bias + k_shift.repeat_interleave(positions)
            fc_weight = fc_weight + conv_as_fc(kernel, self.h, self.w)
        folded.fc3.weight.copy_(fc_weight.reshape_as(weight))
        folded.fc3.bias.copy_(fc_bias)
        return folded.train(self.training)

    def extra_repr(self) -> str:
        return f"channels={self.C}, partition={self.h}x{self.w}, sharesets={self.S}, deploy={self.deploy}"


class FFNBlock(nn.Module):
    """ffn_fc1 (1x1 conv + BN), exact GELU, ffn_fc2 (1x1 conv + BN), on NCHW."""

    def __init__(self, in_channels: int, hidden_channels: int):
        super().__init__()
        self.ffn_fc1 = ConvBN(in_channels, hidden_channels, 1)
        self.ffn_fc2 = ConvBN(hidden_channels, in_channels, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    """y = x + repmlp_block(prebn1(x)); y + ffn_block(prebn2(y)), on (B, H, W, C) tokens (NCHW views inside).
    `drop_path` (stochastic depth on both branches) is an allmlp option; the authors' units have none (rate 0)."""

    def __init__(
        self,
        channels: int,
        h: int,
        w: int,
        reparam_conv_k: Sequence[int] | None,
        globalperceptron_reduce: int,
        ffn_expand: int = 4,
        num_sharesets: int = 1,
        deploy: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.repmlp_block = RepMLPBlock(
            channels, channels, h, w, reparam_conv_k, globalperceptron_reduce, num_sharesets, deploy
        )
        self.ffn_block = FFNBlock(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        y = x + self.drop_path(self.repmlp_block(self.prebn1(x)))
        return (y + self.drop_path(self.ffn_block(self.prebn2(y)))).permute(0, 2, 3, 1)


def stage_grids(height: int, width: int, patch_size: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """The token grid of each stage for an input of height x width (the convs' floor division, as in PyTorch)."""
    grids = [(height // patch_size[0], width // patch_size[1])]
    for _ in range(stages - 1):
        grids.append((grids[-1][0] // 2, grids[-1][1] // 2))
    return grids


def check_partitions(x: torch.Tensor, patch_size: tuple[int, int], hs: Sequence[int], ws: Sequence[int]) -> None:
    """Raise a ValueError unless every stage's token grid is a whole number of hs[i] x ws[i] partitions (the
    authors' reshape needs it and mixes samples up otherwise). Wrapped for torch.fx like `check_input`."""
    if torch.jit.is_tracing():
        return
    problem = partition_problem(x.shape[2], x.shape[3], patch_size, hs, ws)
    if problem is not None:
        raise ValueError(
            f"RepMLPNet expects input whose token grid in every stage is a whole number of partitions "
            f"(hs={list(hs)}, ws={list(ws)}; e.g. {valid_sizes(patch_size[0], hs)[0]}x"
            f"{valid_sizes(patch_size[1], ws)[0]}), got {tuple(x.shape)}, {problem}"
        )


def partition_problem(height: int, width: int, patch_size, hs: Sequence[int], ws: Sequence[int]) -> str | None:
    """Why an input of height x width does not fit the partitions (None: it fits)."""
    grids = stage_grids(height, width, patch_size, len(hs))
    for i, ((gh, gw), h, w) in enumerate(zip(grids, hs, ws, strict=True)):
        if gh < h or gw < w or gh % h or gw % w:
            return f"whose stage {i} grid is {gh}x{gw} for {h}x{w} partitions"
    return None


torch.fx.wrap("check_partitions")


def one_of(name: str, value, alias: str, alias_value, default):
    """An argument given by its authors' name or its allmlp alias (not both with different values)."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"{name} (the authors' name) and {alias} (its allmlp alias) differ: {value} and {alias_value}; pass one"
        )
    return next((v for v in (alias_value, value) if v is not None), default)


def valid_sizes(patch: int, parts: Sequence[int], count: int = 3) -> list[int]:
    """The smallest `count` input sides whose grids divide into `parts` partitions at every stage."""
    period = math.lcm(*[part * 2**i for i, part in enumerate(parts)])
    grids = [
        grid
        for grid in range(1, period * count + 2 ** len(parts))
        if all((grid // 2**i) % part == 0 and grid // 2**i >= part for i, part in enumerate(parts))
    ]
    return [grid * patch for grid in grids[:count]]


class RepMLPNet(ModelInterface, nn.Module):
    """RepMLPNet with the authors' argument names; `forward_features` gives (B, H, W, C) tokens after `head_norm`.

    `num_class` and `in_channels` (the authors' names) are also accepted as `num_classes` and `in_chans`, the names
    create_model, the trainer and the rest of allmlp use, under which `config` stores them (passing both names of
    one argument with different values is an error). allmlp options beyond the authors': `drop_path_rate`
    (stochastic depth, linear over all units; the authors train without), `drop_rate` (dropout before the head),
    `img_size` (the input size recorded in pretrained_cfg; default hs[0] * patch), `global_pool`.

    `deploy=True` builds the inference form (fc3 with bias, no local convolutions); `allmlp.reparameterize` turns
    a trained model into it. Input sizes: every stage's grid must be a whole number of hs[i] x ws[i] partitions
    (224, 448, ... for the *224 variants; 256, 512, ... for *256).
    """

    __jit_unused_properties__ = ["head_hidden_size", "default_cfg", "norm"]

    def __init__(
        self,
        in_channels: int | None = None,
        num_class: int | None = None,
        patch_size: int | Sequence[int] = (4, 4),
        num_blocks: Sequence[int] = (2, 2, 6, 2),
        channels: Sequence[int] = (192, 384, 768, 1536),
        hs: Sequence[int] = (64, 32, 16, 8),
        ws: Sequence[int] = (64, 32, 16, 8),
        sharesets_nums: Sequence[int] = (4, 8, 16, 32),
        reparam_conv_k: Sequence[int] | None = (3,),
        globalperceptron_reduce: int = 4,
        deploy: bool = False,
        num_classes: int | None = None,
        in_chans: int | None = None,
        img_size: int | Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        num_classes = one_of("num_class", num_class, "num_classes", num_classes, 1000)
        in_chans = one_of("in_channels", in_channels, "in_chans", in_chans, 3)
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_chans!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_class must be an int >= 0 (0: no head), got {num_classes!r}")
        patch = to_pair(patch_size, "patch_size")
        if not all(isinstance(p, int) and p >= 1 for p in patch):
            raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch_size!r}")
        stages = len(num_blocks)
        if not stages or not all(isinstance(n, int) and n >= 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be a non-empty list of block counts >= 1, got {num_blocks!r}")
        for name, values in (("channels", channels), ("hs", hs), ("ws", ws), ("sharesets_nums", sharesets_nums)):
            if values is None or len(values) != stages or not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"{name} needs one positive int per stage ({stages} stages), got {values!r}")
        for i, (c, s) in enumerate(zip(channels, sharesets_nums, strict=True)):
            if c % s:
                raise ValueError(f"stage {i}: sharesets_nums[{i}] must divide channels[{i}] = {c}, got {s}")
        if not isinstance(globalperceptron_reduce, int) or not 1 <= globalperceptron_reduce <= min(channels):
            raise ValueError(
                f"globalperceptron_reduce must be an int in 1..{min(channels)} (the global perceptron has channels "
                f"// globalperceptron_reduce hidden units), got {globalperceptron_reduce!r}"
            )
        if reparam_conv_k is not None and (
            not len(reparam_conv_k)
            or not all(isinstance(k, int) and k >= 1 and k % 2 for k in reparam_conv_k)
            or len(set(reparam_conv_k)) != len(reparam_conv_k)
        ):
            raise ValueError(
                f"reparam_conv_k must be None or a list of distinct odd kernel sizes, got {reparam_conv_k!r}"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        heights, widths = valid_sizes(patch[0], hs), valid_sizes(patch[1], ws)
        if not heights or not widths:
            raise ValueError(f"no input size fits hs={list(hs)}, ws={list(ws)} with patch_size {list(patch)}")
        size = (heights[0], widths[0]) if img_size is None else to_pair(img_size, "img_size")
        if partition_problem(*size, patch, hs, ws) is not None:
            raise ValueError(
                f"img_size must be an input size the partitions fit (e.g. {heights[0]}x{widths[0]}), got {img_size!r}, "
                f"{partition_problem(*size, patch, hs, ws)}"
            )
        self.config = dict(
            in_chans=in_chans,
            patch_size=list(patch),
            num_blocks=list(num_blocks),
            channels=list(channels),
            hs=list(hs),
            ws=list(ws),
            sharesets_nums=list(sharesets_nums),
            reparam_conv_k=None if reparam_conv_k is None else list(reparam_conv_k),
            globalperceptron_reduce=globalperceptron_reduce,
            deploy=bool(deploy),
            num_classes=num_classes,
            img_size=list(size),
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )
        self.num_classes = num_classes
        self.num_features = channels[-1]
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.patch_size, self.hs, self.ws = patch, list(hs), list(ws)
        self.accepts = (
            "RepMLPNet",
            in_chans,
            (heights[0], -1, widths[0], -1),
            f"(B, {in_chans}, H, W) whose token grid in every stage is a whole number of hs x ws partitions "
            f"(H in {', '.join(map(str, heights))}, ...; W in {', '.join(map(str, widths))}, ...)",
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size),
            "conv_embedding.conv",
            fixed_input_size=True,
            num_classes=num_classes,
            interpolation="bilinear",
            crop_pct=1.0,
        )

        self.conv_embedding = PatchEmbed(in_chans, channels[0], patch, stride=patch, relu=True)
        rates = linear_drop_path_rates(drop_path_rate, sum(num_blocks))
        starts = [sum(num_blocks[:i]) for i in range(stages)]
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    RepMLPNetUnit(
                        channels[i],
                        hs[i],
                        ws[i],
                        reparam_conv_k,
                        globalperceptron_reduce,
                        4,
                        sharesets_nums[i],
                        deploy,
                        rates[starts[i] + j],
                    )
                    for j in range(num_blocks[i])
                )
            )
            for i in range(stages)
        )
        self.embeds = nn.ModuleList(
            Downsample(channels[i], channels[i + 1], 2, stride=2, relu=True) for i in range(stages - 1)
        )
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"stages.{i}", num_chs=channels[i], reduction=patch[0] * 2**i) for i in range(stages)
        ]

    # `norm` is the interface's name for the final norm, `head_norm` the authors' (and their checkpoints') name.
    @property
    def norm(self) -> nn.Module:
        return self.head_norm

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__("head_norm" if name == "norm" else name, value)

    def group_matcher(self, coarse: bool = False) -> dict:
        # embeds.i (the downsampling after stage i) sorts after stage i's blocks and before stage i + 1
        if coarse:
            blocks = [(r"^stages\.(\d+)", None), (r"^embeds\.(\d+)", (99998,)), (r"^head_norm", (99999,))]
        else:
            blocks = [(r"^stages\.(\d+)\.(\d+)", None), (r"^embeds\.(\d+)", (99998,)), (r"^head_norm", (99999,))]
        return dict(stem=r"^conv_embedding", blocks=blocks)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        check_partitions(x, self.patch_size, self.hs, self.ws)
        return self.conv_embedding(x)

    def _feature_stages(self) -> list[list[nn.Module]]:
        return [[self.stages[0]]] + [[self.embeds[i], self.stages[i + 1]] for i in range(len(self.embeds))]

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """The final norm, which fits the last stage only."""
        return self.head_norm if index == len(self.stages) - 1 else None

    def _truncate(self, last: int) -> None:
        if last < len(self.stages) - 1:
            self.head_norm = nn.Identity()  # the final norm has the last stage's width, which is gone
        self.stages = self.stages[: last + 1]
        self.embeds = self.embeds[:last]

    def _apply_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The final norm (BatchNorm2d, the authors' `head_norm`) on an NCHW view of the (B, H, W, C) tokens."""
        return norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.embeds[i - 1](x)
            # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(stage, x)
            else:
                x = stage(x)
        return self._apply_norm(self.head_norm, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_RELEASES = {  # Google Drive file ids and ImageNet-1k top-1 from the README of DingXiaoH/RepMLP
    "t224": ("1TgPDD78G-d3h_Y_vNTuqYdSJZHmnju7b", 76.62, "1vDMl06wVUvkJgC7DOeleNA"),
    "b224": ("1GwoUvxGXgzKArlCf0V9kvc9_3GtkGltp", 80.32, "1MzkKTTzmOdOvtUCuRqwswA"),
    "t256": ("1mU0L76x20eAKzkHxEM7J2BvEOLWx_mux", 77.44, "1pALVZES9lVnjpXf20NxW3Q"),
    "b256": ("1W-__gXE7903cX-gOSXEGxNBCJjvqFCiJ", 81.03, "1GGqIOoVBAd3thaU5LoUtqQ"),
    "d256": ("1e5IYac0UHnJq2_lzbuE7J4rahMENX2ha", 80.83, "12PvSLGepMCCImr--D-RQvw"),
    "l256": ("1SHhNJ6pZax9qMLm8DJZtQ_XfmcmddPYU", 81.68, "1qz2JBUyYY6JEpnzFIdm-xQ"),
}
PREPROCESSING = Preprocessing(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
    crop_pct=1.0,
    note="the authors' evaluation (test.py, data/build.py): shorter side resized to the input size (bilinear), "
    "centre crop",
)
ENTRIES = [
    ModelEntry(
        name=f"repmlpnet_{variant}",
        architecture=RepMLPNet,
        config=dict(num_classes=1000, img_size=config["hs"][0] * 4, **config),
        preprocessing=PREPROCESSING,
        releases=(
            WeightRelease(
                "imagenet1k",
                f"https://drive.google.com/file/d/{drive}/view (DingXiaoH/RepMLP README; also Baidu "
                f"https://pan.baidu.com/s/{baidu}?pwd=rmlp): the training-time state dict",
                1000,
                IN1K,
                top1,
                # Google Drive answers a program with a confirmation page: a person downloads the file.
                file_name=f"DingXiaoH/RepMLP/RepMLPNet-{variant.upper()}.pth",
                page=f"https://drive.google.com/file/d/{drive}/view",
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
    for drive, top1, baidu in [_RELEASES[variant]]
]
