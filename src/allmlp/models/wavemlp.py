"""Wave-MLP (Tang et al., An Image Patch is a Wave: Phase-Aware Vision MLP, CVPR 2022, arXiv 2111.12294), exact to
the authors' code: huawei-noah/Efficient-AI-Backbones, wavemlp_pytorch/models/wavemlp.py at commit f90e129b.

Each token is a wave: its amplitude is a linear map of the features (`fc_h`, `fc_w`) and its phase is estimated
from them (`theta_h_conv`, `theta_w_conv`: a 1x1 conv ('fc' mode) or a depthwise 3x3 conv ('depthwise' mode), then
BatchNorm and ReLU). The phase-aware token mixer (PATM) concatenates amplitude * cos(phase) and amplitude *
sin(phase) and mixes it along the width (`tfc_h`, a grouped 1x7 conv) and the height (`tfc_w`, 7x1); a channel map
(`fc_c`) is the third branch; split attention fuses the three (branch weights interleaved: branch k of channel c is
`reweight` output 3c + k) before the projection.

Exact, not approximately: the same layers with the same shapes and key names (the authors' `state_dict` loads
unchanged), the same order of operations, exact GELU, BatchNorm / GroupNorm(1) eps 1e-5. What is kept from the
authors' code as it is:
- the phase estimation always uses BatchNorm, also in the GroupNorm(1) models (S, M, B);
- the grouped `tfc` convolutions read channels 2c and 2c + 1 of the [cos | sin] concatenation, so the cos and the
  sin of one channel are not paired (in the first half of the outputs both inputs are cosines, then sines);
- `tfc_h` mixes along the width and `tfc_w` along the height; `fc_h`, `fc_w`, `fc_c` have no bias (qkv_bias);
- M and B have no norm after the stem and the downsampling convolutions (`ds_use_norm=False`);
- `drop_rate` is recorded but, as in the authors' code, applied nowhere (no dropout before the head).
Not kept: the stem reads `in_chans` channels (the authors' always 3), fork_feat takes each stage's output wherever
the stages are in `network` (the authors' fixed [0, 2, 4, 6]; the same for their models), and their FORK_LAST3
environment switch is not read.

Layout: between blocks the tokens are channels-last (B, H, W, C), which is an NCHW tensor in channels_last memory
format seen through a permute. Every layer is the authors' (Conv2d stays Conv2d, so their keys and 4-D shapes load)
and is called as a module on the NCHW view; convolutions and norms keep the channels_last format, so no activation
is copied between layouts, and the elementwise work (GELU, the waves' cos / sin products, the branch fusion) runs on
the contiguous channels-last views, where PyTorch's CPU kernels are fastest. Hire-MLP (hiremlp.py) shares the
scaffold below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import pretrained_cfg
from .layers import DropPath, to_pair
from .vip import (
    DenseStagedMLP,
    Downsample,
    PatchEmbed,
    branch_means,
    check_stage_lists,
    check_widths_change_at_transitions,
    init_trunc_normal_,
    split_attention,
)

NORM_LAYERS = ("batch", "group")
MODES = ("fc", "depthwise")
PAPER = "Tang et al., An Image Patch is a Wave: Phase-Aware Vision MLP, CVPR 2022 (arXiv 2111.12294)"

# The authors' WaveMLP_T_dw, WaveMLP_T, WaveMLP_S, WaveMLP_M, WaveMLP_B constructors (patch embedding 7x7, stride 4).
_FOUR = [True] * 4
CONFIGS = {
    "t_dw": dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], transitions=_FOUR, mlp_ratios=[4, 4, 4, 4],
                 norm_layer="batch", mode="depthwise", ds_use_norm=True),
    "t": dict(layers=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], transitions=_FOUR, mlp_ratios=[4, 4, 4, 4],
              norm_layer="batch", mode="fc", ds_use_norm=True),
    "s": dict(layers=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], transitions=_FOUR, mlp_ratios=[4, 4, 4, 4],
              norm_layer="group", mode="fc", ds_use_norm=True),
    "m": dict(layers=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], transitions=_FOUR, mlp_ratios=[8, 8, 4, 4],
              norm_layer="group", mode="fc", ds_use_norm=False),
    "b": dict(layers=[2, 2, 18, 2], embed_dims=[96, 192, 384, 768], transitions=_FOUR, mlp_ratios=[4, 4, 4, 4],
              norm_layer="group", mode="fc", ds_use_norm=False),
}  # fmt: skip


def make_norm(kind: str, dim: int) -> nn.Module:
    """The authors' norm_layer: nn.BatchNorm2d ('batch') or their MyNorm, GroupNorm with one group ('group')."""
    return nn.BatchNorm2d(dim) if kind == "batch" else nn.GroupNorm(1, dim)


class TokenBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the channels of channels-last tokens (B, H, W, C): the final norm and the fork_feat norms,
    which the model interface applies to tokens. The authors' module and keys; it normalises the NCHW view with its
    own parameters and statistics exactly as nn.BatchNorm2d's forward does (spelled out: TorchScript cannot call
    super(), and torch.fx cannot trace BatchNorm's input-rank check)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(
            x.permute(0, 3, 1, 2),
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        ).permute(0, 2, 3, 1)


class TokenGroupNorm(nn.GroupNorm):
    """GroupNorm over channels-last tokens (B, H, W, C), as TokenBatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.permute(0, 3, 1, 2), self.num_groups, self.weight, self.bias, self.eps).permute(
            0, 2, 3, 1
        )


def make_token_norm(kind: str, dim: int) -> nn.Module:
    return TokenBatchNorm(dim) if kind == "batch" else TokenGroupNorm(1, dim)


class ConvMlp(nn.Module):
    """The authors' Mlp of 1x1 convolutions on NCHW maps: fc1 -> GELU (exact) -> dropout -> fc2 -> dropout. It is
    the channel MLP of every block and, C -> C/4 -> 3C, the split-attention `reweight`."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features or in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the activation right on fc1's output, as the authors': torch.compile then fuses it into the convolution
        # (on a channels-last view instead, eager bfloat16 is ~2% faster and compiled ~6% slower)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def fuse_branches(h: torch.Tensor, w: torch.Tensor, c: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Split attention over three branches, channels-last (B, H, W, C), as Wave-MLP and Hire-MLP do it: `logits`
    (B, 3C, 1, 1), the `reweight` MLP of `pooled_sum(h, w, c)`, are interleaved (channel c, branch k at 3c + k) and
    softmaxed over the branches; returns the weighted sum as an NCHW view (channels_last memory format)."""
    return split_attention(h, w, c, logits.flatten(1), [-1]).permute(0, 3, 1, 2)


def pooled_sum(h: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1): the mean over positions of h + w + c (channels-last), the input of the `reweight` MLP."""
    return branch_means(h, w, c)[:, :, None, None]


class PATM(nn.Module):
    """The phase-aware token mixer on NCHW maps (channels_last memory format in allmlp's models)."""

    def __init__(self, dim: int, qkv_bias: bool = False, mode: str = "fc"):
        super().__init__()
        self.fc_h = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.fc_w = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.fc_c = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.tfc_h = nn.Conv2d(2 * dim, dim, (1, 7), padding=(0, 3), groups=dim, bias=False)
        self.tfc_w = nn.Conv2d(2 * dim, dim, (7, 1), padding=(3, 0), groups=dim, bias=False)
        self.reweight = ConvMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(0.0)
        self.theta_h_conv = self._phase(dim, mode)
        self.theta_w_conv = self._phase(dim, mode)

    @staticmethod
    def _phase(dim: int, mode: str) -> nn.Sequential:
        """Phase estimation: conv, BatchNorm (in every model, whatever its norm_layer), ReLU."""
        if mode == "fc":
            conv = nn.Conv2d(dim, dim, 1)
        else:
            conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the waves are built on the channels-last views (elementwise ops on channels_last NCHW tensors are up to
        # twice as slow on CPU in bfloat16 as on the same memory seen as NHWC) and concatenated
        # along their channels: the same [cos | sin] tensor as the authors', in channels_last memory format
        theta_h = self.theta_h_conv(x).permute(0, 2, 3, 1)
        theta_w = self.theta_w_conv(x).permute(0, 2, 3, 1)
        x_h = self.fc_h(x).permute(0, 2, 3, 1)
        x_w = self.fc_w(x).permute(0, 2, 3, 1)
        h = self.tfc_h(torch.cat([x_h * torch.cos(theta_h), x_h * torch.sin(theta_h)], dim=3).permute(0, 3, 1, 2))
        w = self.tfc_w(torch.cat([x_w * torch.cos(theta_w), x_w * torch.sin(theta_w)], dim=3).permute(0, 3, 1, 2))
        h, w, c = h.permute(0, 2, 3, 1), w.permute(0, 2, 3, 1), self.fc_c(x).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(fuse_branches(h, w, c, self.reweight(pooled_sum(h, w, c)))))


class ConvBlock(nn.Module):
    """Pre-norm block on channels-last tokens (B, H, W, C): x + attn(norm1(x)), then x + mlp(norm2(x)); the norms,
    the mixer and the MLP run on the NCHW view (the authors' layouts and layers)."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module, drop_path: float):
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm2
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 2, 3, 1)


class ConvPatchEmbed(PatchEmbed):
    """The authors' PatchEmbedOverlapping: conv 7x7 stride 4 (padding 2), a norm (or none), an activation (Hire-MLP's
    ReLU, or none); image -> channels-last tokens (B, H', W', C)."""

    def __init__(self, in_chans: int, embed_dim: int, norm: nn.Module, act: nn.Module):
        super().__init__(in_chans, embed_dim, kernel_size=7, stride=4, padding=2)
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x))).permute(0, 2, 3, 1).contiguous()


class ConvDownsample(Downsample):
    """The authors' Downsample: conv 3x3 stride 2 (padding 1), a norm (or none), an activation (or none), on
    channels-last tokens (B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C')."""

    def __init__(self, in_dim: int, out_dim: int, norm: nn.Module, act: nn.Module):
        super().__init__(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1).contiguous()


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


class WaveMLP(DenseStagedMLP):
    """Wave-MLP with the authors' argument names (their class WaveNet); any input size of at least 3x3.

    `norm_layer` is 'batch' (BatchNorm2d: T-dw, T) or 'group' (GroupNorm with one group: S, M, B); `mode` 'fc' or
    'depthwise' is the phase estimation's convolution; `ds_use_norm=False` drops the norms of the stem and the
    downsampling. A conv 3x3 stride 2 follows stage i where `transitions[i]`. `forward_features` gives the
    (B, H, W, C) tokens after the final norm. With `fork_feat=True` (dense prediction) there is no final norm and no
    head: `forward` returns the list of the stages' normalised (B, C, H, W) maps.
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
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: str = "batch",
        fork_feat: bool = False,
        mode: str = "fc",
        ds_use_norm: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_stage_lists(layers, embed_dims=embed_dims, transitions=transitions, mlp_ratios=mlp_ratios)
        check_choice("norm_layer", norm_layer, NORM_LAYERS)
        check_choice("mode", mode, MODES)
        check_widths_change_at_transitions("Wave-MLP", embed_dims, transitions)
        self.config = dict(
            layers=list(layers),
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0 if fork_feat else num_classes,
            embed_dims=list(embed_dims),
            transitions=[bool(t) for t in transitions],
            mlp_ratios=list(mlp_ratios),
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            fork_feat=fork_feat,
            mode=mode,
            ds_use_norm=ds_use_norm,
            global_pool=global_pool,
        )
        self._init_model(self.config["num_classes"], embed_dims[-1], drop_rate, global_pool)
        self.head_drop = nn.Identity()  # the authors accept drop_rate and apply it nowhere
        self.fork_feat = fork_feat
        self.accepts = ("WaveMLP", in_chans, (3, -1, 3, -1), f"(B, {in_chans}, H, W) with any H, W >= 3")
        size = to_pair(img_size, "img_size")
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=False, num_classes=self.config["num_classes"]
        )

        def ds_norm(dim: int) -> nn.Module:
            return make_norm(norm_layer, dim) if ds_use_norm else nn.Identity()

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dims[0], ds_norm(embed_dims[0]), nn.Identity())
        network: list[nn.Module] = []
        for i, rates in enumerate(self._drop_path_rates(layers, drop_path_rate)):
            dim = embed_dims[i]
            blocks = [
                ConvBlock(
                    make_norm(norm_layer, dim),
                    PATM(dim, qkv_bias, mode),
                    make_norm(norm_layer, dim),
                    ConvMlp(dim, int(dim * mlp_ratios[i])),
                    rate,
                )
                for rate in rates
            ]
            network.append(nn.Sequential(*blocks))
            if i < len(layers) - 1 and transitions[i]:
                network.append(ConvDownsample(dim, embed_dims[i + 1], ds_norm(embed_dims[i + 1]), nn.Identity()))
        self.network = nn.ModuleList(network)
        self.feature_info = self._feature_info(embed_dims, 4)
        if fork_feat:
            for i, position in enumerate(self._stage_positions()):
                self.add_module(f"norm{position}", make_token_norm(norm_layer, embed_dims[i]))
            self.norm, self.head = nn.Identity(), nn.Identity()
        else:
            self.norm = make_token_norm(norm_layer, embed_dims[-1])
            self.head = self._new_head(num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear trunc-normal(0.02) with zero bias, BatchNorm 1 / 0 (GroupNorm's and the
        convolutions' are PyTorch's defaults)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


_RELEASE = "https://github.com/huawei-noah/CV-Backbones/releases/download/wavemlp/WaveMLP_{}.pth.tar"
# Published top-1 (authors' README) and eval crop (their default_cfgs: 0.9 for T, S, M; 0.875 for B).
_TOP1 = {"t_dw": 80.1, "t": 80.9, "s": 82.9, "m": 83.3}
_CROP = {"t_dw": 0.9, "t": 0.9, "s": 0.9, "m": 0.9, "b": 0.875}

ENTRIES = [
    ModelEntry(
        name=f"wavemlp_{variant}",
        architecture=WaveMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            _CROP[variant],
            "the authors' evaluation (timm's train.py with their default_cfg): bicubic resize to 224 / crop_pct, "
            "centre crop 224",
        ),
        releases=()
        if variant not in _TOP1
        else (
            hosted(
                "imagenet1k",
                _RELEASE.format(variant.upper().replace("_DW", "_dw"))
                + " (state dict with thop's total_ops / total_params, dropped on load)",
                1000,
                IN1K,
                _TOP1[variant],
                _RELEASE.format(variant.upper().replace("_DW", "_dw")),
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
