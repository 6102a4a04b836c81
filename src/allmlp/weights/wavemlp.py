"""The authors' Wave-MLP releases (huawei-noah/Efficient-AI-Backbones, `WaveMLP_{T_dw,T,S,M}.pth.tar`).

The files are flat state dicts in the authors' (and allmlp's) names, saved after thop counted the FLOPs: thop
registers two float64 buffers of one element, `total_ops` and `total_params`, on every module, so beside the
weights there is a `<module>.total_ops` / `<module>.total_params` pair for each module (and a bare pair for the
model). Those counters, and nothing else, are dropped.
"""

from __future__ import annotations

import torch

THOP_COUNTERS = ("total_ops", "total_params")


def _is_thop_counter(key: str, tensor: object) -> bool:
    return key.rsplit(".", 1)[-1] in THOP_COUNTERS and isinstance(tensor, torch.Tensor) and tensor.numel() == 1


def has_thop_counters(keys: list[str]) -> bool:
    return any(key.rsplit(".", 1)[-1] in THOP_COUNTERS for key in keys)


def drop_thop_counters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without thop's one-element `total_ops` / `total_params` counters (any other key is kept, so a
    counter of another shape is reported by the strict load as unexpected)."""
    return {key: tensor for key, tensor in state_dict.items() if not _is_thop_counter(key, tensor)}
