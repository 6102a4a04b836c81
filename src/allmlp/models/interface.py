"""timm's model interface, shared by every allmlp family: heads and pooling, intermediate features, feature
extraction (`features_only`), parameter groups and the preprocessing the weights expect (`pretrained_cfg`).

A family builds its modules and implements five small methods (`_embed`, `_feature_stages`, `_to_format`,
`_intermediate_norm`, `_truncate`); everything else here works from those, so that `forward_features`,
`forward_intermediates`, `features_only` and the CycleMLP `fork_feat` maps all run the same modules in the same
order. Nothing here branches on tensor values or shapes, so the models trace with torch.fx and export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import zero_head

GLOBAL_POOLS = ("avg", "")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' (mean over tokens) or '' (no pooling), got {global_pool!r}")
    return global_pool


def check_input(x: torch.Tensor, family: str, in_chans: int, sizes: tuple[int, int, int, int], hint: str) -> None:
    """Raise a ValueError naming the expected and the received shape unless x is (B, in_chans, H, W) with
    sizes[0] <= H <= sizes[1] and sizes[2] <= W <= sizes[3] (an upper bound of -1: any).

    Wrapped for torch.fx (below): a traced model keeps the check as one call instead of failing on its branches.
    """
    if torch.jit.is_tracing():  # a trace records one fixed shape; the check would only warn there
        return
    ok = x.dim() == 4 and x.shape[1] == in_chans
    if ok:
        height, width = x.shape[2], x.shape[3]
        ok = sizes[0] <= height and sizes[2] <= width
        ok = ok and (sizes[1] < 0 or height <= sizes[1]) and (sizes[3] < 0 or width <= sizes[3])
    if not ok:
        got = "(" + ", ".join([str(size) for size in x.shape]) + ")"
        raise ValueError(f"{family} expects input of shape {hint}, got {got}")


torch.fx.wrap("check_input")


def pretrained_cfg(
    input_size: tuple[int, int, int],
    first_conv: str,
    fixed_input_size: bool,
    num_classes: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
) -> dict:
    """A family's default `pretrained_cfg` (what timm's `resolve_model_data_config` reads); `create_model` puts the
    registry entry's preprocessing in."""
    return dict(
        input_size=tuple(input_size),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode="center",
        num_classes=num_classes,
        first_conv=first_conv,
        classifier="head",
        fixed_input_size=fixed_input_size,
    )


def feature_take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """The intermediate indices to take (an int n: the last n; a list: those, negatives counted from the end; None:
    all) and the largest of them."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices: an int must be in 1..{count} (the last n of {count} outputs), got {indices}")
        take = list(range(count - indices, count))
    else:
        take = []
        for index in indices:
            if not -count <= index < count:
                raise ValueError(f"indices: {index} is out of range for {count} outputs (0..{count - 1} or negative)")
            take.append(index % count)
        if not take:
            raise ValueError("indices: an empty list takes nothing")
    return take, max(take)


class FeatureInfo:
    """timm's `feature_info` of a features-only model: channels, reduction and module name per output."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(info[i], index=i) for i in out_indices]
        self.out_indices = list(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [entry[key] for entry in self.info]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def __getitem__(self, idx: int) -> dict:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)


class ModelInterface:
    """The methods every allmlp model shares (timm's interface).

    A family sets `config`, `num_classes`, `num_features`, `global_pool`, `head_drop`, `head`, `norm` (the final
    norm), `grad_checkpointing`, `feature_info` (a dict per intermediate output: module, num_chs, reduction),
    `pretrained_cfg` and `accepts` (the arguments of `check_input` after x), and implements:
    - `_embed(x)`: `_check_input(x)` and the stem, image -> batch-first tokens;
    - `_feature_stages()`: for each intermediate output, the modules that run from the previous one to it;
    - `_to_format(x, output_fmt)`: tokens as an 'NCHW' map or in the family's token format;
    - `_intermediate_norm(index)`: the norm `forward_intermediates(norm=True)` applies to output `index`, or None;
    - `_truncate(last)`: drop every module after intermediate output `last`.
    A family whose norms take another layout than its tokens (AS-MLP: GroupNorm on NCHW views of (B, H, W, C)
    tokens) overrides `_apply_norm(norm, x)`, which `forward_intermediates` applies its norms through.
    """

    __jit_unused_properties__ = ["head_hidden_size", "default_cfg"]  # interface, not part of the forward pass
    __constants__ = ["token_dims"]
    token_format = "NHWC"  # the layout of tokens before `_to_format`; Mixer's are "NLC"
    token_dims = (1, 2)  # the dimensions of the tokens, which global_pool 'avg' averages

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: same outputs and gradients, far less memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay beyond the 1-D ones (none in these families)."""
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a zero-initialised one for `num_classes` (0: no head, pre-logits out); `global_pool`
        'avg' or '' (tokens / maps out, the head applied to each)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            self.global_pool = self.config["global_pool"] = check_global_pool(global_pool)
        like = next(self.parameters())
        self.head = zero_head(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        self.num_classes = self.config["num_classes"] = num_classes

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on the tokens: `norm` (through `_apply_norm`), unless a family keeps it under its authors'
        name (sMLPNet's `batch_norm`, SPACH's `norm2`; it then overrides this and `_prune_final_norm`)."""
        return self._apply_norm(self.norm, x)

    def _prune_final_norm(self) -> None:
        self.norm = nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, *self.accepts)

    def _checkpointing(self) -> bool:
        """Whether blocks are recomputed in the backward pass now (never in TorchScript, which cannot)."""
        return self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

    @torch.jit.unused
    def _run_checkpointed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) recomputed in the backward pass, block by block in a stage."""
        for block in module if isinstance(module, nn.Sequential) else [module]:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled (or, with global_pool '', per-token) logits from `forward_features`' tokens."""
        if isinstance(x, list):
            raise TypeError(
                "forward_head takes the tokens forward_features returns (a tensor), got a list; a model "
                "built with fork_feat=True gives feature maps and has no head"
            )
        if self.global_pool == "avg":
            x = x.mean(dim=self.token_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The outputs of the blocks (Mixer) or stages (hierarchical families) picked by `indices`, as timm gives
        them: NCHW maps, or tokens in the family's layout ('NLC' for Mixer, 'NHWC' for the others). Returns
        `(forward_features(x), intermediates)`, or only the intermediates with `intermediates_only`."""
        if output_fmt not in ("NCHW", self.token_format):
            raise ValueError(f"output_fmt must be 'NCHW' or {self.token_format!r}, got {output_fmt!r}")
        stages = self._feature_stages()
        take, last = feature_take_indices(len(stages), indices)
        x = self._embed(x)
        intermediates = []
        run = last + 1 if stop_early or intermediates_only else len(stages)
        for index in range(run):
            for module in stages[index]:
                x = self._run_checkpointed(module, x) if self._checkpointing() else module(x)
            if index in take:
                norm_layer = self._intermediate_norm(index) if norm else None
                intermediates.append(
                    self._to_format(x if norm_layer is None else self._apply_norm(norm_layer, x), output_fmt)
                )
        if intermediates_only:
            return intermediates
        return (self._final_norm(x) if run == len(stages) else x), intermediates

    @torch.jit.unused
    def _apply_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A norm on tokens in the family's layout (a family whose norms take NCHW maps, AS-MLP's GroupNorm,
        applies them to a view)."""
        return norm(x)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what no intermediate in `indices` needs (later blocks, optionally the final norm and the head);
        returns the indices to take."""
        take, last = feature_take_indices(len(self._feature_stages()), indices)
        self._truncate(last)
        if prune_norm:
            self._prune_final_norm()
        if prune_head:
            self.reset_classifier(0, "")
        return take


class FeatureNet(nn.Module):
    """`create_model(..., features_only=True)`: the model cut after its last wanted output, whose forward is the
    list of NCHW maps at `out_indices`, described by `feature_info` (channels, reduction, module names)."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None, norm: bool = False):
        super().__init__()
        if not isinstance(model, ModelInterface):
            raise TypeError(f"features_only needs an allmlp model, got {type(model).__name__}")
        if out_indices is None:
            out_indices = len(model.feature_info)
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.model = model
        self.norm = norm
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, norm=self.norm, intermediates_only=True)
