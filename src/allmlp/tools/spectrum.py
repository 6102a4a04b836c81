"""Where the energy of a Mixer's token-mixing units sits: spatial frequency and spatial extent on the patch grid.

A token-mixing unit is one row of a block's W1 (`mlp_tokens.fc1.weight`), a weight per patch, hence an image on
the patch grid (`visualize.py` draws them). For each unit this module measures
- its power spectrum: |DFT|² of the unit on the grid (read as periodic), binned by the radius of the spatial
  frequency in cycles per patch (0 at the mean, 1/2 at the Nyquist limit along an axis);
- its low-frequency fraction: the share of its energy (sum of squares, by Parseval) at radii <= `cutoff`;
- its spatial extent: the participation ratio (Σ w²)² / (S Σ w⁴), the fraction of the S patches its energy
  effectively spreads over (1/S for a single patch, 1 for equal weights everywhere).
The paper (Section 3.4, Figure 5) observes that early blocks hold smooth units, some global and some on small
regions, and later blocks less clear ones: per block, these numbers check that on any checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_bytes_atomic
from ..models.mixer import MlpMixer

DEFAULT_CUTOFF = 0.25  # cycles per patch: periods of 4 patches or more count as low frequencies


def frequency_radii(grid: tuple[int, int]) -> np.ndarray:
    """(H, W) radius of each DFT coefficient's spatial frequency, in cycles per patch (aliases folded to <= 1/2)."""
    fy = np.abs(np.fft.fftfreq(grid[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(grid[1]))[None, :]
    return np.sqrt(fy**2 + fx**2)


def radial_bins(grid: tuple[int, int]) -> np.ndarray:
    """Bin edges over the radius: bins one frequency step of the larger grid side wide, centred on its multiples,
    up to the largest radius the grid has."""
    step = 1.0 / max(grid)
    count = math.floor(frequency_radii(grid).max() / step + 0.5) + 1
    return (np.arange(count + 1) - 0.5) * step


def unit_spectra(units: np.ndarray) -> np.ndarray:
    """(N, H, W) units -> (N, H, W) power |DFT|², normalised so that each unit's powers sum to its Σ w²."""
    power = np.abs(np.fft.fft2(units, axes=(1, 2))) ** 2
    return power / (units.shape[1] * units.shape[2])


def block_spectrum(weight: np.ndarray, grid: tuple[int, int], cutoff: float = DEFAULT_CUTOFF) -> dict:
    """Spectrum statistics of one block's token-mixing W1 (D_S, H*W), each unit normalised to unit energy."""
    units = weight.reshape(-1, *grid).astype(np.float64)
    energy = (units**2).sum(axis=(1, 2))
    units = units[energy > 0] / np.sqrt(energy[energy > 0])[:, None, None]
    power = unit_spectra(units)
    radii = frequency_radii(grid)
    edges = radial_bins(grid)
    which = np.digitize(radii, edges) - 1
    radial = np.stack([power[:, which == b].sum(axis=1) for b in range(len(edges) - 1)], axis=1)
    low = power[:, radii <= cutoff + 1e-12].sum(axis=1)
    squares = units.reshape(len(units), -1) ** 2
    extent = 1.0 / (squares.shape[1] * (squares**2).sum(axis=1))  # Σ w² = 1
    return {
        "units": len(units),
        "radial_energy": radial.mean(axis=0).tolist(),  # mean over units; sums to 1
        "low_frequency_fraction": low.tolist(),
        "extent": extent.tolist(),
    }


def mixer_spectrum(model: MlpMixer, cutoff: float = DEFAULT_CUTOFF) -> dict:
    """block_spectrum of every block of a Mixer, with the bin centres (cycles per patch)."""
    if not isinstance(model, MlpMixer):
        raise ValueError(f"token-mixing spectra exist for MlpMixer models, got {type(model).__name__}")
    if not 0.0 <= cutoff <= math.sqrt(0.5):
        raise ValueError(f"cutoff must be a radius in cycles per patch in [0, {math.sqrt(0.5):.3f}], got {cutoff}")
    grid = tuple(model.grid_size)
    edges = radial_bins(grid)
    blocks = [
        block_spectrum(block.mlp_tokens.fc1.weight.detach().float().cpu().numpy(), grid, cutoff)
        for block in model.blocks
    ]
    which = np.digitize(frequency_radii(grid), edges) - 1
    return {
        "grid": list(grid),
        "cutoff": cutoff,
        "frequencies": ((edges[:-1] + edges[1:]) / 2).tolist(),
        # what units of independent random weights (a fresh initialisation) would show: a share per coefficient
        "white_noise": (np.bincount(which.flatten(), minlength=len(edges) - 1) / which.size).tolist(),
        "white_noise_low_frequency_fraction": float((frequency_radii(grid) <= cutoff + 1e-12).mean()),
        "blocks": blocks,
    }


def draw_spectrum(report: dict, out: str | os.PathLike, title: str = "") -> Path:
    """Left: mean radial energy spectrum per block. Right: per block, median (and quartiles) over units of the
    low-frequency fraction and of the spatial extent."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    blocks = report["blocks"]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(blocks)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for i, (block, color) in enumerate(zip(blocks, colors, strict=True)):
        left.plot(report["frequencies"], block["radial_energy"], color=color, marker="o", markersize=2.5, label=str(i))
    left.plot(report["frequencies"], report["white_noise"], color="grey", linestyle="--", label="white noise")
    left.axvline(report["cutoff"], color="grey", linestyle=":", linewidth=1)
    left.set_xlabel("spatial frequency (cycles per patch)")
    left.set_ylabel("share of a unit's energy")
    left.set_title("token-mixing spectrum by block", fontsize=9)
    left.legend(title="block", fontsize=6, title_fontsize=7, ncol=2)
    right.axhline(
        report["white_noise_low_frequency_fraction"],
        color="#4c72b0",
        linestyle="--",
        linewidth=1,
        label="white noise, energy at low frequencies",
    )
    positions = np.arange(len(blocks))
    for key, label, color in (
        ("low_frequency_fraction", f"energy at <= {report['cutoff']:g} cycles/patch", "#4c72b0"),
        ("extent", "spatial extent (share of patches)", "#c44e52"),
    ):
        q25, q50, q75 = np.percentile([b[key] for b in blocks], [25, 50, 75], axis=1)
        right.plot(positions, q50, color=color, marker="o", markersize=3, label=label)
        right.fill_between(positions, q25, q75, color=color, alpha=0.2)
    right.set_xticks(positions)
    right.set_xlabel("block")
    right.set_ylim(0, 1)
    right.set_title("per block: median and quartiles over units", fontsize=9)
    right.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)
    return Path(out)


def spectrum_command(
    weights: list[str | os.PathLike], out_dir: str | os.PathLike, model_name: str | None, cutoff: float
) -> list[Path]:
    """For each checkpoint: LABEL_spectrum.png and LABEL_spectrum.json in out_dir (LABEL: the file's stem, with
    its folder's name in front when stems repeat, as for runs/*/model.safetensors)."""
    from .inference import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(w) for w in weights]
    stems = [p.stem for p in paths]
    written = []
    for path in paths:
        label = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}_{path.stem}"
        report = mixer_spectrum(load_model(path, model_name), cutoff)
        report["weights"] = str(path)
        write_bytes_atomic(out_dir / f"{label}_spectrum.json", (json.dumps(report) + "\n").encode())
        written.append(out_dir / f"{label}_spectrum.json")
        written.append(
            draw_spectrum(report, out_dir / f"{label}_spectrum.png", f"{label}: {len(report['blocks'])} blocks")
        )
    return written
