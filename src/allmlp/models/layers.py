"""Pieces shared by every all-MLP family: the two-layer MLP, stochastic depth, initialisers."""

from __future__ import annotations

import math

import torch
from torch import nn

GELU_APPROXIMATIONS = {"tanh": "tanh", "erf": "none"}


def to_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or an (H, W) pair as an (H, W) tuple of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of positive ints, got {value!r}")
    return pair


def make_gelu(gelu: str) -> nn.GELU:
    """GELU by name: 'tanh' (flax's default, used by the official Mixer) or 'erf' (exact, as in timm)."""
    if gelu not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu must be one of {sorted(GELU_APPROXIMATIONS)}, got {gelu!r}")
    return nn.GELU(approximate=GELU_APPROXIMATIONS[gelu])


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout over the last dimension; `fc1`/`fc2` are timm's and the authors'
    checkpoint names. Every layer is called as a module, so hooks, LoRA, pruning and quantisation see them all."""

    def __init__(self, in_features: int, hidden_features: int, gelu: str = "erf", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_gelu(gelu)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample (dimension 0) with probability `rate`, rescale the rest."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def linear_drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Rates rising linearly from 0 at the first block to `drop_path_rate` at the last."""
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


@torch.no_grad()
def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """flax's lecun_normal: truncated normal (+-2 std) with variance 1/fan_in.

    The 0.8796... factor undoes the variance lost by truncating at two standard deviations, as flax does.
    """
    fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def zero_head(num_features: int, num_classes: int) -> nn.Module:
    """A zero-initialised linear classifier (the Mixer reference's head init), or Identity for num_classes=0."""
    if num_classes == 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def check_positive_ints(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_rate(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
