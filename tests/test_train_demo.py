"""The main job, `allmlp train` with no arguments: the demo recipe on the bundled MNIST subset (slow: minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.slow
def test_demo_reaches_98_percent_and_prints_its_run_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "allmlp", "train"], cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"run directory: {run_dir.resolve()}" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_top1"] >= 0.98, summary
    assert summary["skipped_images"] == 0 and summary["model_entry"] == "mixer_s16_224"
    assert summary["model"] == (  # what the demo model is, not the entry it starts from
        "MlpMixer(img_size=28, patch_size=4, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=256, "
        "in_chans=1)"
    )


@pytest.mark.slow
def test_demo_is_deterministic(tmp_path):
    """Same seed, same weights and accuracy (a shortened demo, run twice)."""
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        command = [sys.executable, "-m", "allmlp", "train", "--output", str(out), "train.epochs=1"]
        subprocess.run(command, check=True, capture_output=True, timeout=900)
        results.append((json.loads((out / "summary.json").read_text()), load_file(out / "model.safetensors")))
    (first, w1), (second, w2) = results
    assert first["eval_top1"] == second["eval_top1"]
    assert all((w1[k] == w2[k]).all() for k in w1)
