"""MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601), exact to the paper and the official JAX code.

Per-patch linear embedding, then blocks of token mixing (an MLP across patches, shared over channels) and
channel mixing (an MLP per patch), pre-norm with residuals, final LayerNorm, mean over tokens, linear head.
Numerics follow the reference: LayerNorm eps 1e-6, tanh-approximate GELU (flax's default), lecun-normal
kernels, zero biases and a zero head. Module names follow timm, so its state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import ClassifierInterface, DropPath, Mlp, lecun_normal_, linear_drop_path_rates, to_pair, zero_head

LAYER_NORM_EPS = 1e-6

# Paper Table 1 (and the released GSAM S/8): patch size, hidden size C, blocks, D_S, D_C.
CONFIGS = {
    "s32": dict(patch_size=32, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "s16": dict(patch_size=16, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "s8": dict(patch_size=8, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "b32": dict(patch_size=32, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "b16": dict(patch_size=16, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "l32": dict(patch_size=32, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "l16": dict(patch_size=16, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "h14": dict(patch_size=14, hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}


class PatchEmbed(nn.Module):
    """Per-patch linear embedding; tokens are the patch grid flattened row-major (h-major, then w)."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) tokens, stored token-major: `.transpose(0, 1)` of the result is a contiguous (S, B, C)."""
        return self.proj(x).flatten(2).permute(2, 0, 1).contiguous().transpose(0, 1)


class MixerBlock(nn.Module):
    """Paper eq. (1): token mixing across patches, then channel mixing per patch, each pre-norm + residual.

    Works on token-major activations (S, B, C). Token mixing is then a single `W @ x` product on the (S, B*C)
    view and channel mixing a single `x @ W^T` on the (S*B, C) view: every matrix product reads contiguous
    memory and no transpose is ever copied. The residual adds are fused into the second product of each MLP.
    """

    def __init__(
        self,
        num_tokens: int,
        hidden_dim: int,
        tokens_mlp_dim: int,
        channels_mlp_dim: int,
        gelu: str,
        drop_path: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_tokens = Mlp(num_tokens, tokens_mlp_dim, gelu)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.mlp_channels = Mlp(hidden_dim, channels_mlp_dim, gelu)
        self.drop_path = DropPath(drop_path, batch_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(self.mlp_tokens, self.norm1(x), x, features_first=True)
        return self._residual(self.mlp_channels, self.norm2(x), x, features_first=False)

    def _residual(self, mlp: Mlp, y: torch.Tensor, x: torch.Tensor, features_first: bool) -> torch.Tensor:
        if self.drop_path.rate and self.training:
            return x + self.drop_path(mlp(y, features_first=features_first))
        return mlp(y, residual=x, features_first=features_first)


class MlpMixer(ClassifierInterface, nn.Module):
    """MLP-Mixer. `forward_features` gives (B, S, C) tokens after the final LayerNorm."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        hidden_dim: int = 768,
        num_blocks: int = 12,
        tokens_mlp_dim: int = 384,
        channels_mlp_dim: int = 3072,
        gelu: str = "tanh",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        img_size, patch_size = to_pair(img_size, "img_size"), to_pair(patch_size, "patch_size")
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        for name, value in (
            ("in_chans", in_chans),
            ("hidden_dim", hidden_dim),
            ("num_blocks", num_blocks),
            ("tokens_mlp_dim", tokens_mlp_dim),
            ("channels_mlp_dim", channels_mlp_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")

        self.config = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            num_blocks=num_blocks,
            tokens_mlp_dim=tokens_mlp_dim,
            channels_mlp_dim=channels_mlp_dim,
            gelu=gelu,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.num_features = hidden_dim
        self.num_classes = num_classes
        self.grad_checkpointing = False

        self.stem = PatchEmbed(patch_size, in_chans, hidden_dim)
        rates = linear_drop_path_rates(drop_path_rate, num_blocks)
        self.blocks = nn.Sequential(
            *(MixerBlock(self.num_tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu, rate) for rate in rates)
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = zero_head(hidden_dim, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation: lecun-normal kernels, zero biases, LayerNorm 1/0, zero head."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if name == "head":
                    nn.init.zeros_(module.weight)
                else:
                    lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # a trace records one fixed shape; the check would only warn there
            return
        expected = (self.in_chans, *self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MlpMixer expects input of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}; build the model with img_size/in_chans to match, "
                f"or use allmlp.adapt_resolution for another image size"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) tokens after the final LayerNorm: a transposed view of the token-major (S, B, C) result."""
        self._check_input(x)
        x = self.stem(x).transpose(0, 1)  # token-major (S, B, C), as the blocks want it
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x).transpose(0, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def config_from_state_dict(state_dict: dict[str, torch.Tensor], gelu: str) -> dict:
    """The MlpMixer config that a state dict in allmlp/timm names was made for (square token grid assumed)."""
    out_dim, in_chans, patch_h, patch_w = state_dict["stem.proj.weight"].shape
    num_tokens = state_dict["blocks.0.mlp_tokens.fc1.weight"].shape[1]
    grid = round(num_tokens**0.5)
    if grid * grid != num_tokens:
        raise ValueError(f"{num_tokens} tokens is not a square grid: build the model by name and img_size")
    block_ids = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    head = state_dict.get("head.weight")
    return dict(
        img_size=(grid * patch_h, grid * patch_w),
        patch_size=(patch_h, patch_w),
        in_chans=in_chans,
        num_classes=0 if head is None else head.shape[0],
        hidden_dim=out_dim,
        num_blocks=max(block_ids) + 1,
        tokens_mlp_dim=state_dict["blocks.0.mlp_tokens.fc1.weight"].shape[0],
        channels_mlp_dim=state_dict["blocks.0.mlp_channels.fc1.weight"].shape[0],
        gelu=gelu,
    )
