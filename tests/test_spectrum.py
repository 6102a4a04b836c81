"""allmlp spectrum: the spatial-frequency content and extent of Mixer token-mixing units, per checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import allmlp
from allmlp.cli import main
from allmlp.tools import spectrum


def grid_units() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    return rows, cols


def test_a_constructed_weight_matrix_has_the_spectrum_it_was_built_with():
    rows, cols = grid_units()  # 8 x 8 patch grid: frequencies k / 8 cycles per patch
    units = np.stack(
        [
            np.cos(2 * np.pi * cols / 8),  # 1/8 cycle per patch along the width: low
            np.sin(2 * np.pi * (rows + cols) * 3 / 8),  # (3/8, 3/8): radius 0.53, high
            (-1.0) ** (rows + cols),  # checkerboard: the corner, sqrt(1/2)
            np.ones((8, 8)),  # the mean only: radius 0, and spread over every patch
            np.eye(8)[0][:, None] * np.eye(8)[0][None, :],  # one patch: flat spectrum, extent 1/64
        ]
    )
    stats = spectrum.block_spectrum(units.reshape(5, 64), (8, 8), cutoff=0.25)
    low, extent = np.array(stats["low_frequency_fraction"]), np.array(stats["extent"])
    np.testing.assert_allclose(low[:4], [1.0, 0.0, 0.0, 1.0], atol=1e-12)
    # a single patch has equal power at all 64 frequencies: the share at radius <= 1/4 is the count of those
    within = (spectrum.frequency_radii((8, 8)) <= 0.25).sum()
    assert low[4] == pytest.approx(within / 64) and within == 13
    np.testing.assert_allclose(extent[[3, 4]], [1.0, 1 / 64])
    assert extent[0] == pytest.approx(2 / 3)  # cos²'s mean is 1/2, cos⁴'s 3/8: (1/2)² / (3/8)
    # radial bins: the cosine's energy sits in the bin of 1/8, the checkerboard's in the last (the corner)
    centres = np.array(spectrum.mixer_spectrum(tiny_mixer())["frequencies"])
    single = [spectrum.block_spectrum(u.reshape(1, 64), (8, 8)) for u in units]
    assert np.argmax(single[0]["radial_energy"]) == 1 and single[0]["radial_energy"][1] == pytest.approx(1.0)
    assert single[2]["radial_energy"][-1] == pytest.approx(1.0)
    assert single[3]["radial_energy"][0] == pytest.approx(1.0)
    assert centres[1] == pytest.approx(1 / 8) and centres[-1] >= math.sqrt(0.5) - 1 / 16
    assert sum(stats["radial_energy"]) == pytest.approx(1.0)


@pytest.mark.parametrize("grid", [(7, 7), (8, 8), (4, 6), (14, 14)])
def test_every_radial_bin_holds_a_frequency_of_the_grid(grid):
    which = np.digitize(spectrum.frequency_radii(grid), spectrum.radial_bins(grid)) - 1
    assert set(which.flatten().tolist()) == set(range(len(spectrum.radial_bins(grid)) - 1))


def tiny_mixer(num_blocks: int = 2) -> allmlp.MlpMixer:
    torch.manual_seed(0)
    return allmlp.MlpMixer(
        img_size=32, patch_size=4, in_chans=1, num_classes=3, hidden_dim=8, num_blocks=num_blocks, tokens_mlp_dim=6
    )


def test_the_spectrum_reads_each_blocks_token_mixing_w1():
    model = tiny_mixer()
    rows, cols = grid_units()
    smooth = np.cos(2 * np.pi * cols / 8).reshape(64)
    with torch.no_grad():
        model.blocks[1].mlp_tokens.fc1.weight.copy_(torch.from_numpy(np.tile(smooth, (6, 1))))
    report = spectrum.mixer_spectrum(model)
    assert report["grid"] == [8, 8] and len(report["blocks"]) == 2
    assert report["blocks"][1]["low_frequency_fraction"] == pytest.approx([1.0] * 6)
    # random init is white noise: its shares follow the number of DFT coefficients per bin
    assert report["white_noise_low_frequency_fraction"] == pytest.approx(13 / 64)
    assert np.mean(report["blocks"][0]["low_frequency_fraction"]) == pytest.approx(13 / 64, abs=0.1)
    assert sum(report["white_noise"]) == pytest.approx(1.0)


def test_the_command_writes_a_plot_per_checkpoint(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        allmlp.save_weights(tiny_mixer(), tmp_path / run / "model.safetensors")
    paths = [str(tmp_path / run / "model.safetensors") for run in ("a", "b")]
    assert main(["spectrum", *paths, "--out", str(tmp_path / "out")]) == 0
    for label in ("a_model", "b_model"):
        assert (tmp_path / "out" / f"{label}_spectrum.png").read_bytes()[:4] == b"\x89PNG"
        report = json.loads((tmp_path / "out" / f"{label}_spectrum.json").read_text())
        assert len(report["blocks"]) == 2 and report["cutoff"] == 0.25


def test_spectrum_errors(tmp_path):
    with pytest.raises(ValueError, match="token-mixing spectra exist for MlpMixer models, got CycleMLP"):
        spectrum.mixer_spectrum(allmlp.create_model("cyclemlp_b1", num_classes=0))
    with pytest.raises(ValueError, match=r"cutoff must be a radius in cycles per patch in \[0, 0.707\], got 2.0"):
        spectrum.mixer_spectrum(tiny_mixer(), cutoff=2.0)
