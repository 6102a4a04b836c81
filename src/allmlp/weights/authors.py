"""The authors' CycleMLP and ViP checkpoints (ShoufaChen/CycleMLP, houqb/VisionPermutator).

allmlp keeps the authors' module names, so their keys need no renaming, and the released training checkpoints
(the state dict wrapped as {"model": ...}) are unwrapped by `files.read_weights`. ViP's state dicts hold
parameters only. CycleMLP's also hold a constant `offset` buffer per Cycle FC, (1, 2 * C, 1, 1): the (dy, dx)
sampling offset of each input channel for deform_conv2d. allmlp derives the offsets from the pseudo-kernel
instead of storing them, so a checkpoint's offsets are checked against that pattern and then dropped.
"""

from __future__ import annotations

import re

import torch

from ..models.cyclemlp import cycle_shifts
from .files import WeightsError

# The pseudo-kernel of each Cycle FC in the authors' token mixer (sfc_h: 1x3, along the width; sfc_w: 3x1).
CYCLE_FC_KERNELS = {"sfc_h": (1, 3), "sfc_w": (3, 1)}
_OFFSET_KEY = re.compile(r"(?:^|\.)(sfc_[hw])\.offset$")


def cycle_offsets(channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The authors' offset buffer of a Cycle FC: (1, 2 * channels, 1, 1), a (dy, dx) pair per input channel."""
    kh, kw = kernel_size
    shifts = torch.tensor(cycle_shifts(channels, max(kh, kw)), dtype=torch.float32)
    zeros = torch.zeros_like(shifts)
    pairs = torch.stack((zeros, shifts) if kh == 1 else (shifts, zeros), dim=1)
    return pairs.reshape(1, 2 * channels, 1, 1)


def has_cycle_offsets(keys: list[str]) -> bool:
    return any(_OFFSET_KEY.search(key) for key in keys)


def drop_cycle_offsets(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without its Cycle FC offsets, each checked to be the pattern allmlp computes."""
    kept = {}
    for key, tensor in state_dict.items():
        match = _OFFSET_KEY.search(key)
        if match is None:
            kept[key] = tensor
            continue
        kernel_size = CYCLE_FC_KERNELS[match[1]]
        if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] % 2 or tensor.shape[2:] != (1, 1):
            raise WeightsError(f"{key}: a Cycle FC offset buffer has shape (1, 2 * C, 1, 1), got {tuple(tensor.shape)}")
        expected = cycle_offsets(tensor.shape[1] // 2, kernel_size)
        if not torch.equal(tensor.float(), expected):
            channel = int((tensor.float() != expected).flatten().nonzero()[0]) // 2
            got = tuple(tensor.flatten()[2 * channel : 2 * channel + 2].tolist())
            want = tuple(expected.flatten()[2 * channel : 2 * channel + 2].tolist())
            raise WeightsError(
                f"{key}: offsets differ from the Cycle FC pattern of a {kernel_size[0]}x{kernel_size[1]} "
                f"pseudo-kernel, which allmlp computes: input channel {channel} has (dy, dx) = {got}, "
                f"expected {want}"
            )
    return kept
