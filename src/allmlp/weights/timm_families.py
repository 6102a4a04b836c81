"""timm's ResMLP state dicts, renamed to the authors' (FB's) names that allmlp's ResMLP keeps.

timm renames FB's ResMLP on loading (its `checkpoint_filter_fn`) and publishes the result: `stem.` for
`patch_embed.`, `linear_tokens` for `attn`, `mlp_channels` for `mlp`, `ls1` / `ls2` for `gamma_1` / `gamma_2`, and
the Affine `alpha` / `beta` reshaped from (dim,) to (1, 1, dim). This module undoes exactly that.

A file is timm's ResMLP when it has timm's stem and a block with `linear_tokens`: timm's MLP-Mixer files share the
stem but mix tokens with `mlp_tokens`, and gMLP / gMixer (whose only weights are timm's, so allmlp keeps timm's
names for them) have no `linear_tokens` either, so none of those is taken for ResMLP.
"""

from __future__ import annotations

import re

import torch

from .files import WeightsError

_LINEAR_TOKENS = re.compile(r"^blocks\.\d+\.linear_tokens\.weight$")
_BLOCK_RENAMES = (
    (re.compile(r"^(blocks\.\d+)\.linear_tokens\.(weight|bias)$"), r"\1.attn.\2"),
    (re.compile(r"^(blocks\.\d+)\.mlp_channels\.(fc[12]\.(?:weight|bias))$"), r"\1.mlp.\2"),
    (re.compile(r"^(blocks\.\d+)\.ls([12])$"), r"\1.gamma_\2"),
)
_AFFINE = re.compile(r"^(?:blocks\.\d+\.norm[12]|norm)\.(?:alpha|beta)$")


def is_timm_resmlp(keys: list[str]) -> bool:
    return "stem.proj.weight" in keys and any(_LINEAR_TOKENS.match(key) for key in keys)


def convert_timm_resmlp(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ResMLP names -> FB's; Affine parameters (1, 1, dim) -> (dim,). Other keys pass unchanged (a strict
    load then names them)."""
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith("stem."):
            key = "patch_embed." + key[len("stem.") :]
        for pattern, replacement in _BLOCK_RENAMES:
            key = pattern.sub(replacement, key)
        if _AFFINE.match(key):
            if tensor.ndim not in (1, 3) or tensor.shape[:-1] not in ((), (1, 1)):
                raise WeightsError(
                    f"{key}: timm's ResMLP Affine parameters have shape (1, 1, dim), got {tuple(tensor.shape)}"
                )
            tensor = tensor.reshape(-1)
        converted[key] = tensor
    return converted
