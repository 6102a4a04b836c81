"""Pieces shared by every all-MLP family: the two-layer MLP, stochastic depth, initialisers."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

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
    """fc1 -> GELU -> dropout -> fc2 -> dropout; `fc1`/`fc2` are the checkpoint names of timm and the authors.

    `forward(x)` maps the last dimension, as usual. Two options serve fast callers without changing the math:
    `residual` is added inside fc2's matrix product (one pass over memory instead of two), and
    `features_first=True` maps the first dimension instead (`W @ x`), which is how Mixer's token mixing runs on
    token-major activations without any transpose.
    """

    def __init__(self, in_features: int, hidden_features: int, gelu: str = "erf", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_gelu(gelu)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, features_first: bool = False
    ) -> torch.Tensor:
        """`residual + mlp(x)` (just `mlp(x)` without a residual); `residual` has the shape of `x`."""
        # CPU inference: two oneDNN calls, with the bias and GELU, then the bias and residual, in the products.
        if (
            not features_first
            and not (self.training and (self.drop1.p or self.drop2.p))
            and onednn_applies(x, self, residual)
        ):
            hidden = onednn_linear(x, self.fc1.weight, self.fc1.bias, gelu=self.act.approximate)
            return onednn_linear(hidden, self.fc2.weight, self.fc2.bias, residual=residual)
        # Under torch.compile plain out-of-place ops are best: the compiler fuses bias, GELU and the residual add
        # into the matrix products itself (oneDNN post-ops on CPU), which in-place ops would hide from it.
        eager = not torch.compiler.is_compiling()
        hidden = linear(x, self.fc1, features_first)
        if eager and not hidden.requires_grad:  # in place: no hidden-sized buffer to allocate and fault in
            hidden = torch.ops.aten.gelu_(hidden, approximate=self.act.approximate)
        else:
            hidden = self.act(hidden)
        hidden = self.drop1(hidden)
        if eager and not (self.drop2.p and self.training):
            return linear(hidden, self.fc2, features_first, residual)
        out = self.drop2(linear(hidden, self.fc2, features_first))
        return out if residual is None else residual + out


# oneDNN's fused linear (used by torch.compile's CPU backend): the bias, a GELU or a residual add run inside the
# matrix product instead of as separate passes over memory, which makes CPU inference 5-20% faster per layer.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: torch.Tensor, module: nn.Module, residual: torch.Tensor | None = None) -> bool:
    """Whether `onednn_linear` may run `module`'s linear layers on x: eager CPU inference in float32 or bfloat16
    with parameters of x's dtype, outside autocast, autograd and any tracing (the op has no gradient and no
    ONNX or export translation, so every other case takes the portable path)."""
    weight = next(module.parameters())
    return (
        ONEDNN_LINEAR
        and torch.backends.mkldnn.enabled
        and type(x) is torch.Tensor  # no FakeTensor (torch.export) or other subclass
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and (residual is None or residual.dtype == x.dtype)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def onednn_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias, then GELU (`gelu`: nn.GELU's `approximate`) or plus `residual`, in one oneDNN call.

    Only where `onednn_applies`."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if gelu is not None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(
    x: torch.Tensor, layer: nn.Linear, features_first: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`layer` applied to the last dimension of `x` (or to the first, `W @ x`), plus `residual` if given.

    With a residual, bias and residual are summed first and the product accumulates into that sum in place
    (`addmm_` with beta=1), so the output is written once. Autocast does not reach in-place ops, hence the
    explicit casts of the parameters to the dtype of the activations (no-ops outside autocast). In CPU inference
    (`onednn_applies`) one oneDNN call does the product, the bias and the residual add.
    """
    if not features_first and onednn_applies(x, layer, residual):
        return onednn_linear(x, layer.weight, layer.bias, residual=residual)
    if not features_first and residual is None:
        return F.linear(x, layer.weight, layer.bias)
    out_features = layer.weight.shape[0]
    if features_first:
        rows = x.reshape(x.shape[0], -1)
        out_shape = (out_features, *x.shape[1:])
    else:
        rows = x.reshape(-1, x.shape[-1])
        out_shape = (*x.shape[:-1], out_features)
    fused = residual is not None and residual.dtype == rows.dtype
    weight = layer.weight.to(rows.dtype) if fused else layer.weight
    bias = layer.bias.to(rows.dtype) if fused else layer.bias
    if features_first:
        bias, left, right = bias[:, None], weight, rows
    else:
        left, right = rows, weight.t()
    if not fused:
        out = torch.addmm(bias, left, right).view(out_shape)
        return out if residual is None else residual + out
    return (residual.reshape(left.shape[0], right.shape[1]) + bias).addmm_(left, right).view(out_shape)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability `rate`, rescale the rest.

    `batch_dim` is the dimension that indexes samples (1 for Mixer's token-major (S, B, C) activations).
    """

    def __init__(self, rate: float = 0.0, batch_dim: int = 0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.batch_dim = batch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = [1] * x.ndim
        shape[self.batch_dim] = x.shape[self.batch_dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}, batch_dim={self.batch_dim}"


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


class ClassifierInterface:
    """The head and checkpointing methods every allmlp model shares.

    The model sets `num_features`, `num_classes`, `config`, `head`, `norm` (the final LayerNorm) and
    `grad_checkpointing`, and recomputes its blocks in the backward pass while `grad_checkpointing` is on.
    """

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: same outputs and gradients, far less memory."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a zero-initialised one for `num_classes` (0: no head, pre-logits out)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        like = self.norm.weight
        self.head = zero_head(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        self.num_classes = self.config["num_classes"] = num_classes
