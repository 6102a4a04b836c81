"""Progress where a person waits: a bar on a terminal, plain lines otherwise (eval, embed, predict, fewshot,
export, training), a terminal of width 0 included; eval split over torchrun processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import allmlp
import allmlp.progress as progress
from allmlp.cli import main
from allmlp.train.outputs import RunLog

DEMO_SHAPE = dict(
    img_size=28, in_chans=1, patch_size=7, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


def test_a_terminal_of_width_0_gets_plain_lines(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((0, 24)))
    assert not progress.is_interactive()
    log = RunLog(tmp_path, total_steps=10)
    log.progress(4, loss=0.5, lr=0.01, images_per_s=123.0, eta_s=30.0)
    log.close()
    assert "step 4/10  loss 0.5000" in capsys.readouterr().out
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((100, 24)))
    assert progress.is_interactive()


def test_plain_lines_every_tenth_and_at_the_end(capsys):
    with progress.Progress(1000, "eval val", interactive=False) as bar:
        for _ in range(7):
            bar.update(150)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"eval val: {n}/1000 images ({n / 1000:.0%})" for n in (150, 300, 450, 600, 750, 900, 1050)]
    with progress.Progress(None, "embed", interactive=False) as bar:
        for _ in range(5):
            bar.update(1)
    assert capsys.readouterr().err.splitlines() == [
        "embed: 1 images",
        "embed: 2 images",
        "embed: 4 images",
        "embed: 5 images",
    ]


def test_a_bar_on_a_terminal(capsys):
    with progress.Progress(10, "predict", interactive=True) as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "predict" in err and "4/10" in err and "|" in err  # tqdm's bar


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = allmlp.create_model("mixer_s16_224", num_classes=10, **DEMO_SHAPE)
    with torch.no_grad():
        model.head.weight.normal_()
    return allmlp.save_weights(model, tmp_path / "w.safetensors")


def test_eval_predict_embed_fewshot_and_export_report_progress(tmp_path, weights, capsys):
    assert main(["eval", "--weights", weights, "data.kind=demo", "train.eval_batch_size=250"]) == 0
    assert "eval val: 1000/1000 images (100%)" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    for digit in range(2):
        (tmp_path / "digits" / str(digit)).mkdir(parents=True)
        for i in range(10):
            image = rng.integers(0, 255, size=(28, 28), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "digits" / str(digit) / f"{i}.png")
    digits = str(tmp_path / "digits")
    assert main(["predict", digits, "--weights", weights, "--workers", "0"]) == 0
    assert "predict: 20/20 images (100%)" in capsys.readouterr().err
    assert main(["embed", digits, "--weights", weights, "-o", str(tmp_path / "e.npy"), "--workers", "0"]) == 0
    assert "embed: 20/20 images (100%)" in capsys.readouterr().err
    args = ["fewshot", "--weights", weights, "--data", digits, "--shots", "1", "--seeds", "1", "--no-cache"]
    assert main([*args, "--workers", "0"]) == 0
    assert "fewshot features: 6/6 images (100%)" in capsys.readouterr().err  # 2 shots + every 5th as test images
    assert main(["export", "--weights", weights, "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    assert "export torchscript: 3/3 stages (100%)" in capsys.readouterr().err


EVAL_RUN = """
import sys
from allmlp.cli import main
sys.exit(main(["eval", "--weights", sys.argv[1], "--output", sys.argv[2], "data.kind=demo", "train.threads=1"]))
"""


def test_eval_under_torchrun_splits_the_work_and_writes_once(tmp_path, weights, capsys):
    single = tmp_path / "single"
    assert main(["eval", "--weights", weights, "--output", str(single), "data.kind=demo"]) == 0
    script = tmp_path / "eval_run.py"
    script.write_text(EVAL_RUN)
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*command, str(script), weights, str(two)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results:") == 1 and sorted(p.name for p in two.iterdir()) == ["eval.json"]
    result, alone = (json.loads((folder / "eval.json").read_text()) for folder in (two, single))
    assert result["world_size"] == 2 and result["eval_images"] == 1000  # disjoint halves, counts summed
    assert result["eval_top1"] == alone["eval_top1"] and result["per_class_top1"] == alone["per_class_top1"]
    assert result["split"] == "val" and result["weights"]["path"] == str(tmp_path / "w.safetensors")
    assert result["weights"]["sha256"] == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert {"eval_top1", "eval_top5", "per_class_top1", "skipped_images", "skipped_files"} <= set(result)
