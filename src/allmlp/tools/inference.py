"""Running a trained model over image files: shared by `predict`, `embed` and `fewshot`.

The model comes from its weight file (an allmlp safetensors file carries its config; other formats are built
by registry name), the pixels are prepared with the preprocessing of the weights' registry entry, and a file
that cannot be read is reported by index instead of stopping the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import IMAGE_EXTENSIONS, UNREADABLE_ERRORS, read_image
from ..data.transforms import build_eval_transform
from ..models.layers import to_pair
from ..models.registry import create_model, get_entry, list_models, timm_named
from ..progress import Progress
from ..weights import read_config
from .convert import model_for_weights


def resolve_device(device: str | None) -> str:
    """The device asked for, or the first GPU when there is one, else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} (expected e.g. cpu, cuda, cuda:1, mps): {err}") from err
    return device


def load_model(weights: str | os.PathLike, model_name: str | None = None) -> nn.Module:
    """The model that `weights` were saved from, with them loaded, in eval mode.

    An allmlp safetensors file is rebuilt from its own config (so a model trained at another size or class count
    needs no flags); other formats are built from the registry entry `model_name`, or inferred where possible.
    """
    stored = read_config(weights)
    if stored is not None:
        architecture, _ = stored
        if model_name is not None and get_entry(model_name).architecture.__name__ != architecture:
            raise ValueError(
                f"{weights} holds a {architecture}, but --model {model_name} is a "
                f"{get_entry(model_name).architecture.__name__}"
            )
        return create_model(weights).eval()
    return model_for_weights(weights, model_name).eval()


def entry_name(model: nn.Module, model_name: str | None) -> str:
    """The registry entry whose preprocessing the model's inputs get: `model_name`, or for a model rebuilt from an
    allmlp file alone, the first entry of its architecture (every entry of a family preprocesses alike)."""
    if model_name is not None:
        return model_name
    architecture = type(model).__name__
    return next(name for name in list_models() if get_entry(name).architecture.__name__ == architecture)


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) the model takes; families without a fixed size are evaluated at 224, as their papers do."""
    return to_pair(timm_named(type(model), model.config).get("img_size", 224), "img_size")


def eval_transform(model: nn.Module, model_name: str | None, preset: str | None = None) -> Callable:
    """PIL image -> model input, with the preprocessing of the registry entry `model_name` (see `entry_name`).

    The default preset follows the entry: a plain resize where it has crop_pct 1 (official Mixer evaluation),
    shorter side to size / crop_pct and a centre crop otherwise.
    """
    preprocessing = get_entry(entry_name(model, model_name)).preprocessing
    if preset is None:
        preset = "resize" if preprocessing.crop_pct >= 1.0 else "resmall_crop"
    in_chans = model.config.get("in_chans", 3)
    return build_eval_transform(preprocessing, input_size(model), preset, in_chans=in_chans)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, plus every image file under each directory (recursively, sorted).

    A named file is kept even if it does not exist or is no image: reading it reports the problem in its place.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(item)
    if not found:
        raise ValueError(
            f"no image files found in {', '.join(map(str, inputs))} (suffixes: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return found


class _ReadImages(Dataset):
    """(index, pixels, None) per readable image, (index, None, reason) for one that cannot be read."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable, in_chans: int):
        self.paths, self.transform, self.in_chans = list(paths), transform, in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            pixels = self.transform(read_image(self.paths[index], self.in_chans))
        except UNREADABLE_ERRORS as err:  # missing, truncated, not an image at all
            return index, None, f"{type(err).__name__}: {err}"
        return index, pixels, None


@dataclass
class ImageOutputs:
    outputs: torch.Tensor  # (number read, D) float32 on the CPU
    indices: list[int]  # position in the input list of each row of `outputs`
    failures: dict[int, str]  # position in the input list -> why it could not be read


def _keep_as_list(items: list) -> list:
    return items


@torch.no_grad()
def forward_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    transform: Callable,
    *,
    pre_logits: bool,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    desc: str = "images",
) -> ImageOutputs:
    """Logits (or pre-logits) of every readable image in `paths`, batched; the model is put in eval mode.

    num_workers: image-decoding processes; default min(4, CPU count), 0 decodes in this process.
    desc: the label of the progress shown on stderr (a bar on a terminal, a line every tenth otherwise).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    model.eval()
    dtype = next(model.parameters()).dtype
    images = _ReadImages(paths, transform, model.config.get("in_chans", 3))
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_as_list)
    outputs, indices, failures = [], [], {}
    with Progress(len(images), desc) as progress:
        for batch in loader:
            progress.update(len(batch))
            failures.update({index: reason for index, pixels, reason in batch if pixels is None})
            good = [(index, pixels) for index, pixels, _ in batch if pixels is not None]
            if not good:
                continue
            x = torch.stack([pixels for _, pixels in good]).to(device=device, dtype=dtype)
            out = model.forward_head(model.forward_features(x), pre_logits=pre_logits)
            outputs.append(out.float().cpu())
            indices.extend(index for index, _ in good)
    width = outputs[0].shape[1] if outputs else 0
    return ImageOutputs(torch.cat(outputs) if outputs else torch.empty(0, width), indices, failures)
