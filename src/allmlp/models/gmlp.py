"""gMLP (Liu et al., "Pay Attention to MLPs", NeurIPS 2021, arXiv 2105.08050) and gMixer, as timm implements them.

There is no official gMLP vision code and there are no official weights; the weights in use are timm's
(`gmlp_s16_224.ra3_in1k`, `gmixer_24_224.ra3_in1k`, trained by Ross Wightman), so these models match timm's
implementation (`timm/models/mlp_mixer.py`; the tests compare against timm 1.0.31 at 1e-5) exactly, with timm's
module names as their own: timm's files load unchanged.

- gMLP block on (B, S, C) tokens: x + fc2(SGU(GELU(fc1(LayerNorm(x))))), where the spatial gating unit splits the
  hidden channels into halves u, v and returns u * proj(LayerNorm(v)) with `proj` an nn.Linear across the tokens.
  Block and final LayerNorms eps 1e-6; the gate's LayerNorm eps 1e-5 (timm's, PyTorch's default). Exact GELU.
- gMixer (timm's "Glu-Mixer", an experiment adding SwiGLU to MLP-Mixer): Mixer blocks whose token and channel MLPs
  are GLUs, fc1 -> (x1, x2) halves -> x1 * SiLU(x2) -> fc2; hidden widths (1.0, 4.0) x dim before halving.
- Initialisation as timm's: Linear xavier-uniform, biases of MLP layers N(0, 1e-6) and others zero, the patch
  convolution lecun-normal, LayerNorm 1 / 0, zero head; the spatial gating unit's `proj` weight N(0, 1e-6) with
  bias 1 (the paper's "near-identity" start), and the gate half of a GLU's fc1 likewise.
- Stochastic depth at the same rate in every block, dropout before the head (`drop_rate`) and inside the MLPs
  (`proj_drop_rate`), as timm's MlpMixer.
The token-mixing layers fix the number of patches, so a model takes the one input size it was built for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .entries import ModelEntry, Preprocessing, hosted, imagenet_preprocessing
from .interface import pretrained_cfg
from .layers import DropPath, check_rate, lecun_normal_, to_pair
from .mixer import PatchTokenMLP
from .resmlp import PatchEmbed

GMLP_PAPER = "Liu et al., Pay Attention to MLPs, NeurIPS 2021 (arXiv 2105.08050)"
GMIXER_PAPER = "none: timm's Glu-Mixer (Ross Wightman), MLP-Mixer with SwiGLU MLPs (timm/models/mlp_mixer.py)"
LAYER_NORM_EPS = 1e-6
GATE_NORM_EPS = 1e-5

# timm's gmlp_ti16_224 / gmlp_s16_224 / gmlp_b16_224 and gmixer_12_224 / gmixer_24_224 constructors.
GMLP_CONFIGS = {
    "ti16": dict(patch_size=16, embed_dim=128, num_blocks=30, mlp_ratio=6),
    "s16": dict(patch_size=16, embed_dim=256, num_blocks=30, mlp_ratio=6),
    "b16": dict(patch_size=16, embed_dim=512, num_blocks=30, mlp_ratio=6),
}
GMIXER_CONFIGS = {
    "12": dict(patch_size=16, embed_dim=384, num_blocks=12, mlp_ratio=[1.0, 4.0]),
    "24": dict(patch_size=16, embed_dim=384, num_blocks=24, mlp_ratio=[1.0, 4.0]),
}


class SpatialGatingUnit(nn.Module):
    """u * proj(norm(v)) over (B, S, 2D) -> (B, S, D), where (u, v) are the channel halves and `proj` mixes tokens."""

    def __init__(self, dim: int, num_patches: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2, eps=GATE_NORM_EPS)
        self.proj = nn.Linear(num_patches, num_patches)

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = x.chunk(2, dim=-1)
        # the gate back in token-major order first: a product of two differently strided operands (u is every
        # other half-row, the gate a transpose) runs several times slower on CPU than a transpose and a product
        return self.proj(self.norm(v).transpose(1, 2)).transpose(1, 2).contiguous() * u


class GatedMlp(nn.Module):
    """gMLP's channel MLP: fc1 -> GELU -> dropout -> spatial gating (`gate`) -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, num_patches: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.gate = SpatialGatingUnit(hidden, num_patches)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.gate(self.drop1(self.act(self.fc1(x))))))


class SpatialGatingBlock(nn.Module):
    """x + drop_path(mlp_channels(norm(x))) on (B, S, C)."""

    def __init__(self, dim: int, hidden: int, num_patches: int, drop: float, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp_channels = GatedMlp(dim, hidden, num_patches, drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


class GluMlp(nn.Module):
    """A GLU over the last dimension: fc1 to `hidden`, halves (x1, x2), x1 * SiLU(x2), dropout, fc2 from hidden / 2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.drop2 = nn.Dropout(drop)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The gate half of fc1 starts near zero with bias 1 (timm's GluMlp.init_weights)."""
        half = self.fc1.weight.shape[0] // 2
        nn.init.ones_(self.fc1.bias[half:])
        nn.init.normal_(self.fc1.weight[half:], std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.drop1(x1 * self.act(x2))))


class GMixerBlock(nn.Module):
    """Mixer's block with GLU MLPs: token mixing (`mlp_tokens` on the (B, C, S) transpose), then channel mixing."""

    def __init__(self, dim: int, num_patches: int, tokens_hidden: int, channels_hidden: int, drop, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp_tokens = GluMlp(num_patches, tokens_hidden, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp_channels = GluMlp(dim, channels_hidden, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class _TimmStyleMLP(PatchTokenMLP):
    """The model scaffolding gMLP and gMixer share with timm's MlpMixer: `stem`, `blocks`, `norm`, head dropout,
    `head`, and timm's initialisation."""

    stem_name = "stem"

    def _build(
        self,
        family: str,
        img_size,
        patch_size,
        in_chans: int,
        num_classes: int,
        embed_dim: int,
        num_blocks: int,
        drop_rate: float,
        proj_drop_rate: float,
        drop_path_rate: float,
        global_pool: str,
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        size, patch = to_pair(img_size, "img_size"), to_pair(patch_size, "patch_size")
        self._setup(family, size, patch, in_chans, num_classes, embed_dim, num_blocks, global_pool, "num_blocks")
        for name, value in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate)):
            check_rate(name, value)
        check_rate("drop_path_rate", drop_path_rate)
        self.stem = PatchEmbed(patch, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        return size, patch

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stem(x)

    def _config(self, img_size, patch_size, **rest) -> dict:
        return dict(
            img_size=img_size if isinstance(img_size, int) else list(img_size),
            patch_size=patch_size if isinstance(patch_size, int) else list(patch_size),
            **rest,
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's MlpMixer initialisation (`_init_weights`, children before parents, so the gating units'
        `init_weights` override the generic Linear init of their layers)."""
        for name, module in reversed(list(self.named_modules())):
            if isinstance(module, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.xavier_uniform_(module.weight)
                    if "mlp" in name:
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (SpatialGatingUnit, GluMlp)):
                module.init_weights()


class GMLP(_TimmStyleMLP):
    """gMLP with timm's argument names. `forward_features` gives the (B, S, C) tokens after the final LayerNorm.
    `mlp_ratio` sets fc1's width (embed_dim * mlp_ratio, halved by the gate)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 256,
        num_blocks: int = 30,
        mlp_ratio: float = 6.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        size, _ = self._build(
            "GMLP", img_size, patch_size, in_chans, num_classes, embed_dim, num_blocks, drop_rate, proj_drop_rate,
            drop_path_rate, global_pool,
        )  # fmt: skip
        hidden = int(embed_dim * mlp_ratio) if isinstance(mlp_ratio, (int, float)) else 0
        if hidden < 2 or hidden % 2:
            raise ValueError(
                f"mlp_ratio must be a number giving an even hidden width >= 2 (embed_dim {embed_dim} x mlp_ratio, "
                f"halved by the spatial gating unit), got {mlp_ratio!r}"
            )
        self.config = self._config(
            img_size, patch_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
            num_blocks=num_blocks, mlp_ratio=mlp_ratio, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            drop_path_rate=drop_path_rate, global_pool=global_pool,
        )  # fmt: skip
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "stem.proj", fixed_input_size=True, num_classes=num_classes,
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        )  # fmt: skip
        self.blocks = nn.Sequential(
            *(
                SpatialGatingBlock(embed_dim, hidden, self.num_patches, proj_drop_rate, drop_path_rate)
                for _ in range(num_blocks)
            )
        )
        self.init_weights()


class GMixer(_TimmStyleMLP):
    """gMixer (timm's Glu-Mixer) with timm's argument names; `mlp_ratio` = (tokens, channels): the GLUs' fc1 widths
    as multiples of embed_dim (halved by the gate)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        num_blocks: int = 24,
        mlp_ratio: Sequence[float] = (1.0, 4.0),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        size, _ = self._build(
            "GMixer", img_size, patch_size, in_chans, num_classes, embed_dim, num_blocks, drop_rate, proj_drop_rate,
            drop_path_rate, global_pool,
        )  # fmt: skip
        ratios = [mlp_ratio, mlp_ratio] if isinstance(mlp_ratio, (int, float)) else list(mlp_ratio)
        widths = [int(r * embed_dim) for r in ratios if isinstance(r, (int, float))]
        if len(ratios) != 2 or len(widths) != 2 or any(w < 2 or w % 2 for w in widths):
            raise ValueError(
                f"mlp_ratio must be a number or a (tokens, channels) pair giving even GLU widths >= 2 (x embed_dim "
                f"{embed_dim}), got {mlp_ratio!r}"
            )
        self.config = self._config(
            img_size, patch_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
            num_blocks=num_blocks, mlp_ratio=ratios if not isinstance(mlp_ratio, (int, float)) else mlp_ratio,
            drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )  # fmt: skip
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "stem.proj", fixed_input_size=True, num_classes=num_classes
        )
        self.blocks = nn.Sequential(
            *(
                GMixerBlock(embed_dim, self.num_patches, widths[0], widths[1], proj_drop_rate, drop_path_rate)
                for _ in range(num_blocks)
            )
        )
        self.init_weights()


_TIMM_NOTE = "timm's evaluation: resize to 224 / 0.875 bicubic, centre crop 224"
_GMLP_PREPROCESSING = Preprocessing(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875, note=_TIMM_NOTE
)
_TIMM_RA3 = "ImageNet-1k from scratch, timm's RandAugment recipe (ra3)"


def _timm_releases(name: str, file: str, top1: float) -> tuple:
    """timm's weights: the Hugging Face copy (timm's default) and the original GitHub release."""
    return (
        hosted(
            "ra3_in1k",
            f"timm {name}.ra3_in1k (Hugging Face hub)",
            1000,
            _TIMM_RA3,
            top1,
            f"https://huggingface.co/timm/{name}.ra3_in1k/resolve/main/model.safetensors",
        ),
        hosted(
            "ra3_in1k_github",
            f"timm {name}.ra3_in1k, the original release on GitHub",
            1000,
            _TIMM_RA3,
            top1,
            f"https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/{file}",
        ),
    )


# Top-1 as timm measures its weights (results/results-imagenet.csv); the paper's gMLP-S (trained by the authors,
# never released) has 79.6.
_GMLP_RELEASES = {"ti16": (), "s16": _timm_releases("gmlp_s16_224", "gmlp_s16_224_raa-10536d42.pth", 79.652), "b16": ()}
_GMIXER_RELEASES = {"12": (), "24": _timm_releases("gmixer_24_224", "gmixer_24_224_raa-7daf7ae6.pth", 78.048)}

ENTRIES = [
    ModelEntry(
        name=f"gmlp_{variant}_224",
        architecture=GMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=_GMLP_PREPROCESSING,
        releases=_GMLP_RELEASES[variant],
        paper=GMLP_PAPER,
    )
    for variant, config in GMLP_CONFIGS.items()
] + [
    ModelEntry(
        name=f"gmixer_{variant}_224",
        architecture=GMixer,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(0.875, _TIMM_NOTE),
        releases=_GMIXER_RELEASES[variant],
        paper=GMIXER_PAPER,
    )
    for variant, config in GMIXER_CONFIGS.items()
]
