"""Model names -> (architecture, config, preprocessing, provenance of the published weights); list and create."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..weights import (
    WeightsError,
    checkpoint_entries,
    head_keys,
    load_weights,
    read_config,
    read_pretrained_cfg,
    read_state_dict,
)
from ..weights.hub import fetch_release
from . import activemlp, asmlp, convmlp, gmlp, hiremlp, msmlp, repmlp, resmlp, smlp, spach, swinmlp, wavemlp
from .cyclemlp import CONFIGS as CYCLEMLP_CONFIGS
from .cyclemlp import CycleMLP
from .entries import IN1K, ModelEntry, Preprocessing, WeightRelease, hosted, imagenet_preprocessing
from .interface import FeatureNet
from .mixer import CONFIGS as MIXER_CONFIGS
from .mixer import MlpMixer
from .vip import CONFIGS as VIP_CONFIGS
from .vip import VisionPermutator

MIXER_PAPER = "Tolstikhin et al., MLP-Mixer: An all-MLP Architecture for Vision, NeurIPS 2021 (arXiv 2105.01601)"
OFFICIAL_MIXER_PREPROCESSING = Preprocessing(
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bilinear",
    crop_pct=1.0,
    note="official: pixels to [-1, 1] as (x - 127.5) / 127.5, plain bilinear resize to the input size",
)


def _mixer_releases(label: str, sets: dict[str, tuple[int, str, float | None]]) -> tuple[WeightRelease, ...]:
    return tuple(
        hosted(
            tag,
            f"gs://mixer_models/{tag}/Mixer-{label}.npz",
            classes,
            trained_on,
            top1,
            f"https://storage.googleapis.com/mixer_models/{tag}/Mixer-{label}.npz",
        )
        for tag, (classes, trained_on, top1) in sets.items()
    )


def _timm_copy(name: str, top1: float) -> WeightRelease:
    """timm's Hugging Face copy of the official imagenet1k set (safetensors, timm's names)."""
    return hosted(
        "timm:goog_in21k_ft_in1k",
        f"timm {name}.goog_in21k_ft_in1k (the official imagenet1k set, converted; mislabelled in21k)",
        1000,
        IN1K,
        top1,
        f"https://huggingface.co/timm/{name}.goog_in21k_ft_in1k/resolve/main/model.safetensors",
    )


_SAM = "ImageNet-1k from scratch, SAM optimizer"
_GSAM = "ImageNet-1k from scratch, GSAM optimizer"
_MIXER_RELEASES = {
    "s32": _mixer_releases("S_32", {"gsam": (1000, _GSAM, None)}),
    "s16": _mixer_releases("S_16", {"gsam": (1000, _GSAM, None)}),
    "s8": _mixer_releases("S_8", {"gsam": (1000, _GSAM, None)}),
    "b32": _mixer_releases("B_32", {"sam": (1000, _SAM, None), "gsam": (1000, _GSAM, None)}),
    "b16": _mixer_releases(
        "B_16",
        {
            "imagenet1k": (1000, IN1K, 76.44),
            "imagenet21k": (21843, "ImageNet-21k pre-training (21,843-class head)", None),
            "sam": (1000, _SAM, None),
            "gsam": (1000, _GSAM, None),
        },
    )
    + (_timm_copy("mixer_b16_224", 76.44),),
    "l32": (),
    "l16": _mixer_releases(
        "L_16",
        {
            "imagenet1k": (1000, IN1K, 71.76),
            "imagenet21k": (21843, "ImageNet-21k pre-training (21,843-class head)", None),
        },
    )
    + (_timm_copy("mixer_l16_224", 71.76),),
    "h14": (),
}

REGISTRY: dict[str, ModelEntry] = {
    f"mixer_{variant}_224": ModelEntry(
        name=f"mixer_{variant}_224",
        architecture=MlpMixer,
        config=dict(img_size=224, num_classes=1000, **config),
        preprocessing=OFFICIAL_MIXER_PREPROCESSING,
        releases=_MIXER_RELEASES[variant],
        paper=MIXER_PAPER,
    )
    for variant, config in MIXER_CONFIGS.items()
}

CYCLEMLP_PAPER = "Chen et al., CycleMLP: A MLP-like Architecture for Dense Prediction, ICLR 2022 (arXiv 2107.10224)"
VIP_PAPER = (
    "Hou et al., Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition, TPAMI 2022 "
    "(arXiv 2106.12368)"
)


# The authors' ImageNet-1k checkpoints (training checkpoints: the state dict under "model"), published top-1.
_CYCLEMLP_TOP1 = {"b1": 78.9, "b2": 81.6, "b3": 82.4, "b4": 83.0, "b5": 83.2}
_VIP_RELEASES = {  # Google Drive file ids from the README of houqb/VisionPermutator
    "s7": ("1cX6eauDrsGsLSZnqsX7cl0oiKX8Dzv5z", 81.5, 0.9),
    "m7": ("15y5WMypthpbBFdc01E3mJCZit7q0Yn8m", 82.7, 0.9),
    "l7": ("14F5IXGXmB_3jrwK33Efae-WEb5D_G85c", 83.2, 0.875),
}
REGISTRY.update(
    {
        f"cyclemlp_{variant}": ModelEntry(
            name=f"cyclemlp_{variant}",
            architecture=CycleMLP,
            config=dict(img_size=224, num_classes=1000, **config),
            preprocessing=imagenet_preprocessing(
                0.875, "the authors' evaluation (DeiT's main.py): shorter side to 256, centre crop 224"
            ),
            releases=(
                hosted(
                    "imagenet1k",
                    f"https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1/CycleMLP_{variant.upper()}.pth",
                    1000,
                    IN1K,
                    _CYCLEMLP_TOP1[variant],
                    f"https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1/CycleMLP_{variant.upper()}.pth",
                ),
            ),
            paper=CYCLEMLP_PAPER,
        )
        for variant, config in CYCLEMLP_CONFIGS.items()
    }
)
REGISTRY.update(
    {
        f"vip_{variant}": ModelEntry(
            name=f"vip_{variant}",
            architecture=VisionPermutator,
            config=dict(img_size=224, num_classes=1000, **config),
            preprocessing=imagenet_preprocessing(
                _VIP_RELEASES[variant][2], "the authors' evaluation (timm's validate.py with their default_cfg)"
            ),
            releases=(
                WeightRelease(
                    "imagenet1k",
                    f"https://drive.google.com/file/d/{_VIP_RELEASES[variant][0]}/view (houqb/VisionPermutator README)",
                    1000,
                    IN1K,
                    _VIP_RELEASES[variant][1],
                    # Google Drive answers a program with a confirmation page: a person downloads the file.
                    file_name=f"houqb/VisionPermutator/vip_{variant}.pth",
                    page=f"https://drive.google.com/file/d/{_VIP_RELEASES[variant][0]}/view",
                ),
            ),
            paper=VIP_PAPER,
        )
        for variant, config in VIP_CONFIGS.items()
    }
)

# The families after Mixer, CycleMLP and ViP: each module lists its registry entries as ENTRIES.
FAMILY_MODULES = (resmlp, gmlp, msmlp, convmlp, asmlp, swinmlp, activemlp, repmlp, smlp, spach, wavemlp, hiremlp)
for _family in FAMILY_MODULES:
    REGISTRY.update({entry.name: entry for entry in _family.ENTRIES})

# Architecture name (as `save_weights` records it) -> class, for rebuilding a model from a file.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    entry.architecture.__name__: entry.architecture for entry in REGISTRY.values()
}


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names, sorted, optionally filtered by a shell-style pattern ('mixer_*')."""
    return sorted(name for name in REGISTRY if fnmatch.fnmatch(name, pattern))


def get_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; an unknown name fails with the closest registered names."""
    if name not in REGISTRY:
        by_lower = {registered.lower(): registered for registered in REGISTRY}  # `Mixer_B16_224` -> mixer_b16_224
        close = [by_lower[lower] for lower in difflib.get_close_matches(name.lower(), by_lower, n=5, cutoff=0.5)]
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return REGISTRY[name]


def get_release(name: str, tag: str | None = None) -> WeightRelease:
    """The release `tag` of model `name`; no tag: the entry's first (default) release."""
    entry = get_entry(name)
    if not entry.releases:
        raise ValueError(f"{name} has no published weights")
    if tag is None:
        return entry.releases[0]
    for release in entry.releases:
        if release.tag == tag:
            return release
    raise ValueError(f"{name} has no release {tag!r}; published: {', '.join(r.tag for r in entry.releases)}")


def architecture_names(architecture: type[nn.Module], config: Mapping) -> dict:
    """`config` with timm's argument names (`img_size`, `drop_path_rate`, as create_model and the trainer pass them)
    renamed to the authors' where a family keeps theirs (its `timm_names`, e.g. sMLPNet's `image_size`, `dp_rate`)."""
    renamed = dict(config)
    for timm_name, own in getattr(architecture, "timm_names", {}).items():
        if timm_name in renamed:
            renamed[own] = renamed.pop(timm_name)
    return renamed


def timm_named(architecture: type[nn.Module], config: Mapping) -> dict:
    """The inverse of `architecture_names`: a family's config with timm's names (what the trainer reads)."""
    renamed = dict(config)
    for timm_name, own in getattr(architecture, "timm_names", {}).items():
        if own in renamed:
            renamed[timm_name] = renamed.pop(own)
    return renamed


def _build(architecture: type[nn.Module], config: dict) -> nn.Module:
    config = architecture_names(architecture, config)
    accepted = set(inspect.signature(architecture.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{architecture.__name__} has no option {', '.join(unknown)}; options: {', '.join(sorted(accepted))}"
        )
    return architecture(**config)


def _is_weight_file(name: str | os.PathLike) -> bool:
    return (
        isinstance(name, os.PathLike)
        or Path(name).suffix in {".safetensors", ".npz", ".pth", ".pt", ".bin", ".tar"}
        or os.path.isfile(name)
    )


def create_model(
    name: str | os.PathLike,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    weights: str | os.PathLike | Mapping | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    pretrained: bool | str = False,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered model (or rebuild one from a file written by `save_weights`) and load weights.

    num_classes / img_size / overrides replace the entry's config. With `weights`, a head of another size than
    the checkpoint's is started fresh (zero) when `num_classes` was given, and is an error otherwise.
    `pretrained=True` (the entry's first release) or a release tag loads published weights from the cache,
    downloaded first if needed (allmlp.weights.hub); the head has the release's classes unless `num_classes`.
    `features_only=True` returns the backbone cut after its last wanted output, whose forward gives the NCHW maps
    of the blocks or stages `out_indices` (default: all), described by its `feature_info` (timm's interface).
    device / dtype: the parameters are created on `device` (also "meta": shapes without memory, and then no
    weights) and cast to `dtype`; weights are copied into them there.
    `model.pretrained_cfg` gets the registry entry's name ("architecture") and preprocessing (a file gets those it
    recorded, else keeps the family default).
    """
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained or weights, not both")
    if _is_weight_file(name):
        stored = read_config(name)
        if stored is None:
            raise WeightsError(
                f"{name}: no allmlp config in this file; build the model by name and load it with "
                f"allmlp.load_weights, or convert it with `allmlp convert SRC DST --model NAME`"
            )
        architecture_name, config = stored
        if architecture_name not in ARCHITECTURES:
            raise WeightsError(f"{name}: unknown architecture {architecture_name!r} in the file's metadata")
        architecture = ARCHITECTURES[architecture_name]
        recorded = read_pretrained_cfg(name)
        weights = name if weights is None else weights
    else:
        entry = get_entry(name)
        architecture, config = entry.architecture, dict(entry.config)
        p = entry.preprocessing
        recorded = dict(architecture=entry.name, mean=p.mean, std=p.std, interpolation=p.interpolation,
                        crop_pct=p.crop_pct)  # fmt: skip
    if pretrained:
        release = get_release(os.fspath(name), None if pretrained is True else pretrained)
        weights = fetch_release(release, f"{name}.{release.tag}")
        config["num_classes"] = release.num_classes
    if weights is not None and device is not None and torch.device(device).type == "meta":
        raise ValueError(
            f"device='meta' holds no values, so weights cannot be loaded there; build {name} on meta by registry "
            "name without weights"
        )
    config = dict(config)
    if num_classes is not None:
        config["num_classes"] = num_classes
    if img_size is not None:
        config["img_size"] = img_size
    config.update(overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build(architecture, config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model.pretrained_cfg = {**model.pretrained_cfg, **recorded}  # input_size: the model's own, from its __init__
    if weights is not None:
        reset_head = False
        if num_classes is not None:
            state_dict, _ = read_state_dict(weights, checkpoint_entries(model))
            head = state_dict.get(head_keys(model)[0])
            reset_head = head is not None and head.shape[0] != num_classes
            weights = state_dict
        load_weights(model, weights, reset_head=reset_head)
    return FeatureNet(model, out_indices) if features_only else model
