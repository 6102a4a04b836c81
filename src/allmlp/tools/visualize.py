"""Pictures of a model: token-mixing units on the patch grid (paper Fig. 5), stem filters, training curves.

A token-mixing unit is one row of a block's W1 (fc1 weight): one weight per incoming patch, so it is an image on
the patch grid. Units are drawn blue (negative) - white - red (positive), each scaled by its own largest
magnitude, and sorted by spatial frequency (the paper pairs and sorts them by frequency) so that the smooth
units come first and the oscillating ones last. Stem filters are drawn as RGB tiles around mid-grey.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..atomic import atomic_path
from ..models.mixer import MlpMixer


def token_mixing_units(model: MlpMixer, block: int) -> torch.Tensor:
    """(D_S, grid_h, grid_w): the rows of block `block`'s token-mixing W1 on the patch grid, sorted by frequency."""
    if not isinstance(model, MlpMixer):
        raise ValueError(f"token-mixing units exist in MlpMixer models, got {type(model).__name__}")
    if not 0 <= block < len(model.blocks):
        raise ValueError(f"block must be in [0, {len(model.blocks)}), got {block}")
    units = model.blocks[block].mlp_tokens.fc1.weight.detach().float().cpu().reshape(-1, *model.grid_size)
    return units[_by_frequency(units)]


def _by_frequency(units: torch.Tensor) -> torch.Tensor:
    """Order of the units by spatial frequency, measured as the mean squared difference between neighbouring
    weights over the unit's variance (for a sinusoid this grows with its frequency; no wrap-around as in an FFT)."""
    rows = (units[:, 1:, :] - units[:, :-1, :]).pow(2).flatten(1).sum(1)
    cols = (units[:, :, 1:] - units[:, :, :-1]).pow(2).flatten(1).sum(1)
    pairs = units[0, 1:, :].numel() + units[0, :, 1:].numel()
    variance = units.flatten(1).var(dim=1, correction=0)
    return torch.argsort((rows + cols) / pairs / variance.clamp_min(1e-20), stable=True)


def stem_filters(model: nn.Module) -> torch.Tensor:
    """(C, kh, kw, in_chans) filters of the patch embedding: the model's first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no convolutional stem to draw")
    return conv.weight.detach().float().cpu().permute(0, 2, 3, 1)


def diverging_colors(values: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> RGB in [0, 1]: blue for negative, white for zero, red for positive."""
    positive, negative = np.clip(values, 0, 1), np.clip(-values, 0, 1)
    return np.stack([1 - negative, 1 - positive - negative, 1 - positive], axis=-1).clip(0, 1)


def tile(images: np.ndarray, scale: int = 1, gap: int = 1, columns: int | None = None) -> Image.Image:
    """(N, H, W, 3) floats in [0, 1] -> one RGB image: a grid of `columns` (default ceil(sqrt N)) tiles,
    each enlarged `scale` times (nearest neighbour), `gap` white pixels between and around them."""
    count, height, width = images.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    tile_h, tile_w = height * scale, width * scale
    canvas = np.ones((rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3))
    for i, image in enumerate(images):
        top, left = gap + (i // columns) * (tile_h + gap), gap + (i % columns) * (tile_w + gap)
        canvas[top : top + tile_h, left : left + tile_w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray((canvas * 255).round().astype(np.uint8))


def _scale_for(height: int, width: int) -> int:
    """Enlarge small tiles (a 7 x 7 patch grid, a 4 x 4 filter) to about 28 pixels so the picture can be read."""
    return max(1, 28 // max(height, width))


def draw_token_mixing(model: MlpMixer, block: int) -> Image.Image:
    units = token_mixing_units(model, block)
    peak = units.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return tile(diverging_colors((units / peak).numpy()), scale=_scale_for(*units.shape[1:]))


def draw_stem(model: nn.Module) -> Image.Image:
    filters = stem_filters(model)
    peak = filters.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    rgb = (0.5 + 0.5 * filters / peak).numpy()
    if rgb.shape[-1] != 3:  # grey (1 channel) or other channel counts: draw the channel mean as grey
        rgb = rgb.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    return tile(rgb, scale=_scale_for(*rgb.shape[1:3]))


# panel title -> (metrics.jsonl key, legend label) drawn in it
CURVES = {
    "training loss": [("loss", "loss")],
    "learning rate": [("lr", "lr")],
    "eval accuracy": [("eval_top1", "top-1"), ("eval_top5", "top-5"), ("ema_eval_top1", "EMA top-1")],
}


def read_run_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl, read as the trainer reads them (a line cut short by a kill is skipped)."""
    from ..train.outputs import METRICS_FILE, read_metrics

    if not (Path(run_dir) / METRICS_FILE).is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE} (expected a run directory written by `allmlp train`)")
    return read_metrics(Path(run_dir))


def draw_curves(records: Sequence[dict], out: str | os.PathLike) -> Path:
    """One panel per kind of metric present (training loss, learning rate, eval accuracy) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = []
    for title, series in CURVES.items():
        lines = [(label, [(r["step"], r[key]) for r in records if r.get(key) is not None]) for key, label in series]
        lines = [(label, points) for label, points in lines if points]
        if lines:
            panels.append((title, lines))
    if not panels:
        raise ValueError(f"the run's metrics have no step with any of {[k for s in CURVES.values() for k, _ in s]}")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for label, points in lines:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
        if len(lines) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def visualize(
    model: nn.Module,
    out_dir: str | os.PathLike,
    blocks: Sequence[int] | None = None,
    run_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the pictures to `out_dir`; returns the files written.

    token_mixing_block{i}.png for each of `blocks` (MlpMixer only; default: the first block), stem_filters.png,
    and training_curves.png from `run_dir`/metrics.jsonl.
    """
    # everything is checked and drawn before the first file is written: a bad argument leaves nothing behind
    if not isinstance(model, MlpMixer) and blocks:
        raise ValueError(f"token-mixing units exist in MlpMixer models, not in {type(model).__name__}")
    if isinstance(model, MlpMixer):
        blocks = (0,) if blocks is None else blocks
        wrong = [block for block in blocks if not 0 <= block < len(model.blocks)]
        if wrong:
            raise ValueError(
                f"--blocks {' '.join(map(str, wrong))}: this model has {len(model.blocks)} blocks, "
                f"numbered 0 to {len(model.blocks) - 1}"
            )
    out_dir = Path(out_dir)
    pictures = {f"token_mixing_block{block}.png": draw_token_mixing(model, block) for block in blocks or ()}
    pictures["stem_filters.png"] = draw_stem(model)
    records = read_run_metrics(run_dir) if run_dir is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in pictures.items():
        with atomic_path(out_dir / name) as tmp:
            image.save(tmp, format="PNG")
        written.append(out_dir / name)
    if records is not None:
        written.append(draw_curves(records, out_dir / "training_curves.png"))
    return written
