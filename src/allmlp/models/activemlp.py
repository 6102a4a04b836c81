"""ActiveMLP (Wei et al., arXiv 2203.06108), exact to the authors' code (microsoft/ActiveMLP, models/activemlp.py
at fb44035).

The Active Token Mixer (ATM) reads every channel of a token at a learned, fractional offset along the width
(`atm_w`) and along the height (`atm_h`), maps the values read with a linear layer over channels, adds a plain
channel map (`atm_c`) and fuses the three branches with per-channel softmax weights (`fusion`, the branch weights
interleaved as (C, 3)). The offsets come from the block input (before `norm1`) through `offset_layer` (LayerNorm,
Linear to 2C / share_dim, each value shared by share_dim consecutive channels; the first C are the width
offsets, the last C the height offsets). A block that makes offsets runs every `intv` blocks of a stage (never
as the stage's last block); the blocks after it reuse them, and the position conv `pos_blocks[i]` (depthwise 3x3
plus identity, one per stage) runs before each offset-making block only. Downsampling (conv 3x3, stride 2) is
stored in the last block of a stage (`blocks.i.j.downsample`); there is no norm in the stem.

The authors sample with torchvision's deform_conv2d (a 1x1 kernel, offsets zero in the other direction). Here
the sampling is linear interpolation between the two nearest pixels along the one axis, zero outside the
image (`sample_along`): positions and weights are computed once per group of channels that shares an offset,
the two taps are gathers along the axis from the channels-last tokens, and the result is bit-identical to
deform_conv2d's sampled values on x86 CPUs (same positions, same weights, same products). It is faster than
deform_conv2d, compiles to one fused pass, runs in bfloat16 (positions in float32: bfloat16 cannot tell 55 from
55.2) and exports to ONNX (GatherElements / Floor / Clip, no custom op). Everything else follows the authors:
LayerNorm eps 1e-5, exact (erf) GELU, their initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .entries import IN1K, ModelEntry, WeightRelease, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, Mlp, linear_drop_path_rates, to_pair
from .vip import Downsample, PatchEmbed, Reweight, branch_means, init_trunc_normal_, split_attention

LAYER_NORM_EPS = 1e-5

# The authors' ActivexTiny, ActiveTiny, ActiveSmall, ActiveBase and ActiveLarge constructors.
CONFIGS = {
    "xt": dict(depths=[2, 2, 4, 2], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], share_dims=[2, 4, 4, 8],
               intv=2),
    "t": dict(depths=[2, 3, 10, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[4, 4, 4, 4], share_dims=[2, 4, 4, 8],
              intv=2),
    "s": dict(depths=[3, 4, 18, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], share_dims=[2, 4, 4, 8],
              intv=6),
    "b": dict(depths=[3, 8, 27, 3], embed_dims=[64, 128, 320, 512], mlp_ratios=[8, 8, 4, 4], share_dims=[2, 4, 4, 8],
              intv=6),
    "l": dict(depths=[3, 4, 24, 3], embed_dims=[96, 192, 384, 768], mlp_ratios=[4, 4, 4, 4], share_dims=[2, 4, 4, 8],
              intv=6),
}  # fmt: skip


def sample_along(x: torch.Tensor, offset: torch.Tensor, dim: int) -> torch.Tensor:
    """Channels-last x (B, H, W, C) read at fractional positions along `dim` (1: height, 2: width): channel c of
    token (h, w) takes the value at its own position plus `offset[b, h, w, c // (C // G)]` (offset (B, H, W, G),
    G dividing C: each offset serves C // G consecutive channels), linearly interpolated between the two nearest
    pixels, zero beyond the border. This is what deform_conv2d samples for a 1x1 kernel whose offset is zero
    along the other axis, and bit-identical to it: position = index + offset in float32, weights 1 - f and f of
    its fractional part f, products summed in the same order.

    Positions, floors and fractions are computed once per offset group; the taps are two `gather`s along `dim`
    with one index per channel, so that `torch.compile` fuses the whole sampling into one vectorised pass over the
    channels (an index per group, read as rows of C // G channels, is about 6% faster in eager inference but
    compiles to scalar loops over those few channels, several times slower). Positions are clamped to [-1, size]
    (where deform_conv2d's result is zero, a clamped one is zero too) and the tokens zero-padded by one pixel before
    and two after along `dim`, so that both taps are valid indices.
    """
    size = x.shape[dim]
    compute = torch.promote_types(offset.dtype, torch.float32)
    steps = torch.arange(size, device=x.device, dtype=compute)
    steps = steps.view(size, 1, 1) if dim == 1 else steps.view(size, 1)  # against (B, H, W, G)
    position = (offset.to(compute) + steps).clamp(-1, size)
    low = position.floor()
    fraction = position - low
    # the lower tap of position p is padded index floor(p) + 1, the upper tap the next one. The tap is clamped again
    # as an integer: a NaN position gives NaN weights, and must not become an invalid index.
    tap = per_channel((low + 1).long().clamp(0, size + 1), x.shape[3])
    padded = F.pad(x, [0, 0, 1, 2] if dim == 2 else [0, 0, 0, 0, 1, 2])
    upper = padded.narrow(dim, 1, size + 2)
    sampled = padded.gather(dim, tap) * per_channel((1 - fraction).to(x.dtype), x.shape[3])
    return sampled.addcmul_(upper.gather(dim, tap), per_channel(fraction.to(x.dtype), x.shape[3]))


def per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, H, W, G) values of the offset groups spelled out for each of their channels, (B, H, W, C): gather
    indices, and tap weights (products with a broadcast over a short last axis are several times slower, bfloat16
    most, than with a contiguous operand)."""
    batch, height, width, groups = values.shape
    spread = values.unsqueeze(-1).expand(batch, height, width, groups, channels // groups)
    return spread.reshape(batch, height, width, channels)


class ATMOp(nn.Module):
    """The linear map of one ATM branch on channels-last tokens (B, H, W, C_in) -> (B, H, W, C_out), with the
    module's own `weight` (C_out, C_in, 1, 1) and `bias`, the authors' parameters. Their ATMOp is a 1x1
    deform_conv2d: the tokens read at the learned offsets (`sample_along`, which `ATMLayer` applies first, so that
    this module's input is what its weight multiplies), then this map."""

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True):
        super().__init__()
        self.in_chans, self.out_chans = in_chans, out_chans
        self.weight = nn.Parameter(torch.empty(out_chans, in_chans, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_chans)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation of ATM weights in their models: trunc-normal(0.02), bias zero."""
        init_trunc_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        return f"in_chans={self.in_chans}, out_chans={self.out_chans}, bias={self.bias is not None}"


class ATMLayer(nn.Module):
    """The Active Token Mixer: width (`atm_w`) and height (`atm_h`) branches at learned offsets, a channel map
    (`atm_c`), fused by per-channel softmax weights over the three (`fusion`) and projected (`proj`).

    `share_dim` says how many channels share one offset value (the block's `offset_layer` gives 2C / share_dim)."""

    def __init__(self, dim: int, share_dim: int = 1):
        super().__init__()
        self.dim, self.share_dim = dim, share_dim
        self.atm_c = nn.Linear(dim, dim, bias=False)
        self.atm_h = ATMOp(dim, dim)
        self.atm_w = ATMOp(dim, dim)
        self.fusion = Reweight(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C); offset (B, H, W, 2C / share_dim) as `offset_layer` gives it: value k serves channels
        k * share_dim ... (k + 1) * share_dim - 1 of the 2C [width | height] offsets."""
        half = self.dim // self.share_dim
        if self.dim % self.share_dim != 0:
            # share_dim divides 2C but not C: a shared value straddles the width and height halves; spell out all 2C
            offset = offset.unsqueeze(-1).expand(-1, -1, -1, -1, self.share_dim).flatten(-2)  # repeat_interleave
            half = self.dim
        w = self.atm_w(sample_along(x, offset[..., :half], dim=2))
        h = self.atm_h(sample_along(x, offset[..., half:], dim=1))
        c = self.atm_c(x)
        # the fusion weights are read (C, 3): branch 0 weighs the width branch, 1 the height branch, 2 the channels
        return self.proj(split_attention(w, h, c, self.fusion(branch_means(w, h, c)), [-1]))


class ActiveBlock(nn.Module):
    """Pre-norm block: x + atm(norm1(x), offset), then x + mlp(norm2(x)).

    A block that makes offsets (`new_offset`) computes them from its input with its `offset_layer` (LayerNorm,
    Linear to 2C / share_dim) and returns `(x, offset)` for the blocks after it, as the authors' does; the others
    take the offsets and return x. The last block of a stage but the last stage holds the stage's `downsample`,
    which the model applies after the block, so that the block's output is the stage's feature map (where the
    authors' segmentation backbone takes it).
    """

    __constants__ = ["new_offset"]  # TorchScript compiles only the branch a block takes

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        share_dim: int,
        downsample: nn.Module | None,
        new_offset: bool,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.atm = ATMLayer(dim, share_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu="erf")
        self.drop_path = DropPath(drop_path)
        self.downsample = downsample
        self.new_offset = new_offset
        self.offset_layer = (
            nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, dim * 2 // share_dim))
            if new_offset
            else None
        )

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None):
        if self.new_offset:
            offset = self.offset_layer(x)
            return self._mix(x, offset), offset
        assert offset is not None, "a block that makes no offsets needs those of the block before"
        return self._mix(x, offset)

    def _mix(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.atm(self.norm1(x), offset))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PEG(nn.Module):
    """The position conv before an offset-making block: depthwise 3x3 (padding 1) plus the identity, on
    channels-last tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x.permute(0, 3, 1, 2)
        return (self.proj(maps) + maps).permute(0, 2, 3, 1)


def _check_config(depths, embed_dims, mlp_ratios, share_dims, intv, drop_path_rate, num_classes) -> None:
    if not isinstance(depths, Sequence) or not depths or not all(isinstance(d, int) and d >= 2 for d in depths):
        raise ValueError(
            "depths must be a non-empty list of block counts >= 2 (a stage's first block makes the offsets the "
            f"others use; the authors' code fails on a one-block stage), got {depths!r}"
        )
    for name, values in (("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios), ("share_dims", share_dims)):
        if not isinstance(values, Sequence) or len(values) != len(depths):
            raise ValueError(f"{name} needs one entry per stage ({len(depths)} stages), got {values!r}")
    if not all(isinstance(d, int) and d >= 1 for d in embed_dims):
        raise ValueError(f"embed_dims must be positive ints, got {embed_dims!r}")
    if not all(
        isinstance(r, (int, float)) and r > 0 and int(d * r) >= 1 for d, r in zip(embed_dims, mlp_ratios, strict=True)
    ):
        raise ValueError(f"mlp_ratios must be positive numbers (hidden width >= 1), got {mlp_ratios!r}")
    for i, (dim, share) in enumerate(zip(embed_dims, share_dims, strict=True)):
        if not (isinstance(share, int) and share >= 1 and (2 * dim) % share == 0):
            raise ValueError(
                f"share_dims[{i}] must be a positive int that divides 2 * embed_dims[{i}] = {2 * dim} (each offset "
                f"serves share_dim channels of the 2C width and height offsets), got {share!r}"
            )
    if not isinstance(intv, int) or isinstance(intv, bool) or intv < 1:
        raise ValueError(f"intv (blocks between new offsets) must be a positive int, got {intv!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")


class ActiveMLP(ModelInterface, nn.Module):
    """ActiveMLP with the authors' argument names and module names; any input size of at least 3x3 works.

    Patch embedding conv 7x7 stride 4 (padding 2), then stages of `ActiveBlock`s in `blocks[i]` with the position
    conv `pos_blocks[i]`; a conv 3x3 stride 2 (held by the stage's last block) between stages. `forward_features`
    gives the (B, H, W, C) tokens after the final norm; the intermediate outputs (`forward_intermediates`,
    `features_only`) are the stages' outputs before their downsampling, at strides 4, 8, 16 and 32.
    `img_size` and `patch_size` are recorded only (the authors' code ignores them too); the authors' `act_layer` and
    `norm_layer` are fixed to what every variant uses (exact GELU, LayerNorm).
    """

    checkpoint_entries = ("model_ema", "model")  # the authors' published top-1 is their EMA weights'

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 4, 2),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        share_dims: Sequence[int] = (1, 1, 1, 1),
        drop_path_rate: float = 0.0,
        intv: int = 2,
        global_pool: str = "avg",
    ):
        super().__init__()
        _check_config(depths, embed_dims, mlp_ratios, share_dims, intv, drop_path_rate, num_classes)
        size = to_pair(img_size, "img_size")
        self.config = dict(
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            depths=list(depths),
            embed_dims=list(embed_dims),
            mlp_ratios=list(mlp_ratios),
            share_dims=list(share_dims),
            drop_path_rate=drop_path_rate,
            intv=intv,
            global_pool=global_pool,
        )
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.head_drop = nn.Identity()  # the authors have no dropout before the head
        self.accepts = ("ActiveMLP", in_chans, (3, -1, 3, -1), f"(B, {in_chans}, H, W) with any H, W >= 3")
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=False, num_classes=num_classes
        )

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=2)
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        blocks = []
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            stage = []
            for j in range(depth):
                last = j == depth - 1
                downsample = (
                    Downsample(embed_dims[i], embed_dims[i + 1], kernel_size=3, stride=2, padding=1)
                    if last and i < len(depths) - 1
                    else None
                )
                stage.append(
                    ActiveBlock(
                        embed_dims[i],
                        mlp_ratios[i],
                        rates[start + j],
                        share_dims[i],
                        downsample,
                        new_offset=j % intv == 0 and not last,
                    )
                )
            blocks.append(nn.ModuleList(stage))
        self.blocks = nn.ModuleList(blocks)
        self.pos_blocks = nn.ModuleList([PEG(dim) for dim in embed_dims])
        self.norm = nn.LayerNorm(embed_dims[-1], eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"blocks.{i}.{depth - 1}", num_chs=embed_dims[i], reduction=4 * 2**i)
            for i, depth in enumerate(depths)
        ]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear and ATM weights trunc-normal(0.02) with zero bias, LayerNorm 1/0,
        convolutions normal(0, sqrt(2 / fan_out)) with zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ATMOp):
                module.reset_parameters()
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                module.weight.normal_(0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    module.bias.zero_()

    def no_weight_decay(self) -> set[str]:
        """The position convs, as the authors keep them out of weight decay."""
        return {f"pos_blocks.{name}" for name, _ in self.pos_blocks.named_parameters()}

    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(
                stem=r"^patch_embed",
                blocks=[(r"^(?:pos_)?blocks\.(\d+)", None), (r"^norm", (99999,))],
            )
        blocks = [(r"^blocks\.(\d+)\.(\d+)", None), (r"^pos_blocks\.(\d+)", (0,)), (r"^norm", (99999,))]
        return dict(stem=r"^patch_embed", blocks=blocks)

    # -- the stages ---------------------------------------------------------------------------------------------

    @torch.jit.unused
    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage `index` on tokens (B, H, W, C), up to its output before downsampling, as `_tokens` runs it (for
        forward_intermediates and features_only, which checkpoint it as a whole when enabled)."""
        offset = x  # replaced by the first block's offsets before any block reads it
        for block in self.blocks[index]:
            if block.new_offset:
                x, offset = block(self.pos_blocks[index](x))
            else:
                x = block(x, offset)
        return x

    def _stage_runner(self, index: int):
        def run(x: torch.Tensor) -> torch.Tensor:
            return self._run_stage(index, x)

        return run

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.patch_embed(x)

    def _feature_stages(self) -> list[list]:
        """Stage i: the previous stage's downsampling (held by its last block), then the stage's blocks."""
        stages = []
        for i in range(len(self.blocks)):
            previous = [self.blocks[i - 1][-1].downsample] if i > 0 else []
            stages.append(previous + [self._stage_runner(i)])
        return stages

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """The final norm, which fits the last stage only."""
        return self.norm if index == len(self.blocks) - 1 else None

    def _truncate(self, last: int) -> None:
        if last < len(self.blocks) - 1:
            self.norm = nn.Identity()  # the final norm has the last stage's width, which is gone
        self.blocks = self.blocks[: last + 1]
        self.pos_blocks = self.pos_blocks[: last + 1]
        self.blocks[last][-1].downsample = None  # the last output is taken before it

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final norm."""
        x = self._embed(x)
        # `_checkpointing()` spelled out: TorchScript drops the branches only where it sees is_scripting() itself
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for stage, pos_block in zip(self.blocks, self.pos_blocks, strict=True):
            offset = x  # replaced by the stage's first block's offsets before any block reads it
            for block in stage:
                # the position conv runs before each block that makes offsets, the others reuse the offsets
                if block.new_offset:
                    x = pos_block(x)
                    if checkpointing and not torch.jit.is_scripting():
                        x, offset = checkpoint(block, x, use_reentrant=False)
                    else:
                        x, offset = block(x)
                elif checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(block, x, offset, use_reentrant=False)
                else:
                    x = block(x, offset)
                if block.downsample is not None:
                    x = block.downsample(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self._tokens(x))


ACTIVEMLP_PAPER = "Wei et al., ActiveMLP: An MLP-like Architecture with Active Token Mixer, arXiv 2203.06108 (2022)"
# The authors' README: ImageNet-1k top-1 of the EMA weights; Google Drive files for xT, T and L only.
_TOP1 = {"xt": 79.7, "t": 82.0, "s": 83.1, "b": 83.5, "l": 83.8}
_DRIVE = {
    "xt": ("1JjWFDJM097a2sX9zw2oOisCT-7T43-DV", "activemlp_xtiny.pth"),
    "t": ("1eFv5SsGr6ZpupY0wB-N2mjVhQLSo92o-", "activemlp_tiny.pth"),
    "l": ("1aIEnq_5-oS8jiLr2W8ryLabmzHTmR3J0", "activemlp_large.pth"),
}


def _releases(variant: str) -> tuple[WeightRelease, ...]:
    if variant not in _DRIVE:
        return ()
    file_id, file_name = _DRIVE[variant]
    page = f"https://drive.google.com/file/d/{file_id}/view"
    return (
        WeightRelease(
            "imagenet1k",
            f"{page} (microsoft/ActiveMLP README; a training checkpoint, its model_ema is the published one)",
            1000,
            IN1K,
            _TOP1[variant],
            # Google Drive answers a program with a confirmation page: a person downloads the file.
            file_name=f"microsoft/ActiveMLP/{file_name}",
            page=page,
        ),
    )


ENTRIES = [
    ModelEntry(
        name=f"activemlp_{variant}",
        architecture=ActiveMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.875, "the authors' evaluation (their main.py): shorter side to 256 (bicubic), centre crop 224"
        ),
        releases=_releases(variant),
        paper=ACTIVEMLP_PAPER,
    )
    for variant, config in CONFIGS.items()
]
