"""The official MLP-Mixer releases (google-research/vision_transformer, big_vision): flat `.npz` archives.

Keys are Flax module paths joined with '/', Dense kernels are (in, out), the stem kernel is HWIO, and the
block indices sort lexicographically in the file (MixerBlock_1, MixerBlock_10, ...), so they are parsed.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .files import WeightsError

_BLOCK_MODULES = {
    "LayerNorm_0": "norm1",
    "token_mixing/Dense_0": "mlp_tokens.fc1",
    "token_mixing/Dense_1": "mlp_tokens.fc2",
    "LayerNorm_1": "norm2",
    "channel_mixing/Dense_0": "mlp_channels.fc1",
    "channel_mixing/Dense_1": "mlp_channels.fc2",
}
_TOP_MODULES = {"stem": "stem.proj", "pre_head_layer_norm": "norm", "head": "head"}
_PARAMS = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Exports of full Flax checkpoints sometimes keep the collection name in front.
_PREFIXES = ("params/", "opt/target/")


def is_jax_mixer(keys: list[str]) -> bool:
    return any(key.startswith(("stem/kernel", "MixerBlock_")) or "/MixerBlock_" in key for key in keys)


def convert_jax_mixer(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Official npz arrays -> allmlp/timm state dict (transposed to PyTorch layouts)."""
    state_dict, unknown = {}, []
    for key, array in arrays.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        module, _, param = key.rpartition("/")
        block = re.fullmatch(r"MixerBlock_(\d+)/(.+)", module)
        if block and block[2] in _BLOCK_MODULES:
            name = f"blocks.{int(block[1])}.{_BLOCK_MODULES[block[2]]}"
        elif module in _TOP_MODULES:
            name = _TOP_MODULES[module]
        else:
            unknown.append(key)
            continue
        if param not in _PARAMS:
            unknown.append(key)
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if param == "kernel":
            # Conv HWIO -> OIHW; Dense (in, out) -> Linear (out, in).
            tensor = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.T
        state_dict[f"{name}.{_PARAMS[param]}"] = tensor.contiguous()
    if unknown:
        raise WeightsError(f"official Mixer .npz holds arrays that belong to no Mixer parameter: {sorted(unknown)}")
    return state_dict
