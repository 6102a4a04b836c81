"""SPACH-MLP (Zhao et al., "A Battle of Network Structures: An Empirical Study of CNN, Transformer, and MLP",
arXiv 2108.13002), exact to the authors' code: microsoft/SPACH `models/spach/` at commit dcede1e.

Two models with the authors' argument and module names, so that their released files (`spach_ms_mlp_{xxs,s}.pth`,
`{"model": state_dict}`) load with `load_state_dict` unchanged: `SpachMS`, four stages (`layer1` .. `layer4`, a
2x2 stride-2 conv + GroupNorm(1, eps 1e-5) at index 0 of stages 2-4), and `Spach`, one stage (`blocks`).

A mixing block (`MixingBlock`) on tokens x, as the authors compute it:
    x = x + drop_path(gamma_1 * spatial_func(norm1(x_in))) + cpe_net(x_in)
    x = x + drop_path(channel_func(norm2(x)))
with `spatial_func` an MLP over the tokens (N -> N * token_ratio -> N, `fc1`/`fc2`), `cpe_net` a depthwise 3x3
conv with bias that reads the block input, `channel_func` an MLP over channels (C -> C * channel_ratio -> C),
LayerNorms with eps 1e-6, exact (erf) GELU and the layer scale `gamma_1` (1e-4 at init) on the spatial branch only.
A 'pass' block has no spatial branch (no `norm1`, `gamma_1`, `spatial_func` keys). With `shared_spatial_func`, one
spatial MLP serves every block of a stage (its weights then appear under each block's name, as in the authors'
state dict). The stem is the authors' `conv1` (one patch conv) or `conv4` (conv 7x7/2, two 3x3, BatchNorm + ReLU
after each, then a patch conv of patch_size / 2). Initialisation is the authors' (`_init_weights`).

Exactness: the same operations in the same order on the same values; tokens stay channels-last (B, H, W, C), so the
depthwise and downsampling convs read channels_last views instead of the authors' reshaped copies. Only the
authors' 'mlp' and 'pass' mixers are here: 'attn' (self-attention) is not an MLP and is refused by name.

Input size: the spatial MLPs are sized for one token grid (`img_size // patch_size`, quartered at each stage of
SpachMS), so a model with an 'mlp' block takes exactly img_size x img_size, as the authors' stem asserts. A model
of 'pass' blocks only has nothing sized to the grid and takes any input large enough for its stages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, Mlp, linear_drop_path_rates

PAPER = (
    "Zhao et al., A Battle of Network Structures: An Empirical Study of CNN, Transformer, and MLP (arXiv 2108.13002)"
)
LAYER_NORM_EPS = 1e-6
MIXERS = ("mlp", "pass")
STEM_TYPES = ("conv1", "conv4")
CONV4_HIDDEN = 64  # the authors' Conv4PatchEmbed hidden_chans

# The authors' spach_ms_{xxs,xs,s}_patch4_224_mlp and spach_{xxs,xs,s}_patch16_224_mlp constructors.
MS_CONFIGS = {
    "xxs": dict(
        img_size=224,
        patch_size=4,
        hidden_dim=64,
        token_ratio=0.5,
        num_heads=2,
        channel_ratio=2.0,
        net_arch=[[["pass", 2]], [["mlp", 2]], [["mlp", 6]], [["mlp", 2]]],
    ),
    "xs": dict(
        img_size=224,
        patch_size=4,
        hidden_dim=96,
        token_ratio=0.5,
        num_heads=3,
        channel_ratio=2.0,
        net_arch=[[["pass", 3]], [["mlp", 4]], [["mlp", 12]], [["mlp", 3]]],
    ),
    "s": dict(
        img_size=224,
        patch_size=4,
        hidden_dim=128,
        token_ratio=0.5,
        num_heads=4,
        channel_ratio=3.0,
        net_arch=[[["pass", 3]], [["mlp", 4]], [["mlp", 12]], [["mlp", 3]]],
    ),
}
CONFIGS = {
    "xxs": dict(
        img_size=224,
        patch_size=16,
        hidden_dim=384,
        token_ratio=0.5,
        num_heads=12,
        channel_ratio=2.0,
        net_arch=[["mlp", 12]],
    ),
    "xs": dict(
        img_size=224,
        patch_size=16,
        hidden_dim=384,
        token_ratio=0.5,
        num_heads=12,
        channel_ratio=2.0,
        net_arch=[["mlp", 24]],
    ),
    "s": dict(
        img_size=224,
        patch_size=16,
        hidden_dim=512,
        token_ratio=0.5,
        num_heads=16,
        channel_ratio=3.0,
        net_arch=[["mlp", 24]],
    ),
}


class ChannelsLast(nn.Sequential):
    """A Sequential of NCHW modules (children named as the authors' keys: their reshapes, which hold nothing, are
    gone) run on (B, H, W, C) tokens through the channels_last view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        for module in self:
            x = module(x)
        return x.permute(0, 2, 3, 1)


class DWConv(nn.Module):
    """The position conv (`cpe_net`): depthwise 3x3 with bias, zero padding 1 (`net.1`, the authors' key)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv2d(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim)
        self.net = ChannelsLast(OrderedDict([("1", conv)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DownsampleConv(nn.Module):
    """Between stages: a 2x2 stride-2 conv without bias and GroupNorm(1, C, eps 1e-5) (`net.1.0`, `net.1.1`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 2, stride=2, bias=False)
        body = nn.Sequential(conv, nn.GroupNorm(1, out_channels))
        self.net = ChannelsLast(OrderedDict([("1", body)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialMLP(nn.Module):
    """The token-mixing MLP: per channel, N tokens -> hidden -> N (`fc1`, `fc2`), with exact GELU and dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        # one copy to (B, C, N), as the authors' Linear makes on their transposed view; made here explicitly so the
        # product runs the same kernel with and without autograd (matmul treats a strided 3-D input differently)
        tokens = x.reshape(batch, height * width, channels).transpose(1, 2).contiguous()
        tokens = self.drop(self.fc2(self.drop(self.act(self.fc1(tokens)))))
        return tokens.transpose(1, 2).reshape(batch, height, width, channels)  # a view: no copy back


class MixingBlock(nn.Module):
    """The authors' block on (B, H, W, C) tokens (see the module doc); `spatial_func` None: a 'pass' block."""

    def __init__(
        self,
        dim: int,
        spatial_func: nn.Module | None,
        channel_ratio: float,
        drop: float,
        drop_path: float,
        init_values: float = 1e-4,
    ):
        super().__init__()
        if spatial_func is not None:
            self.spatial_func = spatial_func
            self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.gamma_1 = nn.Parameter(init_values * torch.ones(1, 1, dim))
        else:
            self.spatial_func, self.norm1, self.gamma_1 = None, None, None
        self.channel_func = Mlp(dim, int(dim * channel_ratio), gelu="erf", drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.drop_path = DropPath(drop_path)
        self.cpe_net = DWConv(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_x = x
        if self.spatial_func is not None and self.norm1 is not None and self.gamma_1 is not None:
            x = x + self.drop_path(self.gamma_1 * self.spatial_func(self.norm1(in_x)))
        x = x + self.cpe_net(in_x)
        return x + self.drop_path(self.channel_func(self.norm2(x)))


class PatchEmbed(nn.Module):
    """The `conv1` stem: one patch conv with bias (`proj`), image -> (B, H, W, C) tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # norm1, next, writes contiguous (B, H, W, C) tokens


class Conv4PatchEmbed(nn.Module):
    """The `conv4` stem (`proj.0` .. `proj.9`): conv 7x7 stride 2 (padding 3), two convs 3x3, each without bias and
    followed by BatchNorm and ReLU, then a patch conv of patch_size // 2 with bias."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, hidden_chans: int = CONV4_HIDDEN):
        super().__init__()
        sub = patch_size // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden_chans, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, embed_dim, kernel_size=sub, stride=sub),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def stem_side(size: int, patch_size: int, stem_type: str) -> int:
    """The token grid side the stem gives for an input side `size` (0: none)."""
    if stem_type == "conv1":
        return size // patch_size
    return ((size - 1) // 2 + 1) // (patch_size // 2)


def _number(value, name: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return float(value)


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_stage_arch(stage_arch, name: str) -> list[list]:
    """A list of (mixer, depth) pairs with mixer 'mlp' or 'pass' and depth >= 1, as lists (JSON-able)."""
    if isinstance(stage_arch, (str, bytes)) or not isinstance(stage_arch, Sequence) or not stage_arch:
        raise ValueError(f"{name} must be a non-empty list of (mixer, depth) pairs, got {stage_arch!r}")
    checked = []
    for entry in stage_arch:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"{name}: each entry must be a (mixer, depth) pair, got {entry!r}")
        mixer, depth = entry
        if mixer not in MIXERS:
            what = {"attn": "self-attention", "conv": "a convolution"}.get(mixer)
            extra = f" ({what} is not an MLP mixer and is not part of allmlp)" if what else ""
            raise ValueError(f"{name}: mixer must be 'mlp' or 'pass', got {mixer!r}{extra}")
        _positive_int(depth, f"{name}: the depth of {mixer!r}")
        checked.append([mixer, depth])
    return checked


class SpachBase(ModelInterface, nn.Module):
    """What SpachMS and Spach share: checks, stem, final norm (`norm2`), head and the model interface."""

    def _setup(
        self,
        num_classes: int,
        img_size: int,
        in_chans: int,
        hidden_dim: int,
        patch_size: int,
        stages: list[list[list]],
        token_ratio: float,
        channel_ratio: float,
        num_heads: int,
        stem_type: str,
        drop_path_rate: float,
        shared_spatial_func: bool,
        drop_rate: float,
        global_pool: str,
        multi_stage: bool,
    ) -> list[int]:
        """Check the arguments, set the config and interface attributes, build the stem and norm1; returns the token
        grid side of each stage."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
            raise ValueError(f"img_size must be a positive int (SPACH takes square inputs), got {img_size!r}")
        for value, name in ((in_chans, "in_chans"), (hidden_dim, "hidden_dim"), (patch_size, "patch_size")):
            _positive_int(value, name)
        _positive_int(num_heads, "num_heads")
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type must be 'conv1' or 'conv4', got {stem_type!r}")
        if stem_type == "conv4" and patch_size < 2:
            raise ValueError(
                f"stem_type 'conv4' needs patch_size >= 2 (its last conv is patch_size // 2), got {patch_size}"
            )
        _number(token_ratio, "token_ratio", 0.0, low_open=True)
        _number(channel_ratio, "channel_ratio", 0.0, low_open=True)
        _number(drop_path_rate, "drop_path_rate", 0.0, 1.0)
        _number(drop_rate, "drop_rate", 0.0, 1.0)
        if not isinstance(shared_spatial_func, bool):
            raise ValueError(f"shared_spatial_func must be a bool, got {shared_spatial_func!r}")
        self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.head_drop = nn.Identity()  # the authors' head has no dropout (drop_rate is the MLPs')

        # The authors size each spatial MLP for img_size // patch_size tokens a side (seq_len // 4 per later stage);
        # the grid a model computes on must be that one wherever an 'mlp' block is.
        grid = img_size // patch_size
        sides, lengths = [stem_side(img_size, patch_size, stem_type)], [grid * grid]
        for _ in stages[1:]:
            sides.append(sides[-1] // 2)
            lengths.append(lengths[-1] // 4)
        has_mlp = False
        for i, stage in enumerate(stages):
            if any(mixer == "mlp" for mixer, _ in stage):
                has_mlp = True
                if sides[i] ** 2 != lengths[i] or sides[i] < 1:
                    raise ValueError(
                        f"no input fits: the 'mlp' blocks of stage {i + 1} are sized for {lengths[i]} tokens "
                        f"(img_size {img_size} // patch_size {patch_size} = {grid} a side"
                        f"{', quartered per stage' if i else ''}), but a {img_size}x{img_size} input gives a "
                        f"{sides[i]}x{sides[i]} grid there ({stem_type} stem); choose img_size a multiple of "
                        f"{patch_size << (len(stages) - 1)}"
                    )
                if int(lengths[i] * token_ratio) < 1:
                    raise ValueError(
                        f"token_ratio {token_ratio} gives no hidden tokens for the {lengths[i]} tokens of stage {i + 1}"
                    )
        if has_mlp:
            low = high = img_size
            hint = f"(B, {in_chans}, {img_size}, {img_size}): its token-mixing MLPs are sized for img_size {img_size}"
        else:
            need = 1 << (len(stages) - 1)
            low = next(size for size in range(1, 1 << 20) if stem_side(size, patch_size, stem_type) >= need)
            high = -1
            hint = f"(B, {in_chans}, H, W) with H, W >= {low} (a model of 'pass' blocks takes any size)"
        self.accepts = ("SpachMS" if multi_stage else "Spach", in_chans, (low, high, low, high), hint)
        first_conv = "stem.proj" if stem_type == "conv1" else "stem.proj.0"
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, img_size, img_size), first_conv, fixed_input_size=has_mlp, num_classes=num_classes
        )
        if stem_type == "conv1":
            self.stem = PatchEmbed(in_chans, hidden_dim, patch_size)
        else:
            self.stem = Conv4PatchEmbed(in_chans, hidden_dim, patch_size)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        return lengths

    @staticmethod
    def _blocks(
        dim: int,
        tokens: int,
        stage_arch: list[list],
        rates: list[float],
        token_ratio: float,
        channel_ratio: float,
        drop_rate: float,
        shared: bool,
    ) -> list[MixingBlock]:
        def spatial() -> SpatialMLP:
            return SpatialMLP(tokens, int(tokens * token_ratio), drop_rate)

        shared_func = spatial() if shared else None
        blocks, index = [], 0
        for mixer, depth in stage_arch:
            for _ in range(depth):
                func = None if mixer == "pass" else (shared_func or spatial())
                blocks.append(MixingBlock(dim, func, channel_ratio, drop_rate, rates[index]))
                index += 1
        return blocks

    def _finish(self, num_features: int) -> None:
        self.num_features = num_features
        self.norm2 = nn.LayerNorm(num_features, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' `_init_weights`: Linear xavier-uniform with zero bias (the head all zero), Conv2d
        kaiming-normal (fan_out, relu) with zero bias, norms 1 / 0; gamma_1 stays 1e-4."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)  # their `'mlp' in name` case matches no module name
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x)

    def _prune_final_norm(self) -> None:
        self.norm2 = nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.norm1(self.stem(x))

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x if output_fmt == "NHWC" else x.permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module | None:
        """The final norm, which fits the last output only."""
        return self.norm2 if index == len(self.feature_info) - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SpachMS(SpachBase):
    """Multi-stage SPACH with the authors' argument names; `forward_features` gives the (B, H, W, C) tokens after
    the final norm. Four stages (`layer1` .. `layer4`) at strides patch_size * 1, 2, 4, 8, widths hidden_dim * 1, 2,
    4, 8; `net_arch` holds one list of (mixer, depth) pairs per stage. Stochastic depth rises linearly over all
    blocks. With `shared_spatial_func`, stages 2-4 each share one spatial MLP (the first stage must be 'pass', as
    the authors' code only runs that way)."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        hidden_dim: int = 64,
        patch_size: int = 4,
        net_arch: Sequence = (((("pass", 2),), (("mlp", 2),), (("mlp", 6),), (("mlp", 2),))),
        token_ratio: float = 0.5,
        channel_ratio: float = 2.0,
        num_heads: int = 2,
        stem_type: str = "conv1",
        drop_path_rate: float = 0.0,
        shared_spatial_func: bool = False,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if isinstance(net_arch, (str, bytes)) or not isinstance(net_arch, Sequence) or len(net_arch) != 4:
            raise ValueError(f"net_arch must be 4 stage lists of (mixer, depth) pairs (SpachMS), got {net_arch!r}")
        stages = [check_stage_arch(stage, f"net_arch[{i}]") for i, stage in enumerate(net_arch)]
        if shared_spatial_func:
            if any(mixer != "pass" for mixer, _ in stages[0]):
                raise ValueError(
                    "shared_spatial_func: the first stage must be 'pass' blocks (the authors share spatial MLPs in "
                    f"stages 2-4 only, and their code cannot run an 'mlp' first stage then), got {stages[0]!r}"
                )
            for i, stage in enumerate(stages[1:], start=2):
                if len(stage) != 1 or stage[0][0] != "mlp":
                    raise ValueError(
                        f"shared_spatial_func needs one 'mlp' entry per stage after the first (the authors' "
                        f"assertion), got {stage!r} in stage {i}"
                    )
        self.config = dict(
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            hidden_dim=hidden_dim,
            patch_size=patch_size,
            net_arch=stages,
            token_ratio=token_ratio,
            channel_ratio=channel_ratio,
            num_heads=num_heads,
            stem_type=stem_type,
            drop_path_rate=drop_path_rate,
            shared_spatial_func=shared_spatial_func,
            drop_rate=drop_rate,
            global_pool=global_pool,
        )
        lengths = self._setup(
            num_classes, img_size, in_chans, hidden_dim, patch_size, stages, token_ratio, channel_ratio,
            num_heads, stem_type, drop_path_rate, shared_spatial_func, drop_rate, global_pool, multi_stage=True,
        )  # fmt: skip
        depths = [sum(depth for _, depth in stage) for stage in stages]
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        self.feature_info = []
        start = 0
        for i, stage in enumerate(stages):
            dim = hidden_dim << i
            layers: list[nn.Module] = [DownsampleConv(dim // 2, dim)] if i else []
            layers += self._blocks(
                dim, lengths[i], stage, rates[start : start + depths[i]], token_ratio, channel_ratio, drop_rate,
                shared_spatial_func and i > 0,
            )  # fmt: skip
            start += depths[i]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.feature_info.append(dict(module=f"layer{i + 1}", num_chs=dim, reduction=patch_size << i))
        self._finish(hidden_dim * 8)

    def group_matcher(self, coarse: bool = False) -> dict:
        blocks = [(r"^layer(\d+)", None)] if coarse else [(r"^layer(\d+)\.(\d+)", None)]
        return dict(stem=r"^stem\.|^norm1\.", blocks=blocks + [(r"^norm2\.", (99999,))])

    def _feature_stages(self) -> list[list[nn.Module]]:
        return [[self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def _truncate(self, last: int) -> None:
        if last < 3:
            self._prune_final_norm()  # the final norm has the last stage's width, which is gone
        for i in range(last + 1, 4):
            setattr(self, f"layer{i + 1}", nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final norm."""
        x = self._embed(x)
        # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = self._run_stages_checkpointed(x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.norm2(x)

    @torch.jit.unused
    def _run_stages_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for (stage,) in self._feature_stages():
            x = self._run_checkpointed(stage, x)
        return x


class Spach(SpachBase):
    """Single-stage SPACH with the authors' argument names; `forward_features` gives the (B, H, W, C) tokens after
    the final norm. `net_arch` is a list of (mixer, depth) pairs run in order (`blocks`); the intermediate outputs
    are the blocks', all at stride patch_size (as timm gives them for ViT and Mixer). As in the authors' code,
    every block drops its paths at `drop_path_rate` (no linear rise), and `shared_spatial_func` shares one spatial
    MLP among all blocks (net_arch must then be a single 'mlp' entry)."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        hidden_dim: int = 384,
        patch_size: int = 16,
        net_arch: Sequence = (("mlp", 12),),
        token_ratio: float = 0.5,
        channel_ratio: float = 2.0,
        num_heads: int = 12,
        stem_type: str = "conv1",
        drop_path_rate: float = 0.0,
        shared_spatial_func: bool = False,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        arch = check_stage_arch(net_arch, "net_arch")
        if shared_spatial_func and (len(arch) != 1 or arch[0][0] != "mlp"):
            raise ValueError(
                f"shared_spatial_func needs net_arch to be one 'mlp' entry (the authors' assertion), got {arch!r}"
            )
        self.config = dict(
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            hidden_dim=hidden_dim,
            patch_size=patch_size,
            net_arch=arch,
            token_ratio=token_ratio,
            channel_ratio=channel_ratio,
            num_heads=num_heads,
            stem_type=stem_type,
            drop_path_rate=drop_path_rate,
            shared_spatial_func=shared_spatial_func,
            drop_rate=drop_rate,
            global_pool=global_pool,
        )
        (tokens,) = self._setup(
            num_classes, img_size, in_chans, hidden_dim, patch_size, [arch], token_ratio, channel_ratio,
            num_heads, stem_type, drop_path_rate, shared_spatial_func, drop_rate, global_pool, multi_stage=False,
        )  # fmt: skip
        depth = sum(d for _, d in arch)
        self.blocks = nn.Sequential(
            *self._blocks(
                hidden_dim, tokens, arch, [float(drop_path_rate)] * depth, token_ratio, channel_ratio, drop_rate,
                shared_spatial_func,
            )
        )  # fmt: skip
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=hidden_dim, reduction=patch_size) for i in range(depth)]
        self._finish(hidden_dim)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem\.|^norm1\.", blocks=[(r"^blocks\.(\d+)", None), (r"^norm2\.", (99999,))])

    def _feature_stages(self) -> list[list[nn.Module]]:
        return [[block] for block in self.blocks]

    def _truncate(self, last: int) -> None:
        self.blocks = self.blocks[: last + 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, W, C) tokens after the final norm."""
        x = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = self._run_checkpointed(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm2(x)


_PREPROCESSING = imagenet_preprocessing(
    0.875, "the authors' evaluation (SPACH main.py, DeiT's): resize 256 bicubic, centre crop 224"
)
_MS_TOP1 = {"xxs": 74.5, "s": 82.1}  # README; the XS weights were not released


def _release(variant: str) -> tuple:
    if variant not in _MS_TOP1:
        return ()
    url = f"https://github.com/microsoft/SPACH/releases/download/v1.0/spach_ms_mlp_{variant}.pth"
    return (hosted("imagenet1k", url, 1000, IN1K, _MS_TOP1[variant], url),)


ENTRIES = [
    ModelEntry(
        name=f"spach_ms_mlp_{variant}",
        architecture=SpachMS,
        config=dict(num_classes=1000, **config),
        preprocessing=_PREPROCESSING,
        releases=_release(variant),
        paper=PAPER,
    )
    for variant, config in MS_CONFIGS.items()
] + [
    ModelEntry(
        name=f"spach_mlp_{variant}",
        architecture=Spach,
        config=dict(num_classes=1000, **config),
        preprocessing=_PREPROCESSING,
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
