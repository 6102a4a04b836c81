"""Vision Permutator (Hou et al., TPAMI 2022, arXiv 2106.12368), exact to the authors' code (houqb/VisionPermutator).

Tokens stay channels-last (B, H, W, C) through a pyramid of stages held in one `nn.ModuleList` named `network`
(stages and downsampling layers interleaved, as in the authors' checkpoints). A block is pre-norm: a token mixer
(`attn`) and a channel MLP (`mlp`), each with a residual. ViP's token mixer, the Weighted Permute-MLP, encodes
height, width and channels with three linear maps and fuses them by split attention. CycleMLP (cyclemlp.py) grew
out of this code and reuses the block, the split attention, the downsampling and the model scaffolding below.

Numerics follow the authors: LayerNorm eps 1e-5, exact (erf) GELU, Linear weights trunc-normal(0.02) with zero
biases, convolutions at PyTorch's default initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, Mlp, linear_drop_path_rates, to_pair

LAYER_NORM_EPS = 1e-5

# The authors' vip_s7 / vip_m7 / vip_l7 constructors (patch 7: stage 1 on a 32x32 token grid at 224).
CONFIGS = {
    "s7": dict(
        layers=[4, 3, 8, 3],
        patch_size=7,
        embed_dims=[192, 384, 384, 384],
        transitions=[True, False, False, False],
        segment_dim=[32, 16, 16, 16],
        mlp_ratios=[3, 3, 3, 3],
    ),
    "m7": dict(
        layers=[4, 3, 14, 3],
        patch_size=7,
        embed_dims=[256, 256, 512, 512],
        transitions=[False, True, False, False],
        segment_dim=[32, 32, 16, 16],
        mlp_ratios=[3, 3, 3, 3],
    ),
    "l7": dict(
        layers=[8, 8, 16, 4],
        patch_size=7,
        embed_dims=[256, 512, 512, 512],
        transitions=[True, False, False, False],
        segment_dim=[32, 16, 16, 16],
        mlp_ratios=[3, 3, 3, 3],
    ),
}


def init_trunc_normal_(weight: torch.Tensor) -> torch.Tensor:
    """The authors' trunc_normal_(std=0.02), whose bounds (-2, 2) lie 100 std out and never cut: a plain normal
    draw is the same distribution, and ten times faster than inverting the CDF (building ViP-L/7 takes ~1 s)."""
    return nn.init.normal_(weight, std=0.02)


class Reweight(nn.Module):
    """The split-attention MLP: C -> C/4 -> GELU -> 3C, one weight per (channel, branch)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 4, dim * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def branch_means(h: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B, C): the mean over tokens of the sum of three branches (B, H, W, *channels), which split attention's
    `reweight` maps to the branch weights."""
    return (h.mean((1, 2)) + w.mean((1, 2)) + c.mean((1, 2))).flatten(1)


def split_attention(
    h: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor, channel_shape: list[int]
) -> torch.Tensor:
    """Fuse three branches (B, H, W, *channel_shape) by per-channel softmax weights (`reweight`'s output).

    The weights are indexed channel * 3 + branch (the authors reshape them to (B, C, 3)). Branches may be
    strided views (ViP's permuted outputs); the result has the memory layout of `c`, which is contiguous.
    """
    # branch-major and contiguous: broadcasting a strided weight view is several times slower on CPU
    # (the branch axis by its positive index: the TorchScript-based ONNX exporter mis-writes movedim(-1, 0))
    branch = len(channel_shape) + 3
    a = weights.reshape([weights.shape[0], 1, 1] + channel_shape + [3]).softmax(dim=-1).movedim(branch, 0).contiguous()
    return (c * a[2]).addcmul_(h, a[0]).addcmul_(w, a[1])


class WeightedPermuteMLP(nn.Module):
    """ViP's token mixer: linear maps along height (`mlp_h`), width (`mlp_w`) and channels (`mlp_c`).

    Channels are cut into `segment_dim` segments of S = C / segment_dim. The height map mixes, per width
    position and segment, the H x S values (feature index h * S + s), so it needs H * S == C, i.e. H ==
    segment_dim; width likewise.
    """

    def __init__(self, dim: int, segment_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_w = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Reweight(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        seg = self.segment_dim
        size = dim // seg
        x5 = x.reshape(batch, height, width, seg, size)
        # Permute so the mixed axis sits next to the segment's channels, map, and view the result back: the
        # branches stay strided views and are read once, by the fusion below, instead of being copied back.
        h = self.mlp_h(x5.permute(0, 3, 2, 1, 4).reshape(batch, seg, width, height * size))
        h = h.reshape(batch, seg, width, height, size).permute(0, 3, 2, 1, 4)
        w = self.mlp_w(x5.permute(0, 1, 3, 2, 4).reshape(batch, height, seg, width * size))
        w = w.reshape(batch, height, seg, width, size).permute(0, 1, 3, 2, 4)
        c = self.mlp_c(x).reshape(batch, height, width, seg, size)
        fused = split_attention(h, w, c, self.reweight(branch_means(h, w, c)), [seg, -1])
        return self.proj(fused.reshape(batch, height, width, dim))


class PermutatorBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); branches divided by `skip_lam` as the authors do."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float = 0.0, skip_lam: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu="erf")
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class Downsample(nn.Module):
    """A convolution between stages, applied to channels-last tokens (B, H, W, C) -> (B, H', W', C')."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """A strided convolution from the image to channels-last tokens (B, H', W', C)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def check_stage_lists(layers: Sequence[int], **lists: Sequence) -> None:
    """Every per-stage list has one entry per stage (transitions may omit the last, which is never used)."""
    if not layers or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise ValueError(f"layers must be a non-empty list of block counts >= 1, got {layers!r}")
    for name, values in lists.items():
        allowed = (len(layers), len(layers) - 1) if name == "transitions" else (len(layers),)
        if values is None or len(values) not in allowed:
            raise ValueError(f"{name} needs one entry per stage ({len(layers)} stages), got {values!r}")


def check_widths_change_at_transitions(family: str, embed_dims: Sequence[int], transitions: Sequence[bool]) -> None:
    """A stage's width may differ from the next one's only where a downsampling (a transition) joins them."""
    for i in range(len(embed_dims) - 1):
        if not transitions[i] and embed_dims[i] != embed_dims[i + 1]:
            raise ValueError(
                f"stage {i} changes the width ({embed_dims[i]} -> {embed_dims[i + 1]}) without a transition; "
                f"{family} only changes width in its 3x3 stride-2 downsampling (set transitions[{i}]=True)"
            )


class StagedMLP(ModelInterface, nn.Module):
    """What ViP and CycleMLP share: the `network` of stages, final norm, mean pooling, head, and the model API.

    Subclasses build `patch_embed`, `network` (stages are `nn.Sequential` of blocks, between them downsampling
    layers), `norm` and `head`. `forward_features` returns the (B, H, W, C) tokens after the final norm; the
    intermediate outputs (`forward_intermediates`, `features_only`) are the stages'.
    """

    def _init_model(self, num_classes: int, num_features: int, drop_rate: float, global_pool: str) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes = num_classes
        self.num_features = num_features
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(drop_rate)

    @staticmethod
    def _drop_path_rates(layers: Sequence[int], drop_path_rate: float) -> list[list[float]]:
        """Rates rising linearly over all blocks of all stages, split by stage."""
        rates = linear_drop_path_rates(drop_path_rate, sum(layers))
        starts = [sum(layers[:i]) for i in range(len(layers))]
        return [rates[start : start + n] for start, n in zip(starts, layers, strict=True)]

    def _stage_positions(self) -> list[int]:
        """The indices of the stages in `network` (the other entries are downsampling layers)."""
        return [i for i, layer in enumerate(self.network) if isinstance(layer, nn.Sequential)]

    def _feature_info(self, embed_dims: Sequence[int], first_reduction: int) -> list[dict]:
        """One entry per stage: its module, width and stride; each stride-2 downsampling doubles the reduction."""
        info, reduction = [], first_reduction
        for i, position in enumerate(self._stage_positions()):
            previous = self.network[position - 1] if i > 0 else None
            if isinstance(previous, Downsample) and previous.proj.stride[0] == 2:
                reduction *= 2
            info.append(dict(module=f"network.{position}", num_chs=embed_dims[i], reduction=reduction))
        return info

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0; convs default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(stem=r"^patch_embed", blocks=[(r"^network\.(\d+)", None), (r"^norm", (99999,))])
        blocks = [(r"^network\.(\d+)\.(\d+)", None), (r"^network\.(\d+)", (0,)), (r"^norm", (99999,))]
        return dict(stem=r"^patch_embed", blocks=blocks)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.patch_embed(x)

    def _feature_stages(self) -> list[list[nn.Module]]:
        positions = self._stage_positions()
        starts = [0] + [position + 1 for position in positions[:-1]]
        return [list(self.network[start : end + 1]) for start, end in zip(starts, positions, strict=True)]

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """The final norm, which fits the last stage only."""
        return self.norm if index == len(self._stage_positions()) - 1 else None

    def _truncate(self, last: int) -> None:
        positions = self._stage_positions()
        if last < len(positions) - 1:
            self.norm = nn.Identity()  # the final norm has the last stage's width, which is gone
        self.network = self.network[: positions[last] + 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final norm."""
        x = self._embed(x)
        for layer in self.network:
            # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(layer, x)
            else:
                x = layer(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class DenseStagedMLP(StagedMLP):
    """A staged model that can also be a dense-prediction backbone (CycleMLP's `fork_feat`, which Wave-MLP and
    Hire-MLP share): then a norm `norm{i}` follows each stage (i = its index in `network`, as in the authors'
    detection and segmentation code), there is no final norm and no head, and `forward` returns the normalised
    (B, C, H, W) map of each stage, `forward_intermediates(x, norm=True, intermediates_only=True)`."""

    __constants__ = ["token_dims", "fork_feat"]  # TorchScript compiles only the branch the model takes
    fork_feat = False

    def _require_head(self, what: str) -> None:
        if self.fork_feat:
            raise ValueError(
                f"{what}: this {type(self).__name__} was built with fork_feat=True (feature maps only, no head)"
            )

    def get_classifier(self) -> nn.Module:
        self._require_head("get_classifier")
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if num_classes:
            self._require_head("reset_classifier")
        super().reset_classifier(num_classes, global_pool)

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """With fork_feat, each stage's own norm; else the final norm, which fits the last stage only."""
        if self.fork_feat:
            return getattr(self, f"norm{self._stage_positions()[index]}")
        return super()._intermediate_norm(index)

    def _truncate(self, last: int) -> None:
        if self.fork_feat:
            for position in self._stage_positions()[last + 1 :]:
                delattr(self, f"norm{position}")
        super()._truncate(last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, H, W, C) tokens after the final norm; with fork_feat, the normalised (B, C, H, W) map of each stage."""
        if self.fork_feat:
            return self.forward_intermediates(x, norm=True, intermediates_only=True)
        return self._tokens(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.fork_feat:
            return self.forward_intermediates(x, norm=True, intermediates_only=True)
        return self.forward_head(self._tokens(x))


class VisionPermutator(StagedMLP):
    """Vision Permutator with the authors' argument names; `forward_features` gives (B, H, W, C) normed tokens.

    A Downsample (conv k=2, s=2) follows stage i when `transitions[i]`; a 1x1 conv when only the width changes;
    nothing otherwise, which shifts the `network` indices exactly as in the authors' checkpoints (ViP-M/7).
    The Weighted Permute-MLP needs a token grid of C / (C // segment_dim[i]) (= segment_dim[i] when it divides
    C) on each side in stage i, so a model takes one input size (up to the patch embedding's rounding);
    `img_size` is recorded in the config only, as in the authors' code.
    """

    def __init__(
        self,
        layers: Sequence[int] = (4, 3, 8, 3),
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (192, 384, 384, 384),
        transitions: Sequence[bool] = (True, False, False, False),
        segment_dim: Sequence[int] = (32, 16, 16, 16),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        skip_lam: float = 1.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_stage_lists(
            layers, embed_dims=embed_dims, transitions=transitions, segment_dim=segment_dim, mlp_ratios=mlp_ratios
        )
        img_size = to_pair(img_size, "img_size")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.config = dict(
            layers=list(layers),
            img_size=list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dims=list(embed_dims),
            transitions=[bool(t) for t in transitions],
            segment_dim=list(segment_dim),
            mlp_ratios=list(mlp_ratios),
            skip_lam=skip_lam,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )
        self._init_model(num_classes, embed_dims[-1], drop_rate, global_pool)
        self.in_chans, self.patch_size = in_chans, patch_size
        self.token_grids = self._token_grids(layers, embed_dims, transitions, segment_dim)
        sizes = self.accepted_input_sizes()
        grid = self.token_grids[0]
        any_of = f" (any height and width in {sizes.start}..{sizes.stop - 1})" if len(sizes) > 1 else ""
        self.accepts = (
            "VisionPermutator",
            in_chans,
            (sizes.start, sizes.stop - 1, sizes.start, sizes.stop - 1),
            f"(B, {in_chans}, {sizes.start}, {sizes.start}){any_of}, which gives the {grid}x{grid} token grid the "
            f"Weighted Permute-MLP of segment_dim {list(segment_dim)} and patch_size {patch_size} needs",
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, sizes.start, sizes.start), "patch_embed.proj", fixed_input_size=True, num_classes=num_classes
        )

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], kernel_size=patch_size, stride=patch_size)
        network: list[nn.Module] = []
        for i, rates in enumerate(self._drop_path_rates(layers, drop_path_rate)):
            dim = embed_dims[i]
            network.append(
                nn.Sequential(
                    *(
                        PermutatorBlock(
                            dim, WeightedPermuteMLP(dim, segment_dim[i], qkv_bias), mlp_ratios[i], r, skip_lam
                        )
                        for r in rates
                    )
                )
            )
            if i == len(layers) - 1:
                break
            if transitions[i] or embed_dims[i] != embed_dims[i + 1]:
                stride = 2 if transitions[i] else 1
                network.append(Downsample(dim, embed_dims[i + 1], kernel_size=stride, stride=stride))
        self.network = nn.ModuleList(network)
        self.feature_info = self._feature_info(embed_dims, patch_size)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=LAYER_NORM_EPS)
        self.head = self._new_head(num_classes)
        self.init_weights()

    @staticmethod
    def _token_grids(layers, embed_dims, transitions, segment_dim) -> list[int]:
        """The side of the token grid each stage's Weighted Permute-MLP needs; checks that one input fits them all."""
        for i, (dim, seg) in enumerate(zip(embed_dims, segment_dim, strict=True)):
            if not (isinstance(seg, int) and seg >= 1 and dim % seg == 0):
                raise ValueError(
                    f"stage {i}: segment_dim must be a positive int that divides embed_dim {dim}, got {seg!r}"
                )
        grids = list(segment_dim)
        for i in range(1, len(layers)):
            reached = grids[i - 1] // 2 if transitions[i - 1] else grids[i - 1]
            if reached != grids[i]:
                raise ValueError(
                    f"no input size fits this model: stage {i - 1} works on a {grids[i - 1]}x{grids[i - 1]} token "
                    f"grid, which gives {reached}x{reached} in stage {i}, but stage {i} (embed_dim {embed_dims[i]}, "
                    f"segment_dim {segment_dim[i]}) needs {grids[i]}x{grids[i]}"
                )
        return grids

    def accepted_input_sizes(self) -> range:
        """The input heights (and widths) the model takes: those whose patch grid is the first stage's."""
        side = self.token_grids[0] * self.patch_size
        return range(side, side + self.patch_size)
