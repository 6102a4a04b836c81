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

from .layers import linear, onednn_applies, onednn_linear
from .vip import (
    LAYER_NORM_EPS,
    Downsample,
    PatchEmbed,
    PermutatorBlock,
    Reweight,
    StagedMLP,
    check_stage_lists,
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


def cycle_shift_kernel(channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The depthwise convolution weight (C, 1, kh', kw') that moves channel i by its cycle offset along the
    pseudo-kernel's axis: a single 1 per channel, at the centre plus the offset (kh', kw' are made odd)."""
    kh, kw = kernel_size
    k = max(kh, kw)
    half = k // 2
    taps = torch.zeros(channels, 2 * half + 1)
    taps[torch.arange(channels), torch.tensor(cycle_shifts(channels, k), dtype=torch.long) + half] = 1.0
    return taps.view(channels, 1, 1, -1) if kh == 1 else taps.view(channels, 1, -1, 1)


def cycle_shift(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Channels-last x (B, H, W, C) with channel i read at its cycle offset; zero where that falls outside.

    One depthwise convolution with the one-hot `kernel` of `cycle_shift_kernel`: every output is 1 * x plus
    0 * neighbours, so the values are exactly x's (deform_conv2d also samples zeros outside: no wrap-around).
    On the channels-last view it reads and writes memory once, 2-3x faster than copying strided channel
    slices; it runs in any dtype and exports to ONNX as a Conv node.
    """
    kh, kw = kernel.shape[2:]
    moved = F.conv2d(x.permute(0, 3, 1, 2), kernel.to(x.dtype), padding=(kh // 2, kw // 2), groups=x.shape[-1])
    return moved.permute(0, 2, 3, 1)


class CycleFC(nn.Module):
    """Cycle FC on channels-last tokens (B, H, W, C_in) -> (B, H, W, C_out).

    `weight` (C_out, C_in, 1, 1) and `bias` are the authors' parameters. Their `offset` buffer is not kept: it is
    fixed by `kernel_size` (see `cycle_shifts`), and allmlp.load_weights checks it when a checkpoint has one.
    The shift's one-hot kernel is a buffer outside the state dict, so it follows `.to()` and never reaches a file.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], bias: bool = True):
        super().__init__()
        if len(kernel_size) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel_size) or min(kernel_size) > 1:
            raise ValueError(f"Cycle FC needs a 1 x k or k x 1 pseudo-kernel, got {kernel_size!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.register_buffer("shift_kernel", cycle_shift_kernel(in_channels, self.kernel_size), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation of Cycle FC in their models: weight trunc-normal(0.02), bias zero."""
        init_trunc_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted, weight = cycle_shift(x, self.shift_kernel), self.weight.flatten(1)
        if onednn_applies(shifted, self):
            return onednn_linear(shifted, weight, self.bias)
        return F.linear(shifted, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


# Fold the split attention into the projection where a token grid has at least this many tokens per channel.
FOLD_MIN_TOKENS_PER_CHANNEL = 4


class CycleTokenMixer(nn.Module):
    """CycleMLP's token mixer: Cycle FC along width (`sfc_h`, 1x3) and height (`sfc_w`, 3x1), a channel map
    (`mlp_c`), fused by split attention and projected (`proj`). The names are the authors' checkpoint keys.

    Everything after the shifts is linear in the branches' inputs but for the per-(image, channel) split
    attention weights a_j, so the three maps, the weighting and the projection fold into one map per image and
    branch: `proj(sum_j a_j * (X_j W_j^T + b_j)) = sum_j X_j (W_j^T diag(a_j) Wp^T) + const`, where X_j is x
    shifted for branch j. On large token grids (early stages) this does 3 instead of 4 matrix products per
    token and writes no branch outputs; folding costs 3 C^3 per image, so small grids take the direct path.
    """

    def __init__(self, dim: int, qkv_bias: bool = False):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.sfc_h = CycleFC(dim, dim, (1, 3))
        self.sfc_w = CycleFC(dim, dim, (3, 1))
        self.reweight = Reweight(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The mixed tokens, plus `residual` if given (added inside the last matrix product)."""
        if x.shape[1] * x.shape[2] >= FOLD_MIN_TOKENS_PER_CHANNEL * x.shape[3]:
            return self._forward_folded(x, residual)
        fused = split_attention(self.sfc_h(x), self.sfc_w(x), linear(x, self.mlp_c), self.reweight)
        return linear(fused, self.proj, residual=residual)

    def _forward_folded(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        batch, height, width, dim = x.shape
        shifted_h, shifted_w = cycle_shift(x, self.sfc_h.shift_kernel), cycle_shift(x, self.sfc_w.shift_kernel)
        dtype = shifted_h.dtype  # the convolution's: autocast's dtype under autocast
        branches = (  # (input, weight, bias) in the reweight's branch order: h, w, c
            (shifted_h, self.sfc_h.weight.flatten(1), self.sfc_h.bias),
            (shifted_w, self.sfc_w.weight.flatten(1), self.sfc_w.bias),
            (x.to(dtype), self.mlp_c.weight, self.mlp_c.bias),
        )
        # Split attention on the branches' means, which are the maps of the inputs' means.
        means = [F.linear(inputs.mean((1, 2)), weight, bias) for inputs, weight, bias in branches]
        attention = self.reweight(sum(means)).view(batch, dim, 3).softmax(dim=-1)  # (B, C, branch)
        proj_t = self.proj.weight.t()
        const = self.proj.bias.to(dtype).expand(batch, -1)
        folded = []
        for j, (_, weight, bias) in enumerate(branches):
            scale = attention[..., j]
            folded.append(((weight.t() * scale[:, None, :]) @ proj_t).to(dtype))  # (B, C_in, C_out)
            if bias is not None:
                const = const + ((bias * scale) @ proj_t).to(dtype)
        fuse = residual is not None and residual.dtype == dtype
        start = (residual.reshape(batch, height * width, -1) if fuse else 0) + const[:, None, :]
        rows = [inputs.reshape(batch, height * width, dim) for inputs, _, _ in branches]
        # With a residual, `start` is a fresh (B, HW, C_out) tensor to accumulate into; else a broadcast constant.
        out = start.baddbmm_(rows[0], folded[0]) if fuse else torch.baddbmm(start, rows[0], folded[0])
        for inputs, maps in zip(rows[1:], folded[1:], strict=True):
            out.baddbmm_(inputs, maps)
        out = out.view(batch, height, width, -1)
        return out if residual is None or fuse else residual + out


class CycleMLP(StagedMLP):
    """CycleMLP with the authors' argument names (their class CycleNet); any input size works, odd ones too.

    Patch embedding conv 7x7 stride 4 (padding 2), then stages with a conv 3x3 stride 2 between them (where
    `transitions[i]`). `forward_features` gives the (B, H, W, C) tokens after the final norm. With
    `fork_feat=True` (dense prediction) there is no `norm`/`head`: LayerNorms `norm{i}` follow each stage
    (i = its index in `network`) and `forward` returns the list of the stages' normalised (B, C, H, W) maps.
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
    ):
        super().__init__()
        check_stage_lists(layers, embed_dims=embed_dims, transitions=transitions, mlp_ratios=mlp_ratios)
        for i in range(len(layers) - 1):
            if not transitions[i] and embed_dims[i] != embed_dims[i + 1]:
                raise ValueError(
                    f"stage {i} changes the width ({embed_dims[i]} -> {embed_dims[i + 1]}) without a transition; "
                    f"CycleMLP only changes width in its 3x3 stride-2 downsampling (set transitions[{i}]=True)"
                )
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
        )
        self._init_model(self.config["num_classes"], embed_dims[-1], drop_rate)
        self.fork_feat = fork_feat

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=2)
        network: list[nn.Module] = []
        self.out_indices: list[int] = []  # positions of the stages in `network`
        for i, rates in enumerate(self._drop_path_rates(layers, drop_path_rate)):
            dim = embed_dims[i]
            self.out_indices.append(len(network))
            network.append(
                nn.Sequential(
                    *(PermutatorBlock(dim, CycleTokenMixer(dim, qkv_bias), mlp_ratios[i], r, skip_lam) for r in rates)
                )
            )
            if i < len(layers) - 1 and transitions[i]:
                network.append(Downsample(dim, embed_dims[i + 1], kernel_size=3, stride=2, padding=1))
        self.network = nn.ModuleList(network)
        if fork_feat:
            for i, index in enumerate(self.out_indices):
                self.add_module(f"norm{index}", nn.LayerNorm(embed_dims[i], eps=LAYER_NORM_EPS))
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

    def _require_head(self, what: str) -> None:
        if self.fork_feat:
            raise ValueError(f"{what}: this CycleMLP was built with fork_feat=True (feature maps only, no head)")

    def get_classifier(self) -> nn.Module:
        self._require_head("get_classifier")
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self._require_head("reset_classifier")
        super().reset_classifier(num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # a trace records one fixed shape; the check would only warn there
            return
        if x.ndim != 4 or x.shape[1] != self.config["in_chans"] or min(x.shape[2:]) < 3:
            raise ValueError(
                f"CycleMLP expects input of shape (B, {self.config['in_chans']}, H, W) with any H, W >= 3, "
                f"got {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, H, W, C) tokens after the final norm; with fork_feat, the normalised (B, C, H, W) map of each stage."""
        self._check_input(x)
        x = self.patch_embed(x)
        maps = []
        for index, layer in enumerate(self.network):
            x = self._run_layer(layer, x)
            if self.fork_feat and index in self.out_indices:
                maps.append(getattr(self, f"norm{index}")(x).permute(0, 3, 1, 2).contiguous())
        return maps if self.fork_feat else self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        self._require_head("forward_head")
        return super().forward_head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.forward_features(x)
        return features if self.fork_feat else self.forward_head(features)
