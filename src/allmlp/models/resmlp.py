"""ResMLP (Touvron et al., NeurIPS 2021 / TPAMI 2022, arXiv 2105.03404), exact to the authors' code
(facebookresearch/deit `resmlp_models.py` at commit 7e160fe4).

Per-patch linear embedding, then residual blocks of (i) a linear layer across patches (`attn`, an nn.Linear over
the token axis with bias, shared over channels) and (ii) a two-layer MLP per patch, each after an Affine
"norm" (alpha * x + beta per channel, no statistics) and scaled by a per-channel layer scale (`gamma_1`,
`gamma_2`). A final Affine, the mean over tokens and a linear head close the model. Exact (erf) GELU, MLP ratio 4,
stochastic depth at the same rate in every block (the authors' `dpr`), dropout inside the MLP (`drop_rate`).

Module and argument names are the authors', so FB's released state dicts load unchanged; timm's ResMLP weights
(other names: `stem`, `linear_tokens`, `ls1`, Affine parameters of shape (1, 1, dim)) are renamed on loading by
`allmlp.weights.timm_families`. Initialisation as the authors': Linear trunc-normal(0.02) with zero bias, the
patch convolution at PyTorch's default, Affine 1 / 0, layer scale `init_scale` (0.1 for 12 blocks, 1e-5 for 24,
1e-6 for 36 and for B-24; timm's resmlp_12_224 starts its layer scale at 1e-4 instead, and draws its Linear
weights xavier-uniform: only training from scratch sees either difference).

Tokens are batch-first, channels-last (B, S, C) with S the patch grid flattened row-major, as in the authors' code.
The token-mixing layer fixes the number of patches, so a model takes the one input size it was built for;
`img_size` may be non-square ((H, W)).
"""

from __future__ import annotations

import torch
from torch import nn

from .entries import IN1K, ModelEntry, hosted, imagenet_preprocessing
from .interface import pretrained_cfg
from .layers import DropPath, Mlp, check_rate, to_pair
from .mixer import PatchTokenMLP
from .vip import init_trunc_normal_

PAPER = (
    "Touvron et al., ResMLP: Feedforward networks for image classification with data-efficient training, "
    "TPAMI 2022 (arXiv 2105.03404)"
)

# The authors' resmlp_12 / resmlp_24 / resmlp_36 / resmlpB_24 constructors.
CONFIGS = {
    "12": dict(patch_size=16, embed_dim=384, depth=12, init_scale=0.1),
    "24": dict(patch_size=16, embed_dim=384, depth=24, init_scale=1e-5),
    "36": dict(patch_size=16, embed_dim=384, depth=36, init_scale=1e-6),
    "big_24": dict(patch_size=8, embed_dim=768, depth=24, init_scale=1e-6),
}


class Affine(nn.Module):
    """ResMLP's "norm": alpha * x + beta per channel (last dimension), alpha and beta of shape (dim,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class PatchEmbed(nn.Module):
    """Per-patch linear embedding (a strided convolution); tokens are the patch grid flattened row-major:
    (B, S, C), contiguous so the channel MLPs read them in place."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class ResMLPBlock(nn.Module):
    """The authors' `layers_scale_mlp_blocks` on (B, S, C): x + gamma_1 * attn over tokens of norm1(x), then
    x + gamma_2 * mlp(norm2(x)). `gamma_1` / `gamma_2` are this module's own parameters (the authors' keys)."""

    def __init__(self, dim: int, num_patches: int, init_scale: float, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = Affine(dim)
        self.attn = nn.Linear(num_patches, num_patches)
        self.drop_path = DropPath(drop_path)
        self.norm2 = Affine(dim)
        self.mlp = Mlp(dim, 4 * dim, gelu="erf", drop=drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_scale)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class ResMLP(PatchTokenMLP):
    """ResMLP with the authors' argument names (their class `resmlp_models`). `forward_features` gives the (B, S, C)
    tokens after the final Affine; the head averages them (global_pool 'avg') and applies `head`.
    `drop_rate` is the dropout inside the channel MLPs (the authors have no dropout before the head)."""

    stem_name = "patch_embed"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_scale: float = 1e-4,
        global_pool: str = "avg",
    ):
        super().__init__()
        size, patch = to_pair(img_size, "img_size"), to_pair(patch_size, "patch_size")
        self._setup("ResMLP", size, patch, in_chans, num_classes, embed_dim, depth, global_pool)
        check_rate("drop_rate", drop_rate)
        check_rate("drop_path_rate", drop_path_rate)
        if not isinstance(init_scale, (int, float)) or isinstance(init_scale, bool):
            raise ValueError(f"init_scale must be a number (the layer scale's initial value), got {init_scale!r}")
        self.config = dict(
            img_size=img_size if isinstance(img_size, int) else list(size),
            patch_size=patch_size if isinstance(patch_size, int) else list(patch),
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            init_scale=init_scale,
            global_pool=global_pool,
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *size), "patch_embed.proj", fixed_input_size=True, num_classes=num_classes, crop_pct=0.9
        )

        self.patch_embed = PatchEmbed(patch, in_chans, embed_dim)
        self.blocks = nn.Sequential(
            *(ResMLPBlock(embed_dim, self.num_patches, init_scale, drop_rate, drop_path_rate) for _ in range(depth))
        )
        self.norm = Affine(embed_dim)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.patch_embed(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation: Linear trunc-normal(0.02) with zero bias (the head too); the patch
        convolution keeps PyTorch's default, Affine 1 / 0 and the layer scale `init_scale` their constructors'."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_trunc_normal_(module.weight)
                nn.init.zeros_(module.bias)


def _fb_release(tag: str, file: str, trained_on: str, top1: float | None) -> object:
    url = f"https://dl.fbaipublicfiles.com/deit/{file}"
    return hosted(tag, f"{url} (facebookresearch/deit README_resmlp.md)", 1000, trained_on, top1, url)


def _timm_release(name: str, tag: str, trained_on: str, top1: float | None) -> object:
    """timm's Hugging Face copy of an FB release (safetensors in timm's names; loads through the renaming)."""
    url = f"https://huggingface.co/timm/{name}.{tag}/resolve/main/model.safetensors"
    source = f"timm {name}.{tag} (FB's weights in timm's names"
    if name == "resmlp_12_224":  # the only variant whose timm constructor differs from FB's in the layer-scale init
        source += "; timm's own resmlp_12_224 starts its layer scale at 1e-4, FB's at 0.1"
    return hosted(f"timm:{tag}", source + ")", 1000, trained_on, top1, url)


_DIST = "ImageNet-1k from scratch with DeiT's distillation from a convnet teacher"
_DINO = "ImageNet-1k self-supervised (DINO), not fine-tuned (published: k-NN top-1 {knn}, not a classifier's top-1)"
_22K = "ImageNet-22k pre-training, fine-tuned on ImageNet-1k"
# Published top-1 (paper Table 4 and README_resmlp.md): without distillation, with distillation, DINO k-NN.
_RELEASES = {
    "12": (
        _fb_release("dist", "resmlp_12_dist.pth", _DIST, 77.8),
        _fb_release("no_dist", "resmlp_12_no_dist.pth", IN1K, 76.6),
        _fb_release("dino", "resmlp_12_dino.pth", _DINO.format(knn=62.6), None),
        _timm_release("resmlp_12_224", "fb_distilled_in1k", _DIST, 77.8),
        _timm_release("resmlp_12_224", "fb_in1k", IN1K, 76.6),
        _timm_release("resmlp_12_224", "fb_dino", _DINO.format(knn=62.6), None),
    ),
    "24": (
        _fb_release("dist", "resmlp_24_dist.pth", _DIST, 80.8),
        _fb_release("no_dist", "resmlp_24_no_dist.pth", IN1K, 79.4),
        _fb_release("dino", "resmlp_24_dino.pth", _DINO.format(knn=69.4), None),
        _timm_release("resmlp_24_224", "fb_distilled_in1k", _DIST, 80.8),
        _timm_release("resmlp_24_224", "fb_in1k", IN1K, 79.4),
        _timm_release("resmlp_24_224", "fb_dino", _DINO.format(knn=69.4), None),
    ),
    "36": (
        _fb_release("dist", "resmlp_36_dist.pth", _DIST, 81.1),
        _fb_release("no_dist", "resmlp_36_no_dist.pth", IN1K, 79.7),
        _timm_release("resmlp_36_224", "fb_distilled_in1k", _DIST, 81.1),
        _timm_release("resmlp_36_224", "fb_in1k", IN1K, 79.7),
    ),
    "big_24": (
        _fb_release("dist", "resmlpB_24_dist.pth", _DIST, 83.6),
        _fb_release("no_dist", "resmlpB_24_no_dist.pth", IN1K, 81.0),
        _fb_release("22k", "resmlpB_24_22k.pth", _22K, 84.4),
        _timm_release("resmlp_big_24_224", "fb_distilled_in1k", _DIST, 83.6),
        _timm_release("resmlp_big_24_224", "fb_in1k", IN1K, 81.0),
        _timm_release("resmlp_big_24_224", "fb_in22k_ft_in1k", _22K, 84.4),
    ),
}

ENTRIES = [
    ModelEntry(
        name=f"resmlp_{variant}_224",
        architecture=ResMLP,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=imagenet_preprocessing(
            0.9, "the authors' evaluation (README_resmlp.md): resize to 224 / 0.9 bicubic, centre crop 224"
        ),
        releases=_RELEASES[variant],
        paper=PAPER,
    )
    for variant, config in CONFIGS.items()
]
