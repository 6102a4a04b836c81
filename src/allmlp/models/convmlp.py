"""ConvMLP (Li et al., ConvMLP: Hierarchical Convolutional MLPs for Vision, arXiv 2109.04454), exact to the authors'
code (SHI-Labs/Convolutional-MLPs, `src/convmlp.py` and `src/utils/` at commit 092bf71).

A convolutional tokenizer (three 3x3 convs with BatchNorm and ReLU, then a 3x3 stride-2 max pool: stride 4), a
convolutional stage (residual bottlenecks 1x1 -> 3x3 -> 1x1 with BatchNorm and ReLU, then a 3x3 stride-2 conv with
bias: stride 8), and MLP stages whose blocks are channel MLP -> depthwise 3x3 conv -> channel MLP, a 3x3 stride-2
conv with bias closing every stage but the last. Head: LayerNorm, mean over tokens, Linear.

What is exact, and how: the same modules, names and order of operations as the authors' (their state dicts load
unchanged), with their quirks: the depthwise conv *replaces* the features (no residual, its own `connect_norm`
before it); in the convolutional stage the last ReLU sits inside the residual branch (x + ReLU(BN(conv(...))));
LayerNorm (eps 1e-5) before the mean pool; exact (erf) GELU; BatchNorm eps 1e-5; every stride-2 step (convs with
padding 1, the max pool with padding 1) gives ceil(n / 2), so any input size works, 1x1 included. Stochastic depth
rises linearly *within each stage* from 0 to `drop_path_rate` (the authors' BasicStage; their models hard-code 0.1).

Layout (for speed, same values): activations stay channels-last. The image is put in channels_last memory format,
so every convolution reads and writes (B, H, W, C) memory (`x.permute(0, 3, 1, 2)` is a view) and the LayerNorms
and Linears work on contiguous channels-last tokens without the copies the authors' NCHW <-> NHWC permutes cost.

`classifier_head=False` is the authors' backbone: no final norm and no head; `forward` and `forward_features`
return the last stage's (B, H, W, C) tokens, as the authors' `ConvMLP(classifier_head=False)` does. The four NCHW
maps their detection / segmentation backbones (`DetConvMLP`, `SegConvMLP`) take (tokenizer, convolutional stage,
first and last MLP stage, at strides 4, 8, 16, 32) are `forward_intermediates(x, intermediates_only=True)`, or
`create_model(..., features_only=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, Mlp, linear_drop_path_rates, to_pair

PAPER = "Li et al., ConvMLP: Hierarchical Convolutional MLPs for Vision, arXiv 2109.04454 (2021)"

# The authors' convmlp_s / convmlp_m / convmlp_l constructors.
CONFIGS = {
    "s": dict(blocks=[2, 4, 2], dims=[128, 256, 512], mlp_ratios=[2, 2, 2], channels=64, n_conv_blocks=2),
    "m": dict(blocks=[3, 6, 3], dims=[128, 256, 512], mlp_ratios=[3, 3, 3], channels=64, n_conv_blocks=3),
    "l": dict(blocks=[4, 8, 3], dims=[192, 384, 768], mlp_ratios=[3, 3, 3], channels=96, n_conv_blocks=3),
}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution (padding k // 2), BatchNorm and ReLU: three entries of the authors' Sequentials."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]


class ConvTokenizer(nn.Module):
    """Image (B, C_in, H, W) -> channels-last tokens (B, ceil(H / 4), ceil(W / 4), channels): 3x3 convs (the first
    with stride 2) to channels / 2, channels / 2, channels, each with BatchNorm and ReLU, then a 3x3 stride-2 max
    pool (padding 1). `block.{0..9}` are the authors' keys."""

    def __init__(self, in_chans: int, embedding_dim: int):
        super().__init__()
        half = embedding_dim // 2
        self.block = nn.Sequential(
            *conv_bn_relu(in_chans, half, 3, stride=2),
            *conv_bn_relu(half, half, 3),
            *conv_bn_relu(half, embedding_dim, 3),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last memory by permute + contiguous: the same copy as .contiguous(memory_format=...), which
        # torch.func.vmap does not support
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return self.block(x).permute(0, 2, 3, 1)


class ConvStage(nn.Module):
    """The convolutional stage on channels-last tokens: `num_blocks` residual bottlenecks x + f(x), f = 1x1 (to
    `hidden_dim`) -> 3x3 -> 1x1 (back), each conv followed by BatchNorm and ReLU (the last ReLU inside f), then a 3x3
    stride-2 conv with bias to `embedding_dim_out` (`downsample`)."""

    def __init__(self, num_blocks: int, embedding_dim_in: int, hidden_dim: int, embedding_dim_out: int):
        super().__init__()
        self.conv_blocks = nn.ModuleList(
            nn.Sequential(
                *conv_bn_relu(embedding_dim_in, hidden_dim, 1),
                *conv_bn_relu(hidden_dim, hidden_dim, 3),
                *conv_bn_relu(hidden_dim, embedding_dim_in, 1),
            )
            for _ in range(num_blocks)
        )
        self.downsample = nn.Conv2d(embedding_dim_in, embedding_dim_out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # a view: the convolutions run on channels_last memory
        for block in self.conv_blocks:
            x = x + block(x)
        return self.downsample(x).permute(0, 2, 3, 1)


class ConvMLPBlock(nn.Module):
    """One ConvMLP block on (B, H, W, C) (the authors' class ConvMLPStage):
    x + MLP1(norm1(x)); then x = depthwise 3x3 conv(connect_norm(x)), which replaces x (no residual); then
    x + MLP2(norm2(x)). One stochastic-depth rate for both residual branches."""

    def __init__(self, embedding_dim: int, dim_feedforward: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.channel_mlp1 = Mlp(embedding_dim, dim_feedforward, gelu="erf")
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.connect = nn.Conv2d(embedding_dim, embedding_dim, 3, padding=1, groups=embedding_dim, bias=False)
        self.connect_norm = nn.LayerNorm(embedding_dim)
        self.channel_mlp2 = Mlp(embedding_dim, dim_feedforward, gelu="erf")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.channel_mlp1(self.norm1(x)))
        x = self.connect(self.connect_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.channel_mlp2(self.norm2(x)))


class ConvDownsample(nn.Module):
    """A 3x3 stride-2 conv with bias (padding 1) on channels-last tokens: (B, H, W, C) -> (B, ceil(H / 2),
    ceil(W / 2), C_out)."""

    def __init__(self, embedding_dim_in: int, embedding_dim_out: int):
        super().__init__()
        self.downsample = nn.Conv2d(embedding_dim_in, embedding_dim_out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class BasicStage(nn.Module):
    """An MLP stage: `blocks`, then `downsample_mlp` (a ConvDownsample to the next stage's width, or Identity in the
    last stage)."""

    def __init__(
        self, num_blocks: int, dim: int, next_dim: int | None, mlp_ratio: float, drop_path_rates: Sequence[float]
    ):
        super().__init__()
        self.blocks = nn.ModuleList(ConvMLPBlock(dim, int(dim * mlp_ratio), rate) for rate in drop_path_rates)
        self.downsample_mlp = ConvDownsample(dim, next_dim) if next_dim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample_mlp(x)


def _check_positive_ints(name: str, values: Sequence, minimum: int = 1) -> None:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list (one entry per MLP stage), got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise ValueError(f"{name} must hold ints >= {minimum}, got {values!r}")


class ConvMLP(ModelInterface, nn.Module):
    """ConvMLP with the authors' argument names; any input size (H, W >= 1).

    `blocks`, `dims`, `mlp_ratios`: per MLP stage; `channels`: the tokenizer's width; `n_conv_blocks`: bottlenecks
    in the convolutional stage (hidden width dims[0]). allmlp adds `img_size` (recorded for `pretrained_cfg` only,
    as the authors' model takes any size), `in_chans` (their tokenizer takes 3), `drop_rate` (dropout before the
    head; none in theirs), `drop_path_rate` (their hard-coded 0.1, linear within each stage) and `global_pool`.
    `forward_features` gives the (B, H, W, C) tokens after the final LayerNorm. `classifier_head=False`: the dense
    backbone, see the module docstring.
    """

    __constants__ = ["token_dims", "classifier_head"]

    def __init__(
        self,
        blocks: Sequence[int] = (2, 4, 2),
        dims: Sequence[int] = (128, 256, 512),
        mlp_ratios: Sequence[float] = (2, 2, 2),
        channels: int = 64,
        n_conv_blocks: int = 3,
        classifier_head: bool = True,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
    ):
        super().__init__()
        _check_positive_ints("blocks", blocks)
        _check_positive_ints("dims", dims)
        if not isinstance(mlp_ratios, (list, tuple)) or len(mlp_ratios) != len(blocks) or len(dims) != len(blocks):
            raise ValueError(
                f"blocks, dims and mlp_ratios must agree in size (one entry per MLP stage), got {list(blocks)!r}, "
                f"{list(dims)!r} and {mlp_ratios!r}"
            )
        for dim, ratio in zip(dims, mlp_ratios, strict=True):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or int(dim * ratio) < 1:
                raise ValueError(f"mlp_ratios must be positive numbers (hidden width >= 1), got {list(mlp_ratios)!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ValueError(f"channels (the tokenizer's width) must be an int >= 2, got {channels!r}")
        if isinstance(n_conv_blocks, bool) or not isinstance(n_conv_blocks, int) or n_conv_blocks < 0:
            raise ValueError(f"n_conv_blocks must be an int >= 0, got {n_conv_blocks!r}")
        if not isinstance(classifier_head, bool):
            raise ValueError(f"classifier_head must be True or False, got {classifier_head!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        size = to_pair(img_size, "img_size")
        num_classes = num_classes if classifier_head else 0
        self.config = dict(
            blocks=list(blocks),
            dims=list(dims),
            mlp_ratios=list(mlp_ratios),
            channels=channels,
            n_conv_blocks=n_conv_blocks,
            classifier_head=classifier_head,
            num_classes=num_classes,
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            in_chans=in_chans,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )
        self.classifier_head = classifier_head
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(drop_rate)
        self.accepts = ("ConvMLP", in_chans, (1, -1, 1, -1), f"(B, {in_chans}, H, W) with any H, W >= 1")
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "tokenizer.block.0", fixed_input_size=False, num_classes=num_classes, crop_pct=0.9
        )

        self.tokenizer = ConvTokenizer(in_chans, channels)
        self.conv_stages = ConvStage(n_conv_blocks, channels, dims[0], dims[0])
        stages = []
        for i, n in enumerate(blocks):
            next_dim = dims[i + 1] if i + 1 < len(blocks) else None
            rates = linear_drop_path_rates(drop_path_rate, n)
            stages.append(BasicStage(n, dims[i], next_dim, mlp_ratios[i], rates))
        self.stages = nn.ModuleList(stages)
        if classifier_head:
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.norm, self.head = nn.Identity(), nn.Identity()
        self.feature_info = self._dense_feature_info(channels, dims)
        self.init_weights()

    @staticmethod
    def _dense_feature_info(channels: int, dims: Sequence[int]) -> list[dict]:
        """The outputs whose stride no later module keeps: tokenizer (4), conv stage (8), then each MLP stage but
        one whose output has the same stride as the next's. With three stages that drops stages.1, whose output
        (after its downsampling, at stride 32) the last stage keeps: exactly the authors' dense backbone outputs."""
        candidates = [("tokenizer", channels, 4), ("conv_stages", dims[0], 8)]
        reduction = 8
        for i in range(len(dims)):
            if i + 1 < len(dims):
                reduction *= 2
                candidates.append((f"stages.{i}", dims[i + 1], reduction))
            else:
                candidates.append((f"stages.{i}", dims[i], reduction))
        kept = [
            c for c, after in zip(candidates, candidates[1:] + [None], strict=True) if after is None or after[2] != c[2]
        ]
        return [dict(module=name, num_chs=chs, reduction=red) for name, chs, red in kept]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' init: Linear N(0, 0.02) (their trunc_normal_'s +-2 bounds never cut at this std) with zero
        bias; Conv2d weights Kaiming-normal (fan_out, ReLU), conv biases left at PyTorch's default; norms 1 / 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- the head ------------------------------------------------------------------------------------------------

    def _require_head(self, what: str) -> None:
        if not self.classifier_head:
            raise ValueError(f"{what}: this ConvMLP was built with classifier_head=False (a backbone, no head)")

    def get_classifier(self) -> nn.Module:
        self._require_head("get_classifier")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if num_classes:
            self._require_head("reset_classifier")
        super().reset_classifier(num_classes, global_pool)

    # -- the pieces ModelInterface works from --------------------------------------------------------------------

    def _pipeline(self) -> list[tuple[str, nn.Module]]:
        """The modules in order, with their names (fewer after `prune_intermediate_layers`)."""
        parts: list[tuple[str, nn.Module]] = [("tokenizer", self.tokenizer)]
        if not isinstance(self.conv_stages, nn.Identity):  # pruned away after the tokenizer
            parts.append(("conv_stages", self.conv_stages))
        parts.extend((f"stages.{i}", stage) for i, stage in enumerate(self.stages))
        return parts

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x  # the tokenizer is the first feature output, so it runs as a stage

    def _feature_stages(self) -> list[list[nn.Module]]:
        outputs = {info["module"] for info in self.feature_info}
        stages, current = [], []
        for name, module in self._pipeline():
            current.append(module)
            if name in outputs:
                stages.append(current)
                current = []
        return stages

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """The final norm, which fits the last MLP stage only."""
        return self.norm if index == len(self.feature_info) - 1 else None

    def _truncate(self, last: int) -> None:
        module = self.feature_info[last]["module"]
        if last < len(self.feature_info) - 1:
            self.norm = nn.Identity()  # the final norm has the last stage's width, which is gone
        if module == "tokenizer":
            self.conv_stages = nn.Identity()  # the forward still runs, giving the tokenizer's tokens
        if module.startswith("stages."):
            self.stages = self.stages[: int(module.split(".")[1]) + 1]
        else:
            self.stages = nn.ModuleList()

    @torch.jit.unused
    def _run_checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Recompute each MLP block in the backward pass. The tokenizer and the conv stage run normally: their
        BatchNorms would update the running statistics a second time when recomputed."""
        if not isinstance(module, BasicStage):
            return module(x)
        for block in module.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return module.downsample_mlp(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(
                stem=r"^tokenizer", conv=r"^conv_stages", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))]
            )
        return dict(
            stem=r"^tokenizer",
            conv=[(r"^conv_stages\.conv_blocks\.(\d+)", None), (r"^conv_stages\.downsample", (99999,))],
            blocks=[
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.downsample_mlp", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    # -- forward -------------------------------------------------------------------------------------------------

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's (B, H, W, C) tokens after the final norm (Identity without the classifier head)."""
        self._check_input(x)
        x = self.tokenizer(x)
        x = self.conv_stages(x)
        for stage in self.stages:
            # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(stage, x)
            else:
                x = stage(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; with classifier_head=False the last stage's (B, H, W, C) tokens, as the authors' class gives."""
        if not self.classifier_head:
            return self._tokens(x)
        return self.forward_head(self._tokens(x))


_RELEASE_URL = "https://shi-labs.com/projects/convmlp/checkpoints/convmlp_{}_imagenet.pth"
_TOP1 = {"s": 76.8, "m": 79.0, "l": 80.2}  # the authors' README

ENTRIES = [
    ModelEntry(
        name=f"convmlp_{variant}",
        architecture=ConvMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.9,
            "the authors' evaluation (timm's train.py, their config crop_pct 0.9): bicubic, shorter side 248, crop 224",
        ),
        releases=(
            hosted(
                "imagenet1k",
                f"{_RELEASE_URL.format(variant)} (SHI-Labs/Convolutional-MLPs README)",
                1000,
                IN1K,
                _TOP1[variant],
                _RELEASE_URL.format(variant),
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
