"""MS-MLP (Zheng, He, Chen and Zhou, "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs",
arXiv 2202.06510), exact to the authors' code (JegZheng/MS-MLP `models/ms_mlp.py` at a10d34d).

A Swin-style pyramid: a patch embedding (conv k = s = patch_size, LayerNorm), four stages of mix-shift blocks, a
2x2 stride-2 conv + LayerNorm between stages. A block splits the channels into `shift_size` groups (torch.chunk:
ceil(C / shift_size) channels each, the rest in the last); group i is rolled by `shift_dist[i]` along the width
and, separately, along the height, each roll followed by its own depthwise conv of size `mix_size[stage][i]`
(`dwconv_lr[i]`, `dwconv_td[i]`, zero padding k // 2); the two are summed, then a channel MLP (LayerNorm,
`pwconv1`, GELU, `pwconv2`) scaled by `gamma` is the residual branch. The model pools, then normalises (`norm`),
then classifies (`head`).

The authors' code, not the paper, decides what is computed (the paper mixes first and shifts after):
- the shift wraps around (`torch.roll`) and comes before the depthwise mixing convs, whose zero padding
  surrounds the rolled map;
- there is no norm before the token mixing; the block's only norm sits before `pwconv1`;
- LayerNorm eps 1e-6 everywhere; layer scale `gamma` starts at 1e-6; exact (erf) GELU;
- the stage transitions are the authors' `PatchEmbed` with patch 2 (conv, then LayerNorm, always with a norm
  even with `patch_norm=False`, which only drops the stem's); their `PatchMerging` class is unused;
- the final norm follows the average pooling (`forward_head`: pool, norm, head), so `forward_features` gives
  the last stage's tokens as they leave it;
- `drop_rate` is dropout after the patch embedding (their `pos_drop`); nothing drops before the head.

Here tokens stay channels-last (B, H, W, C) through the stages: the Linear layers need no permutes, and each
group's rolled slice enters its depthwise conv as a channels-last NCHW view. The roll is torch.roll (on CPU a
slice-and-cat copy, no index table) by the shift reduced modulo the map size, which keeps the TorchScript-based
ONNX exporter exact (its Roll assumes |shift| < size; at 224 the released models never roll further, small inputs
do). Module and parameter names are the authors', so their checkpoints load unchanged. The
authors' `PatchEmbed` asserts the `img_size` it was built for; nothing else in the model depends on the input
size, so allmlp takes any size from patch_size * 2 ** (stages - 1) up and computes what the authors' model
built for that `img_size` computes (tested on odd sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, linear_drop_path_rates, to_pair
from .vip import init_trunc_normal_

LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-6
PAPER = "Zheng et al., Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs (arXiv 2202.06510)"

# The authors' released configurations (configs/msmlp_{tiny,small,base}_patch4_shift5_224.yaml), whose mix sizes
# differ from the class default.
_RELEASED_MIX_SIZE = [[1, 1, 3, 5, 7], [1, 3, 3, 5, 7], [1, 5, 5, 5, 7], [1, 7, 7, 7, 7]]
CONFIGS = {
    "t": dict(embed_dim=96, depths=[3, 3, 9, 3], drop_path_rate=0.1),
    "s": dict(embed_dim=96, depths=[3, 3, 27, 3], drop_path_rate=0.4),
    "b": dict(embed_dim=128, depths=[3, 3, 27, 3], drop_path_rate=0.5),
}
for _config in CONFIGS.values():
    _config.update(patch_size=4, shift_size=5, shift_dist=[-2, -1, 0, 1, 2], mix_size=_RELEASED_MIX_SIZE)


def chunk_sizes(channels: int, groups: int) -> list[int]:
    """The channel counts of torch.chunk(x, groups) over `channels` channels: ceil(channels / groups) each, the rest
    in the last; fewer than `groups` chunks where the rest runs out (10 channels in 4 groups: 3, 3, 3, 1; 6
    channels in 5 groups: 2, 2, 2)."""
    step = -(-channels // groups)
    return [min(step, channels - start) for start in range(0, channels, step)]


class PatchEmbed(nn.Module):
    """A conv with kernel = stride = patch_size, then a LayerNorm over channels: the image (B, C, H, W) or
    channels-last tokens (B, H, W, C) -> tokens (B, H / p, W / p, embed_dim). The authors' stem and (with patch 2)
    their stage transition."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int], norm: bool, tokens_in: bool):
        super().__init__()
        self.tokens_in = tokens_in
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens_in:
            # contiguous NCHW, not a channels-last view: Opacus reads a (non-grouped) conv's input as contiguous
            # NCHW memory for per-sample gradients and is silently wrong otherwise; one copy per stage transition
            x = x.permute(0, 3, 1, 2).contiguous()
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class MixShiftBlock(nn.Module):
    """The mix-shift block on channels-last tokens: x + gamma * MLP(norm(sum over directions of the rolled and
    depthwise-mixed channel groups))."""

    __constants__ = ["chunks", "shift_dist"]  # tuples TorchScript unrolls the group loop over

    def __init__(
        self, dim: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float, drop_path: float = 0.0
    ):
        super().__init__()
        self.dim = dim
        self.chunks = tuple(chunk_sizes(dim, len(shift_dist)))
        self.shift_dist = tuple(int(shift) for shift in shift_dist)
        self.dwconv_lr = nn.ModuleList(
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.chunks, mix_size, strict=True)
        )
        self.dwconv_td = nn.ModuleList(
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.chunks, mix_size, strict=True)
        )
        hidden = int(mlp_ratio * dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = []
        start = 0
        # equal lengths by construction; TorchScript's zip takes no strict=
        for mix_lr, mix_td, size, shift in zip(self.dwconv_lr, self.dwconv_td, self.chunks, self.shift_dist):  # noqa: B905
            group = x.narrow(3, start, size).permute(0, 3, 1, 2)  # (B, c, H, W), channels-last in memory
            start += size
            if shift == 0:
                along_width, along_height = group, group
            else:
                along_width, along_height = (
                    torch.roll(group, shift % group.shape[3], 3),
                    torch.roll(group, shift % group.shape[2], 2),
                )
            mixed.append((mix_lr(along_width) + mix_td(along_height)).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(self.norm(torch.cat(mixed, dim=3)))))
        return x + self.drop_path(y * self.gamma)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, chunks={list(self.chunks)}, shift_dist={list(self.shift_dist)}"


class BasicLayer(nn.Module):
    """One stage in the authors' layout: `blocks`, then the transition to the next stage (`downsample`; Identity
    after the last stage, where the authors have None)."""

    def __init__(self, blocks: nn.Sequential, downsample: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


def _check_config(embed_dim, depths, shift_size, shift_dist, mix_size, mlp_ratio, drop_rate, drop_path_rate) -> None:
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
    if not depths or not all(isinstance(d, int) and d >= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of block counts >= 1, got {depths!r}")
    if not isinstance(shift_size, int) or shift_size < 1:
        raise ValueError(f"shift_size (the number of channel groups) must be a positive int, got {shift_size!r}")
    if len(shift_dist) != shift_size or not all(isinstance(s, int) for s in shift_dist):
        raise ValueError(f"shift_dist needs one int shift per group (shift_size={shift_size}), got {shift_dist!r}")
    if len(mix_size) != len(depths):
        raise ValueError(f"mix_size needs one list per stage ({len(depths)} stages), got {mix_size!r}")
    for i, sizes in enumerate(mix_size):
        if len(sizes) != shift_size or not all(isinstance(k, int) and k >= 1 and k % 2 == 1 for k in sizes):
            raise ValueError(
                f"mix_size[{i}] needs one odd kernel size per group (shift_size={shift_size}; an even size changes "
                f"the map size and breaks the residual), got {sizes!r}"
            )
    for i in range(len(depths)):
        dim = embed_dim * 2**i
        chunks = chunk_sizes(dim, shift_size)
        if len(chunks) != shift_size:
            raise ValueError(
                f"stage {i}: torch.chunk splits its {dim} channels into {len(chunks)} groups {chunks}, but the block "
                f"needs exactly shift_size={shift_size} (embed_dim={embed_dim}); choose embed_dim so that every stage "
                f"width (embed_dim * 2 ** stage) gives {shift_size} chunks, e.g. a multiple of {shift_size}"
            )
    if not mlp_ratio > 0 or int(mlp_ratio * embed_dim) < 1:
        raise ValueError(f"mlp_ratio must be positive (hidden width int(mlp_ratio * dim) >= 1), got {mlp_ratio!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")


class MSMLP(ModelInterface, nn.Module):
    """MS-MLP with the authors' argument names (their class MS_MLP); `forward_features` gives the last stage's
    (B, H, W, C) tokens, `forward_head` pools, applies the final norm, then the head.

    Takes any input of at least patch_size * 2 ** (len(depths) - 1) pixels a side (32 for the released models;
    every conv floors odd sizes); `img_size` is the default input size of `pretrained_cfg`, the size the authors'
    code asserts.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        shift_size: int = 5,
        shift_dist: Sequence[int] = (-2, -1, 0, 1, 2),
        mix_size: Sequence[Sequence[int]] = ((1, 1, 3, 5, 7), (1, 1, 3, 5, 5), (1, 1, 3, 3, 3), (1, 1, 1, 1, 3)),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        _check_config(embed_dim, depths, shift_size, shift_dist, mix_size, mlp_ratio, drop_rate, drop_path_rate)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        patch = to_pair(patch_size, "patch_size")
        size = to_pair(img_size, "img_size")
        scale = 2 ** (len(depths) - 1)
        smallest = (patch[0] * scale, patch[1] * scale)
        if size[0] < smallest[0] or size[1] < smallest[1]:
            raise ValueError(
                f"img_size must be at least patch_size * 2 ** (stages - 1) = {smallest[0]}x{smallest[1]} (one token "
                f"in the last stage), got {img_size!r}"
            )
        self.config = dict(
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size if isinstance(patch_size, int) else list(patch_size),
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depths=list(depths),
            shift_size=shift_size,
            shift_dist=list(shift_dist),
            mix_size=[list(sizes) for sizes in mix_size],
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            patch_norm=patch_norm,
            global_pool=global_pool,
        )
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        self.in_chans = in_chans
        self.accepts = (
            "MSMLP",
            in_chans,
            (smallest[0], -1, smallest[1], -1),
            f"(B, {in_chans}, H, W) with H >= {smallest[0]} and W >= {smallest[1]} (patch_size {patch_size}, "
            f"{len(depths)} stages)",
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=False, num_classes=num_classes
        )
        self.feature_info = [
            dict(module=f"layers.{i}.blocks", num_chs=dim, reduction=patch[0] * 2**i) for i, dim in enumerate(dims)
        ]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch, norm=patch_norm, tokens_in=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        layers = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            first = sum(depths[:i])
            blocks = nn.Sequential(
                *(MixShiftBlock(dim, shift_dist, mix_size[i], mlp_ratio, rates[first + j]) for j in range(depth))
            )
            last = i == len(depths) - 1
            downsample = nn.Identity() if last else PatchEmbed(dim, 2 * dim, (2, 2), norm=True, tokens_in=True)
            layers.append(BasicLayer(blocks, downsample))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(self.num_features, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Identity()  # the authors drop nothing before the head (drop_rate acts after the stem)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear trunc-normal(0.02) with zero bias; LayerNorm 1/0, convs PyTorch's
        default, gamma 1e-6 (as constructed)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])
        blocks = [
            (r"^layers\.(\d+)\.blocks\.(\d+)", None),
            (r"^layers\.(\d+)\.downsample", (99998,)),  # the transition closes its stage in the authors' layout
            (r"^norm", (99999,)),
        ]
        return dict(stem=r"^patch_embed", blocks=blocks)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.pos_drop(self.patch_embed(x))

    def _feature_stages(self) -> list[list[nn.Module]]:
        """Stage i: the previous stage's transition (the authors keep it at the end of `layers[i - 1]`), then
        `layers[i].blocks`."""
        stages = []
        for i, layer in enumerate(self.layers):
            stages.append(([self.layers[i - 1].downsample] if i > 0 else []) + [layer.blocks])
        return stages

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """None: the authors' final norm normalises pooled features, not maps (see forward_head)."""
        return None

    def _truncate(self, last: int) -> None:
        if last < len(self.layers) - 1:
            self.norm = nn.Identity()  # it has the last stage's width, which is gone
        self.layers = self.layers[: last + 1]
        self.layers[last].downsample = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's (B, H, W, C) tokens; the final norm comes after the pooling, in `forward_head`."""
        x = self._embed(x)
        for layer in self.layers:
            # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(layer.blocks, x)
            else:
                x = layer.blocks(x)
            x = layer.downsample(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens (global_pool 'avg'), then the final norm (per token with global_pool ''), then the head;
        `pre_logits` stops after the norm."""
        if self.global_pool == "avg":
            x = x.mean(dim=self.token_dims)
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """No norm on the tokens: MS-MLP normalises after pooling (see forward_head), so the final features of
        `forward_intermediates` are `forward_features`' tokens."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_BLOB = "https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model"
_RELEASES = {"t": ("tiny", 82.1), "s": ("small", 83.4), "b": ("base", 83.8)}  # the authors' README

ENTRIES = [
    ModelEntry(
        name=f"msmlp_{variant}",
        architecture=MSMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.875, "the authors' evaluation (Swin's data/build.py): shorter side to 256 bicubic, centre crop 224"
        ),
        releases=(
            hosted(
                "imagenet1k",
                f"{_BLOB}/msmlp_{_RELEASES[variant][0]}_patch4/msmlp_{_RELEASES[variant][0]}_patch4_ckpt_epoch299.pth "
                "(JegZheng/MS-MLP README; a training checkpoint, the weights under 'model')",
                1000,
                IN1K,
                _RELEASES[variant][1],
                f"{_BLOB}/msmlp_{_RELEASES[variant][0]}_patch4/msmlp_{_RELEASES[variant][0]}_patch4_ckpt_epoch299.pth",
            ),
        ),
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
