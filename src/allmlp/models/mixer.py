"""MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601), exact to the paper and the official JAX code.

Per-patch linear embedding, then blocks of token mixing (an MLP across patches, shared over channels) and
channel mixing (an MLP per patch), pre-norm with residuals, final LayerNorm, mean over tokens, linear head.
Numerics follow the reference: LayerNorm eps 1e-6, tanh-approximate GELU (flax's default), lecun-normal
kernels, zero biases and a zero head. Module names follow timm, so its state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .interface import ModelInterface, check_global_pool, pretrained_cfg
from .layers import DropPath, Mlp, check_positive_ints, lecun_normal_, linear_drop_path_rates, to_pair, zero_head

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
    """Per-patch linear embedding; tokens are the patch grid flattened row-major (h-major, then w): (B, S, C)."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MixerBlock(nn.Module):
    """Paper eq. (1) on (B, S, C) tokens: token mixing across patches (`mlp_tokens`, applied to the (B, C, S)
    transpose), then channel mixing per patch (`mlp_channels`), each pre-norm with a residual."""

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
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class PatchTokenMLP(ModelInterface, nn.Module):
    """What the isotropic patch-token families (Mixer, ResMLP, gMLP, gMixer) share: a stem giving (B, S, C) tokens,
    `blocks` (an nn.Sequential), a final norm, mean over tokens, head; the blocks are the intermediate outputs.

    A subclass sets `stem_name` (its stem module's attribute), builds the modules, calls `_setup` and implements
    `_embed` (`_check_input`, then the stem, called by name so TorchScript compiles it).
    """

    token_format = "NLC"
    token_dims = (1,)
    stem_name = "stem"

    def _setup(
        self,
        family: str,
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
        in_chans: int,
        num_classes: int,
        embed_dim: int,
        depth: int,
        global_pool: str,
        depth_name: str = "depth",
    ) -> None:
        """Checks and the interface attributes; call before building the modules (sets `grid_size`)."""
        check_positive_ints(**{"in_chans": in_chans, "embed_dim": embed_dim, depth_name: depth})
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
        if img_size[0] < patch_size[0] or img_size[1] < patch_size[1]:
            raise ValueError(f"img_size {img_size} must be at least patch_size {patch_size} on each side")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_features = embed_dim
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool)
        self.grad_checkpointing = False
        shape = f"(B, {in_chans}, {img_size[0]}, {img_size[1]})"
        self.accepts = (
            family,
            in_chans,
            (img_size[0], img_size[0], img_size[1], img_size[1]),
            f"{shape}: its token-mixing layers are built for a {self.grid_size[0]}x{self.grid_size[1]} patch grid; "
            f"build the model with img_size/in_chans to match",
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=max(patch_size)) for i in range(depth)
        ]

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=rf"^{self.stem_name}", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _feature_stages(self) -> list[list[nn.Module]]:
        return [[block] for block in self.blocks]

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        if output_fmt == "NLC":
            return x
        return x.reshape(x.shape[0], self.grid_size[0], self.grid_size[1], x.shape[-1]).permute(0, 3, 1, 2).contiguous()

    def _intermediate_norm(self, index: int) -> nn.Module:
        return self.norm

    def _truncate(self, last: int) -> None:
        self.blocks = self.blocks[: last + 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) tokens after the final norm."""
        x = self._embed(x)
        # `_checkpointing()` spelled out: TorchScript drops the branch only where it sees is_scripting() itself
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = self._run_checkpointed(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MlpMixer(PatchTokenMLP):
    """MLP-Mixer. `forward_features` gives the (B, S, C) tokens after the final LayerNorm; its intermediate
    outputs (`forward_intermediates`, `features_only`) are the blocks'."""

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
        global_pool: str = "avg",
    ):
        super().__init__()
        img_size, patch_size = to_pair(img_size, "img_size"), to_pair(patch_size, "patch_size")
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        check_positive_ints(
            in_chans=in_chans,
            hidden_dim=hidden_dim,
            num_blocks=num_blocks,
            tokens_mlp_dim=tokens_mlp_dim,
            channels_mlp_dim=channels_mlp_dim,
        )
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
            global_pool=check_global_pool(global_pool),
        )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.num_features = hidden_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False
        shape = f"(B, {in_chans}, {img_size[0]}, {img_size[1]})"
        self.accepts = (
            "MlpMixer",
            in_chans,
            (img_size[0], img_size[0], img_size[1], img_size[1]),
            f"{shape}; build the model with img_size/in_chans to match, or use allmlp.adapt_resolution for "
            f"another image size",
        )
        self.pretrained_cfg = pretrained_cfg(
            (in_chans, *img_size),
            "stem.proj",
            fixed_input_size=True,
            num_classes=num_classes,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bilinear",
            crop_pct=1.0,
        )

        self.stem = PatchEmbed(patch_size, in_chans, hidden_dim)
        rates = linear_drop_path_rates(drop_path_rate, num_blocks)
        self.blocks = nn.Sequential(
            *(MixerBlock(self.num_tokens, hidden_dim, tokens_mlp_dim, channels_mlp_dim, gelu, rate) for rate in rates)
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=hidden_dim, reduction=max(patch_size)) for i in range(num_blocks)
        ]
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

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stem(x)


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
