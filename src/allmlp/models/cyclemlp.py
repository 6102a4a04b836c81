"""CycleMLP (Chen et al., ICLR 2022, arXiv 2107.10224), exact to the authors' code (ShoufaChen/CycleMLP).

The token mixer mixes each token with neighbours along height and width through Cycle FC: a channel-wise linear
map whose input channel i is read at a position shifted by a "cycle" pattern over channels (for pseudo-kernel
1x3: 0, +1, -1, 0, +1, -1, ... along the width). The authors evaluate it with torchvision's deform_conv2d and
constant offsets; here it is an integer shift with zero fill followed by a linear map over channels, which is
the same function (the shifted values are bit-identical), several times faster, and exportable to ONNX.
The block, split attention, downsampling and model scaffolding are ViP's, which CycleMLP's code extends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .interface import pretrained_cfg
from .layers import to_pair
from .vip import (
    LAYER_NORM_EPS,
    DenseStagedMLP,
    Downsample,
    PatchEmbed,
    PermutatorBlock,
    Reweight,
    branch_means,
    check_stage_lists,
    check_widths_change_at_transitions,
    init_trunc_normal_,
    split_attention,
)

# The authors' CycleMLP_B1 ... CycleMLP_B5 constructors (patch embedding 7x7, stride 4).
CONFIGS = {
    "b1": dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], transitions=[True] * 4),
    "b2": dict(layers=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], transitions=[True] * 4),
    "b3": dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], transitions=[True] * 4),
    "b4": dict(layers=[3, 8, 27, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], transitions=[True] * 4),
    "b5": dict(layers=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4], transitions=[True] * 4),
}


def cycle_shifts(channels: int, kernel_size: int) -> list[int]:
    """The offset of each input channel along Cycle FC's axis: ((i + k // 2) mod k) - k // 2.

    For k = 3: 0, +1, -1, 0, +1, -1, ...; for k = 7: 0, 1, 2, 3, -3, -2, -1, ... (the authors' gen_offset).
    """
    half = kernel_size // 2
    return [(i + half) % kernel_size - half for i in range(channels)]


def cycle_shift_kernel(channels: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """The (channels, k) taps of a depthwise convolution that moves channel i by its cycle offset: a single 1 per
    channel, at tap (i + k // 2) mod k (the centre plus `cycle_shifts`' offset), in `like`'s dtype and device.

    Built from the channel count on every call rather than stored, so that nothing derived lives in a buffer
    (meta-device construction, `to_empty` and functional transforms see the same module as the authors')."""
    taps = torch.arange(kernel_size, device=like.device)
    centre_plus_offset = (torch.arange(channels, device=like.device) + kernel_size // 2) % kernel_size
    return (centre_plus_offset[:, None] == taps).to(like.dtype)


def cycle_shift(x: torch.Tensor, kernel_size: tuple[int, int], channels: int) -> torch.Tensor:
    """Channels-last x (B, H, W, C = `channels`) with channel i read at its cycle offset along the pseudo-kernel's
    axis (width for 1 x k, height for k x 1); zero where that falls outside, as deform_conv2d samples zeros there.

    One depthwise convolution with one-hot taps: every output is 1 * x plus 0 * neighbours, so the values are
    exactly x's. It runs in any dtype and exports to ONNX as a Conv node.
    """
    kh, kw = kernel_size
    k = max(kh, kw)
    taps = cycle_shift_kernel(channels, k, x)
    kernel = taps[:, None, None, :] if kh == 1 else taps[:, None, :, None]
    moved = F.conv2d(x.permute(0, 3, 1, 2), kernel, padding=(kh // 2, kw // 2), groups=channels)
    return moved.permute(0, 2, 3, 1)


class CycleFC(nn.Module):
    """Cycle FC on channels-last tokens (B, H, W, C_in) -> (B, H, W, C_out): the cycle shift, then a linear map
    over channels with the module's own `weight` (C_out, C_in, 1, 1) and `bias`, the authors' parameters.

    Their `offset` buffer is not kept: it is fixed by `kernel_size` (see `cycle_shifts`), and allmlp.load_weights
    checks it when a checkpoint has one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], bias: bool = True):
        super().__init__()
        if len(kernel_size) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel_size) or min(kernel_size) > 1:
            raise ValueError(f"Cycle FC needs a 1 x k or k x 1 pseudo-kernel, got {kernel_size!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation of Cycle FC in their models: weight trunc-normal(0.02), bias zero."""
        init_trunc_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(cycle_shift(x, self.kernel_size, self.in_channels), self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class CycleTokenMixer(nn.Module):
    """CycleMLP's token mixer: Cycle FC along width (`sfc_h`, 1x3) and height (`sfc_w`, 3x1), a channel map
    (`mlp_c`), fused by split attention and projected (`proj`). The names are the authors' checkpoint keys."""

    def __init__(self, dim: int, qkv_bias: bool = False):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Reweight(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self.sfc_h(x), self.sfc_w(x), self.mlp_c(x)
        return self.proj(split_attention(h, w, c, self.reweight(branch_means(h, w, c)), [-1]))


class CycleMLP(DenseStagedMLP):
    """CycleMLP with the authors' argument names (their class CycleNet); any input size works, odd ones too.

    Patch embedding conv 7x7 stride 4 (padding 2), then stages with a conv 3x3 stride 2 between them (where
    `transitions[i]`). `forward_features` gives the (B, H, W, C) tokens after the final norm. With
    `fork_feat=True` (dense prediction) there is no final norm and no head: LayerNorms `norm{i}` follow each stage
    (i = its index in `network`) and `forward` returns the list of the stages' normalised (B, C, H, W) maps, which
    is `forward_intermediates(x, norm=True, intermediates_only=True)`.
    `img_size` and `patch_size` are recorded only; the authors' code ignores them too.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 4, 2),
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        transitions: Sequence[bool] = (True, True, True, True),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        skip_lam: float = 1.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fork_feat: bool = False,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_stage_lists(layers, embed_dims=embed_dims, transitions=transitions, mlp_ratios=mlp_ratios)
        check_widths_change_at_transitions("CycleMLP", embed_dims, transitions)
        self.config = dict(
            layers=list(layers),
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0 if fork_feat else num_classes,
            embed_dims=list(embed_dims),
            transitions=[bool(t) for t in transitions],
            mlp_ratios=list(mlp_ratios),
            skip_lam=skip_lam,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            fork_feat=fork_feat,
            global_pool=global_pool,
        )
        self._init_model(self.config["num_classes"], embed_dims[-1], drop_rate, global_pool)
        self.fork_feat = fork_feat
        self.accepts = ("CycleMLP", in_chans, (3, -1, 3, -1), f"(B, {in_chans}, H, W) with any H, W >= 3")
        size = to_pair(img_size, "img_size")
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=False, num_classes=self.config["num_classes"]
        )

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=2)
        network: list[nn.Module] = []
        for i, rates in enumerate(self._drop_path_rates(layers, drop_path_rate)):
            dim = embed_dims[i]
            network.append(
                nn.Sequential(
                    *(PermutatorBlock(dim, CycleTokenMixer(dim, qkv_bias), mlp_ratios[i], r, skip_lam) for r in rates)
                )
            )
            if i < len(layers) - 1 and transitions[i]:
                network.append(Downsample(dim, embed_dims[i + 1], kernel_size=3, stride=2, padding=1))
        self.network = nn.ModuleList(network)
        self.feature_info = self._feature_info(embed_dims, 4)
        if fork_feat:
            for i, position in enumerate(self._stage_positions()):
                self.add_module(f"norm{position}", nn.LayerNorm(embed_dims[i], eps=LAYER_NORM_EPS))
            self.norm, self.head = nn.Identity(), nn.Identity()
        else:
            self.norm = nn.LayerNorm(embed_dims[-1], eps=LAYER_NORM_EPS)
            self.head = self._new_head(num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation, which also draws Cycle FC weights trunc-normal(0.02) with zero bias."""
        super().init_weights()
        for module in self.modules():
            if isinstance(module, CycleFC):
                module.reset_parameters()
