"""A Mixer for another input size: token-mixing weights re-shaped for the new token grid (paper App. C).

Token mixing is tied to the number of tokens S, so weights trained at 224 do not fit a model at 448. For an
integer factor K_h x K_w in patches per side, the paper's init splits the image into K_h x K_w equal spatial
parts and gives the token MLP K_h K_w copies of W1 and W2 on the block diagonal (D_S' = K_h K_w D_S, biases
tiled): at initialisation every part goes through the pre-trained MLP on its own, so the adapted model's
logits are the mean of the original model's logits on the parts. For any other size the token-mixing weights
are resampled over the 2-D token grid instead, which only approximates the original function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import to_pair
from ..models.mixer import MlpMixer
from ..weights import load_weights, read_config, read_state_dict

METHODS = ("auto", "block_diagonal", "resample")


def adapt_resolution(model: MlpMixer, img_size: int | tuple[int, int], method: str = "auto") -> MlpMixer:
    """A new MlpMixer for `img_size` initialised from `model` (which is left untouched).

    method: "block_diagonal" (paper App. C; needs the new token grid to be an integer multiple of the old one
    on each side), "resample" (bilinear resampling of the token-mixing weights over the token grid; keeps D_S;
    approximate), or "auto": block-diagonal where the factor is an integer, resampling otherwise.
    The new model has the dtype, device, training mode and grad-checkpointing setting of `model`.
    """
    if not isinstance(model, MlpMixer):
        raise ValueError(f"adapt_resolution works on MlpMixer models, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    img_size = to_pair(img_size, "img_size")
    patch_h, patch_w = model.patch_size
    if img_size[0] % patch_h or img_size[1] % patch_w:
        raise ValueError(f"img_size {img_size} must be divisible by the model's patch_size {model.patch_size}")
    old_grid = model.grid_size
    new_grid = (img_size[0] // patch_h, img_size[1] // patch_w)
    factors = (new_grid[0] // old_grid[0], new_grid[1] // old_grid[1])
    is_integer = all(new % old == 0 for new, old in zip(new_grid, old_grid, strict=True))
    if method == "block_diagonal" and not is_integer:
        raise ValueError(
            f"block-diagonal init needs the new token grid {new_grid} to be an integer multiple of the old "
            f"{old_grid} on each side (img_size a multiple of {tuple(model.img_size)}); use method='resample'"
        )
    block_diagonal = method == "block_diagonal" or (method == "auto" and is_integer)

    tokens_mlp_dim = model.config["tokens_mlp_dim"]
    if block_diagonal:
        tokens_mlp_dim *= factors[0] * factors[1]
    with torch.no_grad():
        state_dict = {}
        for key, value in model.state_dict().items():
            if ".mlp_tokens." not in key:
                state_dict[key] = value.clone()
            elif block_diagonal:
                state_dict[key] = _block_diagonal(key, value, old_grid, factors)
            else:
                state_dict[key] = _resample(key, value, old_grid, new_grid)

    config = {**model.config, "img_size": img_size, "tokens_mlp_dim": tokens_mlp_dim}
    with torch.device("meta"):
        adapted = MlpMixer(**config)
    # assign=True takes the tensors as they are (dtype, device), so nothing is initialised only to be overwritten
    adapted.load_state_dict(state_dict, assign=True)
    adapted.train(model.training)
    adapted.set_grad_checkpointing(model.grad_checkpointing)
    return adapted


def load_weights_adapted(
    model: nn.Module, source: str | os.PathLike | Mapping, *, reset_head: bool = False
) -> nn.Module:
    """`allmlp.load_weights`, except that Mixer weights whose token mixing has another shape (made for another
    input size, or already adapted) are loaded into a twin of `model` at their own size and D_S, then adapted to
    `model`'s size with `adapt_resolution`: fine-tuning at 448 from a 224 checkpoint, or evaluating the result.
    Returns the model to use: `model` itself, or the adapted new one (whose tokens_mlp_dim is then K_h K_w times
    the checkpoint's for an integer factor)."""
    if not isinstance(model, MlpMixer):
        return load_weights(model, source, reset_head=reset_head)
    state_dict, _ = read_state_dict(source)
    fc1 = state_dict.get("blocks.0.mlp_tokens.fc1.weight")
    if fc1 is None or fc1.shape == model.blocks[0].mlp_tokens.fc1.weight.shape:
        return load_weights(model, state_dict, reset_head=reset_head)
    twin = MlpMixer(**{**model.config, "img_size": _checkpoint_img_size(source, model, fc1.shape[1]),
                       "tokens_mlp_dim": fc1.shape[0]})  # fmt: skip
    twin = twin.to(device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    load_weights(twin, state_dict, reset_head=reset_head)
    return adapt_resolution(twin, model.img_size)


def _checkpoint_img_size(source: str | os.PathLike | Mapping, model: MlpMixer, num_tokens: int) -> tuple[int, int]:
    """The input size the weights were made for: from an allmlp file's config, else a square token grid."""
    stored = None if isinstance(source, Mapping) else read_config(source)
    if stored is not None:
        return to_pair(stored[1]["img_size"], "img_size")
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(
            f"the checkpoint's token mixing has {num_tokens} tokens, not a square grid; save it with "
            f"allmlp.save_weights (which records its img_size) or adapt it with allmlp.adapt_resolution"
        )
    return side * model.patch_size[0], side * model.patch_size[1]


def _part_index(old_grid: tuple[int, int], factors: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(part, local token) of every token of the new grid, both flattened row-major; the new grid is too."""
    grid_h, grid_w = old_grid
    rows = torch.arange(grid_h * factors[0], device=device)
    cols = torch.arange(grid_w * factors[1], device=device)
    part = (rows[:, None] // grid_h) * factors[1] + cols[None, :] // grid_w
    local = (rows[:, None] % grid_h) * grid_w + cols[None, :] % grid_w
    return torch.stack([part.flatten(), local.flatten()])


def _block_diagonal(key: str, value: torch.Tensor, old_grid: tuple[int, int], factors: tuple[int, int]) -> torch.Tensor:
    """One token-MLP tensor for the K_h K_w-part model: hidden unit p * D_S + d of part p sees only part p."""
    num_parts = factors[0] * factors[1]
    part, local = _part_index(old_grid, factors, value.device)
    if key.endswith("fc1.bias"):  # (D_S,) -> (K^2 D_S,)
        return value.repeat(num_parts)
    if key.endswith("fc2.bias"):  # (S,) -> (S',)
        return value[local].clone()
    if key.endswith("fc1.weight"):  # (D_S, S) -> (K^2 D_S, S')
        hidden = value.shape[0]
        out = value.new_zeros(num_parts, hidden, part.numel())
        out[part, :, torch.arange(part.numel(), device=value.device)] = value[:, local].T
        return out.reshape(num_parts * hidden, part.numel())
    if key.endswith("fc2.weight"):  # (S, D_S) -> (S', K^2 D_S)
        hidden = value.shape[1]
        out = value.new_zeros(part.numel(), num_parts, hidden)
        out[torch.arange(part.numel(), device=value.device), part] = value[local]
        return out.reshape(part.numel(), num_parts * hidden)
    raise ValueError(f"unexpected token-mixing parameter {key!r}")


def _resample_grid(values: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """(N, S) values on the old token grid -> (N, S') bilinearly resampled on the new grid."""
    grid = values.reshape(-1, 1, *old_grid).float()
    resized = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(values.shape[0], -1).to(values.dtype)


def _resample(key: str, value: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Token-MLP tensor resampled to the new grid. W1's rows are scaled by S / S' so that a hidden unit's input
    sum over a (smoothly varying) image keeps its size; W2's columns and b2 are values per output token."""
    ratio = (old_grid[0] * old_grid[1]) / (new_grid[0] * new_grid[1])
    if key.endswith("fc1.bias"):
        return value.clone()
    if key.endswith("fc1.weight"):  # (D_S, S): each row is a map over the token grid
        return _resample_grid(value, old_grid, new_grid) * ratio
    if key.endswith("fc2.weight"):  # (S, D_S): each column is a map over the token grid
        return _resample_grid(value.T, old_grid, new_grid).T.contiguous()
    if key.endswith("fc2.bias"):
        return _resample_grid(value[None], old_grid, new_grid)[0]
    raise ValueError(f"unexpected token-mixing parameter {key!r}")
