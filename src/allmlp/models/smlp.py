"""sMLPNet (Tang et al., "Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?", AAAI 2022,
arXiv 2109.05422), exact to the authors' code: microsoft/SPACH `models/smlp.py` at commit dcede1e.

Every module carries the authors' name, so their released files (`smlp_{s,b}.pth`, `{"model": state_dict}`) load
with `load_state_dict` unchanged, the key typo `proh_w` included. A block is two residual steps:

- token mixing (`token_mix[k]`): BatchNorm, GELU, depthwise 3x3 conv without bias (`0.conv_merge`); then the sparse
  MLP (`1`): BatchNorm, GELU, a 1x1 conv along the width (`proj_h`, whose channels are the W positions), one along
  the height (`proh_w`, channels = the H positions), and `fuse`, a 1x1 conv without bias over the concatenation
  [activated input, width branch, height branch];
- channel mixing (`channel_mix[k]`): LayerNorm (eps 1e-5), Linear, GELU, Linear (`2.net.0`, `2.net.3`).

Stages are joined by 2x2 stride-2 convs without bias (`to_patch_embedding[i]`); the head is BatchNorm (`batch_norm`),
the mean over tokens and a Linear (`mlp_head.0`). GELU is exact (erf); initialisation is PyTorch's default, as in
the authors' code. Stochastic depth rises linearly over all blocks (`dp_rate` at the last).

Exactness: the same operations in the same order on the same values; only the layout differs. Tokens stay
channels-last (B, H, W, C) between layers, so the depthwise, fuse and downsampling convolutions read channels_last
views; the height projection reads the tokens themselves as an NCHW map (B, H, W, C) whose channels are the
rows, and the width projection a (B, W, H, C) permuted view (the authors permute and copy around both). Every
conv input is batch-first, so per-module per-sample gradients (Opacus's functorch sampler) are right. Each
residual step is one module, `x + drop_path(branch(x))`, whose children keep the authors' indices
(`token_mix[k][0]`, `[1]`; `channel_mix[k][1]`, `[2]`; their `Rearrange`s 0 and 3 hold nothing).

Input size: the token projections are sized for one grid (`image_size // patch_size`, halved at each stage), so a
model takes the inputs whose patch grid is that one: height and width in `image_size .. image_size + patch_size
- 1` (the authors' code takes the same; larger inputs only add pixels the stride-`patch_size` stem skips).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import linear_drop_path_rates, zero_head

PAPER = (
    "Tang et al., Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?, AAAI 2022 (arXiv 2109.05422)"
)

# The authors' smlpnet_tiny / small / base constructors (models/registry.py), input 224.
CONFIGS = {
    "t": dict(dim=80, alpha=3, patch_size=4, depths=[2, 8, 14, 2], dp_rate=0.0),
    "s": dict(dim=96, alpha=3, patch_size=4, depths=[2, 10, 24, 2], dp_rate=0.2),
    "b": dict(dim=112, alpha=3, patch_size=4, depths=[2, 10, 24, 2], dp_rate=0.3),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's DropPath): zero the branch per sample with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Residual(nn.Sequential):
    """`x + drop_path(branch(x))` on (B, H, W, C) tokens, the branch being this Sequential's children in order
    (named with the authors' indices, so their keys stay `token_mix.k.0...`, `channel_mix.k.1...`)."""

    def __init__(self, children: Sequence[tuple[str, nn.Module]], drop_path_rate: float):
        super().__init__(OrderedDict(children))
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"dp_rate must be in [0, 1), got a per-block rate of {drop_path_rate}")
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = x
        for module in self:
            branch = module(branch)
        return x + drop_path(branch, self.drop_path_rate, self.training)

    def extra_repr(self) -> str:
        return f"drop_path_rate={self.drop_path_rate}"


class BN_Activ_Conv(nn.Module):  # noqa: N801 - the authors' class, whose attribute names are checkpoint keys
    """BatchNorm, activation, convolution without bias ("same" padding), on NCHW maps: the authors' module."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.Activation = nn.GELU()
        self.Conv = nn.Conv2d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv(self.Activation(self.BN(x)))


class DWConvBlock(nn.Module):
    """The depthwise 3x3 step of token mixing, on (B, H, W, C) tokens (a channels_last view for the conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_merge = BN_Activ_Conv(channels, 3, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_merge(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SparseMLP(nn.Module):
    """The sparse MLP on (B, H, W, C) tokens: BatchNorm, GELU, then `proj_h` mixes along the width and `proh_w`
    (the authors' spelling, kept: it is their checkpoint key) along the height, each a 1x1 conv whose channels are
    the positions on its axis; `fuse` maps [activated input, width branch, height branch] back to C channels."""

    def __init__(self, side: int, channels: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.activation = nn.GELU()
        self.proj_h = nn.Conv2d(side, side, (1, 1))
        self.proh_w = nn.Conv2d(side, side, (1, 1))
        self.fuse = nn.Conv2d(channels * 3, channels, (1, 1), (1, 1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.activation(self.BN(x.permute(0, 3, 1, 2)))  # the NCHW (channels_last) view
        x = activated.permute(0, 2, 3, 1)
        # Batch-first maps whose channels are the positions on the mixed axis: (B, W, H, C), a permuted view (the
        # conv copies it, as the authors' permute does), and the tokens themselves, (B, H, W, C) seen as NCHW.
        along_width = self.proj_h(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        along_height = self.proh_w(x)
        # The concatenation runs on (B, 1, H, W, C) views: torch.compile lays a 4-D concatenation out channels_last
        # when one input is (the height projection's map, whose channels are the rows, is), which puts the rows
        # innermost and costs a second, scalar transpose of the whole result for `fuse` (at 56x56 the compiled
        # sparse MLP took 44 ms instead of 17). The activated tokens enter it through a view of their own: under
        # torch.compile, `x` itself becomes the rows-innermost copy that `proh_w` reads, and a concatenation of
        # `x` would transpose that copy back (twice the concatenation's time; 6% of the compiled model).
        kept = activated.unsqueeze(1).permute(0, 1, 3, 4, 2)
        fused = torch.cat([kept, along_width.unsqueeze(1), along_height.unsqueeze(1)], dim=4).squeeze(1)
        return self.fuse(fused.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FeedForward(nn.Module):
    """Linear, GELU, Dropout, Linear, Dropout over channels (`net.0`, `net.3`: the authors' keys)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden_dim, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokensConv(nn.Sequential):
    """The authors' `to_patch_embedding[i]` (a Sequential holding one strided Conv2d without bias), giving (B, H, W,
    C) tokens: from the NCHW image for the stem, from (B, H, W, C) tokens between stages."""

    def __init__(self, conv: nn.Conv2d, from_image: bool):
        super().__init__(conv)
        self.from_image = from_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.from_image:
            x = x.permute(0, 3, 1, 2)
        for module in self:
            x = module(x)
        # the stem's NCHW output is copied once into row-major tokens (a channels_last image would avoid the copy,
        # but torch.func.vmap cannot convert memory formats); the later convs read and write channels_last views
        return x.permute(0, 2, 3, 1).contiguous() if self.from_image else x.permute(0, 2, 3, 1)


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SMLPNet(ModelInterface, nn.Module):
    """sMLPNet with the authors' argument names (their class `sMLPNet`); `forward_features` gives the (B, H, W, C)
    tokens after the final BatchNorm. The feature maps (`forward_intermediates`, `features_only`) are the stages'
    outputs, at strides patch_size * 1, 2, 4, 8; the input size is fixed by `image_size` (see the module doc).
    `create_model` (and the trainer) take timm's names `img_size` and `drop_path_rate` for `image_size` and
    `dp_rate` (`timm_names`); the model has no dropout, so no `drop_rate`."""

    timm_names = {"img_size": "image_size", "drop_path_rate": "dp_rate"}

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 80,
        alpha: int = 3,
        num_classes: int = 1000,
        patch_size: int = 4,
        image_size: int = 224,
        depths: Sequence[int] = (2, 8, 14, 2),
        dp_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        for value, name in ((in_chans, "in_chans"), (dim, "dim"), (alpha, "alpha"), (patch_size, "patch_size")):
            _positive_int(value, name)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int (sMLPNet takes square inputs), got {image_size!r}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size (the authors' assertion), got image_size {image_size} "
                f"and patch_size {patch_size}"
            )
        if (
            isinstance(depths, (str, bytes))
            or not depths
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths)
        ):
            raise ValueError(f"depths must be a non-empty list of block counts >= 1, got {depths!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not isinstance(dp_rate, (int, float)) or not 0.0 <= dp_rate < 1.0:
            raise ValueError(f"dp_rate must be in [0, 1), got {dp_rate!r}")
        grid = image_size // patch_size
        stages = len(depths)
        if grid >> (stages - 1) < 1:
            raise ValueError(
                f"image_size {image_size} with patch_size {patch_size} gives a {grid}x{grid} patch grid, too small "
                f"for {stages} stages (each halves it; the last needs at least 1x1): use image_size >= "
                f"{patch_size << (stages - 1)}"
            )
        self.config = dict(
            in_chans=in_chans,
            dim=dim,
            alpha=alpha,
            num_classes=num_classes,
            patch_size=patch_size,
            image_size=image_size,
            depths=list(depths),
            dp_rate=float(dp_rate),
            global_pool=check_global_pool(global_pool),
        )
        self.num_classes = num_classes
        self.num_features = dim << (stages - 1)
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.head_drop = nn.Identity()  # the authors' head has no dropout
        self.depths = list(depths)
        self.block_stages = [stage for stage, depth in enumerate(depths) for _ in range(depth)]
        self.accepts = (
            "SMLPNet",
            in_chans,
            (image_size, image_size + patch_size - 1, image_size, image_size + patch_size - 1),
            f"(B, {in_chans}, {image_size}, {image_size}) (height and width in "
            f"{image_size}..{image_size + patch_size - 1}, which give the {grid}x{grid} patch grid the token "
            f"projections of image_size {image_size} are sized for)",
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, image_size, image_size), "to_patch_embedding.0.0", fixed_input_size=True, num_classes=num_classes
        )
        self.pretrained_cfg["classifier"] = "mlp_head.0"

        rates = linear_drop_path_rates(float(dp_rate), sum(depths))
        self.to_patch_embedding = nn.ModuleList()
        self.token_mix = nn.ModuleList()
        self.channel_mix = nn.ModuleList()
        self.feature_info = []
        block = 0
        for i, depth in enumerate(depths):
            width = dim << i
            if i == 0:
                stem = nn.Conv2d(in_chans, dim, patch_size, patch_size, bias=False)
                self.to_patch_embedding.append(TokensConv(stem, from_image=True))
            else:
                self.to_patch_embedding.append(TokensConv(nn.Conv2d(width // 2, width, 2, 2, bias=False), False))
            for _ in range(depth):
                token = [("0", DWConvBlock(width)), ("1", SparseMLP(grid >> i, width))]
                self.token_mix.append(Residual(token, rates[block]))
                channel = [("1", nn.LayerNorm(width)), ("2", FeedForward(width, width * alpha))]
                self.channel_mix.append(Residual(channel, rates[block]))
                block += 1
            self.feature_info.append(dict(module=f"channel_mix.{block - 1}", num_chs=width, reduction=patch_size << i))
        self.batch_norm = nn.BatchNorm2d(self.num_features)
        self.mlp_head = nn.Sequential(self._new_head(num_classes))

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- the model interface, for the authors' names (`mlp_head.0`, `batch_norm`) --------------------------------

    def get_classifier(self) -> nn.Module:
        return self.mlp_head[0]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            self.global_pool = self.config["global_pool"] = check_global_pool(global_pool)
        like = next(self.parameters())
        self.mlp_head[0] = zero_head(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        self.num_classes = self.config["num_classes"] = num_classes

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled (or, with global_pool '', per-token) logits from `forward_features`' tokens."""
        if self.global_pool == "avg":
            x = x.mean(dim=self.token_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.mlp_head(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final BatchNorm on (B, H, W, C) tokens (its channels_last NCHW view)."""
        return self.batch_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _prune_final_norm(self) -> None:
        self.batch_norm = nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Fine: one group per block (a stage's downsampling conv joins its first block); coarse: per stage."""
        firsts = [sum(self.depths[:i]) for i in range(len(self.depths))]
        if coarse:
            blocks = []
            for stage, first in enumerate(firsts):
                indices = "|".join(str(k) for k in range(first, first + self.depths[stage]))
                blocks.append((rf"^(?:token_mix|channel_mix)\.(?:{indices})\.", (stage,)))
                if stage:
                    blocks.append((rf"^to_patch_embedding\.{stage}\.", (stage,)))
        else:
            blocks = [(r"^(?:token_mix|channel_mix)\.(\d+)\.", None)]
            blocks += [(rf"^to_patch_embedding\.{stage}\.", (first,)) for stage, first in enumerate(firsts) if stage]
        return dict(stem=r"^to_patch_embedding\.0\.", blocks=blocks + [(r"^batch_norm", (99999,))])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.to_patch_embedding[0](x)

    def _feature_stages(self) -> list[list[nn.Module]]:
        stages, block = [], 0
        for i in range(len(self.feature_info)):
            modules = [] if i == 0 else [self.to_patch_embedding[i]]
            for _ in range(self.depths[i]):
                modules += [self.token_mix[block], self.channel_mix[block]]
                block += 1
            stages.append(modules)
        return stages

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int):
        """The final BatchNorm, which fits the last stage only."""
        return self._final_norm if index == len(self.feature_info) - 1 else None

    def _truncate(self, last: int) -> None:
        if last < len(self.feature_info) - 1:
            self._prune_final_norm()  # the final norm has the last stage's width, which is gone
        blocks = sum(self.depths[: last + 1])
        self.depths = self.depths[: last + 1]
        self.block_stages = self.block_stages[:blocks]
        self.feature_info = self.feature_info[: last + 1]
        self.to_patch_embedding = self.to_patch_embedding[: last + 1]
        self.token_mix = self.token_mix[:blocks]
        self.channel_mix = self.channel_mix[:blocks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final BatchNorm."""
        x = self._embed(x)
        # The authors' flat lists, run stage by stage; TorchScript indexes module lists by literals only, so
        # every stage walks the zipped lists and runs its own blocks.
        # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._final_norm(self._run_stages_checkpointed(x))
        for stage, down in enumerate(self.to_patch_embedding):
            if stage > 0:
                x = down(x)
            for block, (token, channel) in enumerate(zip(self.token_mix, self.channel_mix)):  # noqa: B905 (TorchScript)
                if self.block_stages[block] == stage:
                    x = channel(token(x))
        return self._final_norm(x)

    @torch.jit.unused
    def _run_checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) recomputed in the backward pass: a residual step or a downsampling conv, each as one (the
        interface's version would run a Sequential's children one by one, skipping the residual add)."""
        return checkpoint(module, x, use_reentrant=False)

    @torch.jit.unused
    def _run_stages_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self._feature_stages():
            for module in stage:
                x = self._run_checkpointed(module, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_TOP1 = {"s": 83.1, "b": 83.4}  # README; sMLPNet-T (81.9) was not released


def _releases(variant: str) -> tuple:
    if variant not in _TOP1:
        return ()
    url = f"https://github.com/microsoft/SPACH/releases/download/v1.0/smlp_{variant}.pth"
    return (hosted("imagenet1k", url, 1000, IN1K, _TOP1[variant], url),)


ENTRIES = [
    ModelEntry(
        name=f"smlpnet_{variant}",
        architecture=SMLPNet,
        config=dict(image_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.875, "the authors' evaluation (SPACH main.py, DeiT's): resize 256 bicubic, centre crop 224"
        ),
        releases=_releases(variant),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
