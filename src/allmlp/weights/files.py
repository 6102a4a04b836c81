"""Reading weight files safely, whatever their format, and writing ours atomically.

The format is detected from the content, not the file name: safetensors (ours and timm's), PyTorch
checkpoints (zip or legacy pickle; loaded with `weights_only=True`, so a pickle carrying code is refused
before anything runs) and NumPy `.npz` archives (the official JAX releases; `allow_pickle=False`).

Some authors' releases pickle their training configuration beside the tensors. Exactly those types are allowed
(`PICKLED_CONFIGS`), and only as inert data: torch's weights-only unpickler builds them without running any
of their code. Any other type is refused, with its name in the message.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers ("header too large")
# what torch appends to a refused pickle: advice to load it unsafely, which allmlp never does
_TORCH_ADVICE = ("weights_only", "re-running", "check the documentation", "in pytorch 2.6", "https://")


def torch_reason(err: BaseException) -> str:
    """torch.load's error without its advice to pass weights_only=False or to allow the type (allmlp does neither):
    the type that was refused, by name, or what else went wrong."""
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    if refused:
        allowed = ", ".join(
            f"{t.__module__}.{t.__qualname__}" if isinstance(t, type) else t[1] for t in PICKLED_CONFIGS
        )
        return f"it pickles {refused[1]}, which is not among the types allowed beside tensors ({allowed})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if not any(advice in line.lower() for advice in _TORCH_ADVICE)]
    return "; ".join(kept) if kept else type(err).__name__


# The configuration objects the authors' releases pickle beside their weights, allowed as data only:
# DeiT-style training checkpoints (Hire-MLP, ActiveMLP) carry their command line as an argparse.Namespace (built
# as an empty Namespace whose attributes are then set); Swin-style ones (AS-MLP) carry a yacs CfgNode, a dict
# subclass, read here as the plain OrderedDict of its entries (yacs need not be installed, none of its code runs).
PICKLED_CONFIGS = [argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode")]
# Where a training checkpoint keeps the weights, in the order tried (a model class may set its own order as
# `checkpoint_entries`, e.g. the EMA weights first where those are the ones the authors evaluate).
CHECKPOINT_ENTRIES = ("model", "state_dict", "model_ema", "module")


class WeightsError(ValueError):
    """A weight file or state dict that cannot be used as asked; the message says what and why."""


def detect_format(path: str | os.PathLike) -> str:
    """'safetensors', 'torch' or 'npz', from the first bytes of the file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as err:
            raise WeightsError(f"{path}: looks like a zip archive but cannot be read ({err})") from err
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        if any(name.endswith("data.pkl") for name in names):
            return "torch"
        raise WeightsError(f"{path}: zip archive that is neither an .npz nor a PyTorch checkpoint")
    if len(head) == 9 and head[8:9] == b"{":
        header = struct.unpack("<Q", head[:8])[0]
        if header + 8 > size:
            raise WeightsError(
                f"{path}: safetensors file whose header claims {header:,} bytes, but the file has {size:,}: "
                "truncated or damaged"
            )
        if header > SAFETENSORS_MAX_HEADER:
            raise WeightsError(
                f"{path}: safetensors header of {header:,} bytes, more than the {SAFETENSORS_MAX_HEADER:,} the "
                "safetensors library reads (a header of metadata this large is damaged or hostile)"
            )
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch"
    raise WeightsError(
        f"{path}: unrecognised weight file (expected safetensors, a PyTorch .pth/.bin checkpoint or an "
        f"official .npz archive; first bytes {head[:8]!r})"
    )


def read_weights(
    path: str | os.PathLike, entries: Sequence[str] = CHECKPOINT_ENTRIES
) -> tuple[dict[str, torch.Tensor | np.ndarray], dict[str, str]]:
    """(arrays by key, metadata) from a weight file. Arrays are tensors, or NumPy arrays for .npz files.
    A training checkpoint's weights are taken from the first of `entries` it has."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    kind = detect_format(path)
    try:
        if kind == "safetensors":
            with safe_open(path, framework="pt") as f:
                return _strip_wrapper_prefix({key: f.get_tensor(key) for key in f.keys()}), dict(f.metadata() or {})
        if kind == "npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}, {}
        with torch.serialization.safe_globals(PICKLED_CONFIGS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return _unwrap(checkpoint, path, entries), {}
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if kind == "npz" and "allow_pickle" in reason:
            reason = "it holds pickled object arrays, which are never loaded"
        elif kind == "torch" and "weights_only" in str(err).lower():
            reason = f"it holds pickled objects other than tensors, which are never unpickled ({torch_reason(err)})"
        raise WeightsError(f"{path}: cannot read {kind} weights: {reason}") from err
    except Exception as err:  # pickle.UnpicklingError and friends from a hostile or corrupt pickle
        raise WeightsError(
            f"{path}: refused to load {kind} checkpoint: it holds pickled objects other than tensors, which are "
            f"never unpickled ({torch_reason(err)})"
        ) from err


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file without reading its tensors; {} for other formats."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if detect_format(path) != "safetensors":
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise WeightsError(f"{path}: cannot read safetensors header: {err}") from err


def _unwrap(obj: object, origin: object, entries: Sequence[str] = CHECKPOINT_ENTRIES) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: bare, or under the first of `entries` (as trainers save) it has."""
    for key in entries:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{origin}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{origin}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return _strip_wrapper_prefix(tensors)


def _strip_wrapper_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DistributedDataParallel and torch.compile put a prefix in front of every name."""
    for prefix in ("module.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def unwrap_state_dict(obj: object, entries: Sequence[str] = CHECKPOINT_ENTRIES) -> dict[str, torch.Tensor]:
    return _unwrap(obj, "state dict", entries)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write atomically (see allmlp.atomic): an old file at `path` stays intact if anything fails.

    A module shared by several parents (SPACH's shared spatial MLP) lists its tensors under each name, as the
    authors' state dicts do; each name gets its own copy, which safetensors requires."""
    stored, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().contiguous().cpu()
        storage = value.untyped_storage().data_ptr()
        stored[key] = value.clone() if storage in storages and value.numel() else value
        storages.add(storage)
    with atomic_path(path) as tmp:
        save_file(stored, tmp, metadata=metadata)


# The pretrained_cfg fields a file keeps: the registry entry's name and how its images are to be prepared.
RECORDED_PRETRAINED_FIELDS = ("architecture", "mean", "std", "interpolation", "crop_pct")


def config_metadata(architecture: str, config: dict, pretrained_cfg: dict) -> dict[str, str]:
    metadata = {"format": "pt", "allmlp.architecture": architecture, "allmlp.config": json.dumps(config)}
    recorded = {k: pretrained_cfg[k] for k in RECORDED_PRETRAINED_FIELDS if k in pretrained_cfg}
    if recorded:
        metadata["allmlp.pretrained_cfg"] = json.dumps(recorded)
    return metadata


def parse_pretrained_metadata(metadata: dict[str, str]) -> dict:
    """The pretrained_cfg fields stored by `save_weights` ({} for files without them; mean/std as tuples)."""
    if "allmlp.pretrained_cfg" not in metadata:
        return {}
    try:
        recorded = json.loads(metadata["allmlp.pretrained_cfg"])
    except json.JSONDecodeError as err:
        raise WeightsError(f"allmlp metadata is damaged: {err}") from err
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}


def parse_config_metadata(metadata: dict[str, str]) -> tuple[str, dict] | None:
    """(architecture, config) stored by `save_weights`, or None for a file that allmlp did not write."""
    if "allmlp.architecture" not in metadata:
        return None
    try:
        return metadata["allmlp.architecture"], json.loads(metadata["allmlp.config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise WeightsError(f"allmlp metadata is damaged: {err}") from err
