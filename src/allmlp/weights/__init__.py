"""Weights in every published format, loaded strictly into allmlp models; allmlp's own format is safetensors.

`load_weights` detects the format from the content: allmlp safetensors (config in the metadata), timm state
dicts (.pth/.bin/.safetensors, bare or wrapped), the official JAX Mixer .npz releases, the authors' checkpoints
of every family (their module names are allmlp's; CycleMLP's offsets and Wave-MLP's thop counters are checked or
dropped) and timm's ResMLP files (renamed to FB's names). Names that differ from allmlp's are converted by the
module for that format.
Every format then meets the model in `load_weights`, which is also where a 3-channel (RGB) stem is adapted to a
model built for another number of input channels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .authors import drop_cycle_offsets, has_cycle_offsets
from .files import (
    CHECKPOINT_ENTRIES,
    WeightsError,
    config_metadata,
    parse_config_metadata,
    parse_pretrained_metadata,
    read_metadata,
    read_weights,
    unwrap_state_dict,
    write_safetensors,
)
from .jax_mixer import convert_jax_mixer, is_jax_mixer
from .timm_families import convert_timm_resmlp, is_timm_resmlp
from .wavemlp import drop_thop_counters, has_thop_counters

__all__ = [
    "WeightsError",
    "adapt_stem",
    "checkpoint_entries",
    "head_keys",
    "load_weights",
    "read_class_names",
    "read_state_dict",
    "save_weights",
]

log = logging.getLogger(__name__)
CLASS_NAMES_KEY = "allmlp.class_names"

# (detect by key names, convert to allmlp names) for each foreign naming scheme.
FOREIGN_FORMATS: list[tuple[Callable[[list[str]], bool], Callable[[dict], dict[str, torch.Tensor]]]] = [
    (is_jax_mixer, convert_jax_mixer),
    (has_cycle_offsets, drop_cycle_offsets),
    (is_timm_resmlp, convert_timm_resmlp),
    (has_thop_counters, drop_thop_counters),
]


def head_keys(model: nn.Module) -> tuple[str, str]:
    """The classifier's weight and bias keys: `head.*`, or where the model's pretrained_cfg names another module
    (a family that keeps its authors' name, e.g. sMLPNet's `mlp_head.0`)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    return f"{classifier}.weight", f"{classifier}.bias"


_LISTED = 20  # keys shown per category in an error; the count says how many more


def read_state_dict(
    source: str | os.PathLike | Mapping, entries: Sequence[str] = CHECKPOINT_ENTRIES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in allmlp names, file metadata) from a path or an in-memory (possibly wrapped) state dict; a
    training checkpoint's weights come from the first of `entries` it holds."""
    if isinstance(source, Mapping):
        arrays, metadata = dict(source), {}
        if not any(isinstance(v, np.ndarray) for v in arrays.values()):
            arrays = unwrap_state_dict(arrays, entries)
    elif isinstance(source, (str, os.PathLike)):
        arrays, metadata = read_weights(source, entries)
    else:
        raise WeightsError(f"weights source must be a path or a state dict, got {type(source).__name__}")
    for detect, convert in FOREIGN_FORMATS:
        if detect(list(arrays)):
            return convert(arrays), metadata
    if not all(isinstance(v, torch.Tensor) for v in arrays.values()):
        raise WeightsError("NumPy arrays given, but their names match no known format (official Mixer .npz)")
    return arrays, metadata


def checkpoint_entries(model: nn.Module) -> Sequence[str]:
    """Where a training checkpoint keeps the weights for `model`, in the order tried: its family's
    `checkpoint_entries` (the EMA weights first where the authors evaluate those), else the usual order."""
    return getattr(model, "checkpoint_entries", CHECKPOINT_ENTRIES)


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The filters of a 3-channel (RGB) stem convolution (O, 3, kh, kw) for `in_chans` input channels, as timm
    adapts them: summed over RGB for one channel (a grey image x gives what the RGB stem gives for (x, x, x)), else
    the RGB filters repeated cyclically to in_chans and scaled by 3 / in_chans (keeping the output's scale)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise WeightsError(f"only a 3-channel stem (O, 3, kh, kw) can be adapted, got {tuple(weight.shape)}")
    if in_chans < 1:
        raise WeightsError(f"in_chans must be >= 1, got {in_chans}")
    if in_chans == 3:
        return weight
    # summed in float32: half-precision checkpoints would lose digits in the sum
    rgb = weight.float()
    if in_chans == 1:
        adapted = rgb.sum(dim=1, keepdim=True)
    else:
        adapted = rgb.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return adapted.to(weight.dtype)


def _stem_key(model: nn.Module) -> str | None:
    """The stem convolution's weight key, from the model's pretrained_cfg (None for a model without one)."""
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    return None if first_conv is None else f"{first_conv}.weight"


def _adapt_stem_channels(
    model: nn.Module, state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state_dict` with its RGB stem adapted when `model` (whose state dict is `own`) takes another number of
    input channels. Only the stem's weight is touched (its bias does not depend on the channels); any other
    difference (filter count, kernel size, a non-RGB checkpoint) is left for the shape check to report.
    """
    key = _stem_key(model)
    if key is None or key not in state_dict or key not in own:
        return state_dict
    theirs, mine = state_dict[key], own[key]
    same_filters = theirs.shape[:1] + theirs.shape[2:] == mine.shape[:1] + mine.shape[2:]
    if not same_filters or theirs.shape[1] != 3 or mine.shape[1] == 3:
        return state_dict
    how = "summed" if mine.shape[1] == 1 else f"repeated and scaled by 3/{mine.shape[1]}"
    log.info(f"{key}: the 3-channel (RGB) stem adapted to in_chans={mine.shape[1]} (RGB filters {how})")
    return {**state_dict, key: adapt_stem(theirs, mine.shape[1])}


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:_LISTED]) + more


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping,
    *,
    strict: bool = True,
    reset_head: bool = False,
) -> nn.Module:
    """Load weights of any supported format into `model` and return it.

    strict: missing or unexpected keys are an error (mis-shaped keys always are), listed in one message.
    reset_head: drop the checkpoint's classifier and give the model a fresh zero head (fine-tuning on other
    classes). Without it, a head of another size is an error. A model built with num_classes=0 ignores it.
    A 3-channel stem loads into a model with another `in_chans` (see `adapt_stem`; logged at INFO level).
    """
    state_dict, _ = read_state_dict(source, checkpoint_entries(model))
    own = model.state_dict()
    state_dict = _adapt_stem_channels(model, state_dict, own)
    head = head_keys(model)
    has_head = head[0] in own
    if reset_head or not has_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in head}
    elif head[0] in state_dict and state_dict[head[0]].shape[0] != own[head[0]].shape[0]:
        raise WeightsError(
            f"classifier head: the checkpoint has {state_dict[head[0]].shape[0]} classes, the model "
            f"{own[head[0]].shape[0]}; pass reset_head=True for a fresh zero head, or build the model "
            f"with num_classes={state_dict[head[0]].shape[0]}"
        )

    expected = [k for k in own if not (reset_head and k in head)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        message = f"weights do not fit {type(model).__name__}:"
        for title, items in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if items:
                message += _listing(title, items)
        if any("mlp_tokens" in item for item in mismatched):
            message += (
                "\n  token-mixing shapes depend on the image size: build the model for the checkpoint's size "
                "and use allmlp.adapt_resolution to change it"
            )
        stem = _stem_key(model)
        if stem is not None and any(item.startswith(f"{stem} ") for item in mismatched):
            message += (
                f"\n  {stem}: only a 3-channel (RGB) stem with the model's filter count and kernel size is "
                "adapted to another in_chans"
            )
        raise WeightsError(message)

    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        if reset_head and has_head:
            model.get_classifier().weight.zero_()
            model.get_classifier().bias.zero_()
    return model


def save_weights(model: nn.Module, path: str | os.PathLike, *, class_names: list[str] | None = None) -> str:
    """Write the model's weights as safetensors (atomic) with its architecture, config and the registry entry and
    preprocessing of its pretrained_cfg in the metadata.

    class_names (one per output of the head) travel in the metadata too, so `allmlp predict` can name classes."""
    config = getattr(model, "config", None)
    if config is None:
        raise WeightsError(f"{type(model).__name__} is not an allmlp model (it has no .config to store)")
    # the preprocessing of the model's registry entry travels with the weights (see allmlp.create_model)
    metadata = config_metadata(type(model).__name__, config, getattr(model, "pretrained_cfg", {}))
    if class_names is not None:
        if len(class_names) != getattr(model, "num_classes", len(class_names)):
            raise WeightsError(f"{len(class_names)} class names for a head of {model.num_classes} classes")
        metadata[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    write_safetensors(model.state_dict(), path, metadata)
    return os.fspath(path)


def read_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names stored by `save_weights(..., class_names=...)`, or None."""
    text = read_metadata(path).get(CLASS_NAMES_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: the class names in its metadata are damaged: {err}") from err
    return [str(name) for name in names]


def read_config(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(architecture, config) of a file written by `save_weights`, or None for other files."""
    return parse_config_metadata(read_metadata(path))


def read_pretrained_cfg(path: str | os.PathLike) -> dict:
    """The pretrained_cfg fields (registry entry name, preprocessing) recorded by `save_weights`; {} if none."""
    return parse_pretrained_metadata(read_metadata(path))
