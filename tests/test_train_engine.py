"""The training loop end to end on tiny Mixers and the bundled demo data: outputs, checkpoints, exact resumption
after SIGKILL, non-finite loss, determinism, gradient accumulation, DDP equivalence, EMA, MixUp, corrupt images."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import allmlp
import allmlp.train.engine as engine
from allmlp.cli import main
from allmlp.train import NonFiniteLossError, fit, load_config
from allmlp.train.outputs import RunLog

TINY = {
    "model": {
        "name": "mixer_s16_224",
        "img_size": 28,
        "in_chans": 1,
        "overrides": {"patch_size": 7, "hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 32},
    },
    "data": {"kind": "demo", "num_workers": 0},
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 2},
    "train": {"steps": 6, "batch_size": 50, "eval_batch_size": 500, "precision": "fp32", "threads": 1, "log_every": 2},
}


def tiny(tmp_path: Path, *overrides: str, name: str = "tiny.yaml") -> Path:
    """A tiny recipe file (1-block Mixer on the demo set) with dotted overrides applied; returns its path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_config(str(path), list(overrides))
    from allmlp.train.config import dump_yaml

    path.write_text(dump_yaml(cfg))
    return path


def run(tmp_path: Path, *overrides: str, out: str = "run", **kwargs) -> tuple[dict, Path]:
    recipe = tiny(tmp_path, *overrides)
    run_dir = tmp_path / out
    return fit(load_config(str(recipe)), run_dir, **kwargs), run_dir


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_run_directory_outputs(tmp_path, capsys):
    assert main(["train", "--config", str(tiny(tmp_path, "train.eval_every=3")), "--output", str(tmp_path / "r")]) == 0
    run_dir = tmp_path / "r"
    out = capsys.readouterr().out
    assert f"run directory: {run_dir.resolve()}" in out
    assert "step 2/6" in out and "img/s" in out and "ETA" in out  # plain progress lines when not a terminal

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["overrides"]["hidden_dim"] == 16

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in train_rows] == [2, 3, 4, 6]  # log_every 2, plus before each evaluation
    assert {"step", "epoch", "lr", "loss", "images_per_s"} <= set(train_rows[0])
    assert [r["step"] for r in eval_rows] == [3, 6]

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_top1", "eval_top5", "best_eval_top1"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["eval_top5"] >= summary["eval_top1"]
    assert summary["best_eval_top1"] == max(r["eval_top1"] for r in eval_rows)
    assert summary["steps"] == 6 and summary["images_seen"] == 300
    assert summary["wall_time_s"] > 0 and summary["skipped_images"] == 0
    assert len(summary["per_class_top1"]) == 10

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("loss", "lr", "accuracy"):
        assert (run_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # final weights and the checkpoint rebuild the model on their own; the state file is weights-only loadable
    model = allmlp.create_model(run_dir / "model.safetensors")
    assert model.num_classes == 10 and model.config["hidden_dim"] == 16
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert checkpoint.name == "step_00000006"
    assert torch.equal(weights(checkpoint / "model.safetensors")["head.weight"], model.head.weight)
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["position"]["step"] == 6 and state["position"]["images_seen"] == 300
    assert state["optimizer"]["state"]  # Adam moments are kept


def test_checkpoints_every_n_steps_keep_last_k(tmp_path):
    _, run_dir = run(tmp_path, "train.steps=9", "checkpoint.every_steps=2", "checkpoint.keep=2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000008", "step_00000009"]


def test_same_seed_same_result_other_seed_differs(tmp_path):
    first, dir1 = run(tmp_path, out="a")
    second, dir2 = run(tmp_path, out="b")
    third, dir3 = run(tmp_path, "train.seed=1", out="c")
    w1, w2, w3 = (weights(d / "model.safetensors") for d in (dir1, dir2, dir3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert first["eval_top1"] == second["eval_top1"]
    assert not torch.equal(w1["stem.proj.weight"], w3["stem.proj.weight"])


KILL_AT_STEP = 13
KILLED_RUN = """
import os, signal, sys, torch
from allmlp.cli import main

calls = 0
step = torch.optim.AdamW.step

def step_then_die(self, *args, **kwargs):  # dies in the middle of optimizer step {kill} (steps 0..{last} done)
    global calls
    calls += 1
    if calls == {kill} + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = step_then_die
sys.exit(main(["train", "--config", sys.argv[1], "--output", sys.argv[2]]))
"""


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    # 4000 demo images / 200 = 20 steps per epoch: killed mid-epoch 0, the resumed run crosses into epoch 1
    overrides = ("train.steps=24", "train.batch_size=200", "checkpoint.every_steps=5", "train.log_every=1")
    recipe = tiny(tmp_path, *overrides)
    _, straight = run(tmp_path, *overrides, out="straight")

    killed = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(kill=KILL_AT_STEP, last=KILL_AT_STEP - 1))
    proc = subprocess.run([sys.executable, str(script), str(recipe), str(killed)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    assert not (killed / "summary.json").exists()

    assert main(["train", "--resume", str(killed)]) == 0
    resumed, expected = weights(killed / "model.safetensors"), weights(straight / "model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["images_seen"] == 24 * 200
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))  # steps 11-13 logged once, not twice


def test_resume_without_checkpoint_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = engine.classification_loss, []

    def loss_nan_at_step_7(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(engine, "classification_loss", loss_nan_at_step_7)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7"):
        run(tmp_path, "train.steps=12", "checkpoint.every_steps=3", "train.log_every=5")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]  # nothing written after the bad step
    good = weights(tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_non_finite_loss_from_the_cli_names_the_step(tmp_path, capsys):
    # an absurd learning rate blows the weights up within a few steps: a clean error, exit status 2
    recipe = tiny(tmp_path, "optim.lr=1e30", "optim.clip_grad_norm=null", "train.steps=20")
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"training loss is (nan|inf) at step \d+", err), err
    # advice that can be followed: no checkpoint exists and --resume takes no overrides, so a new run it is
    run_config = tmp_path / "r" / "config.yaml"
    assert "No checkpoint was written" in err and "--resume repeats the same settings" in err
    assert f"allmlp train --config {run_config} --output NEW_DIR optim.lr=1e+29 optim.clip_grad_norm=1" in err
    assert run_config.is_file()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    _, full = run(tmp_path, "train.batch_size=40", out="full")
    _, accumulated = run(tmp_path, "train.batch_size=40", "train.grad_accum=4", out="accumulated")
    a, b = weights(full / "model.safetensors"), weights(accumulated / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_clipping_bounds_the_update(tmp_path):
    # plain SGD, one step: the update is lr * clipped gradient, whose global norm is at most the clip value
    overrides = ("optim.name=sgd", "optim.momentum=0", "optim.lr=1.0", "optim.weight_decay=0", "train.steps=1")
    overrides += ("schedule.warmup_steps=0",)
    _, clipped = run(tmp_path, *overrides, "optim.clip_grad_norm=0.001", out="clipped")
    _, free = run(tmp_path, *overrides, "optim.clip_grad_norm=null", out="free")
    torch.manual_seed(engine.mix_seed(0, engine._INIT))
    cfg = load_config(str(tiny(tmp_path)))
    start = engine.build_model(cfg, 10).state_dict()

    def update_norm(run_dir):
        after = weights(run_dir / "model.safetensors")
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(after[k] - start[k]) for k in start]))

    assert update_norm(clipped) == pytest.approx(0.001, rel=1e-3)
    assert update_norm(free) > 0.01


DDP_RUN = """
import sys
from allmlp.cli import main
sys.exit(main(["train", "--config", sys.argv[1], "--output", sys.argv[2]]))
"""


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    # SGD: the update is linear in the gradient, so float-rounding differences of the all-reduce stay small
    # (Adam divides by sqrt(v) and turns rounding noise in near-zero gradients into full-size steps)
    overrides = ("train.batch_size=40", "train.grad_accum=2", "train.steps=5", "data.shift_pixels=2")
    overrides += ("checkpoint.every_steps=2",)
    overrides += ("optim.name=sgd", "optim.lr=0.5")
    recipe = tiny(tmp_path, *overrides)
    single, one = run(tmp_path, *overrides, out="one")
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*command, str(script), str(recipe), str(two)], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().count("run directory:") == 1  # rank 0 alone reports and writes
    a, b = weights(one / "model.safetensors"), weights(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    # ranks evaluate disjoint halves of the 1,000 held-out images; the counts are summed
    assert summary["eval_top1"] == pytest.approx(single["eval_top1"], abs=2e-3)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_ema_mixup_sigmoid_channels_last(tmp_path):
    summary, run_dir = run(
        tmp_path,
        "train.ema_decay=0.9",
        "data.mixup_alpha=0.2",
        "data.cutmix_alpha=1.0",
        "train.loss=sigmoid",
        "train.head_bias_init=-2.3",
        "train.label_smoothing=0.1",
        "train.channels_last=true",
        "model.drop_path_rate=0.1",
        "model.drop_rate=0.1",
    )
    assert 0.0 <= summary["ema_eval_top1"] <= 1.0
    model, ema = weights(run_dir / "model.safetensors"), weights(run_dir / "ema.safetensors")
    assert not torch.equal(model["stem.proj.weight"], ema["stem.proj.weight"])
    assert "ema.safetensors" in os.listdir(next((run_dir / "checkpoints").iterdir()))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)


def test_bf16_autocast_default_follows_the_hardware(monkeypatch):
    from allmlp.train import distributed
    from allmlp.train.config import TrainConfig

    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert engine.autocast_dtype(TrainConfig(precision="auto"), cpu) == torch.bfloat16
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert engine.autocast_dtype(TrainConfig(precision="auto"), cpu) == torch.bfloat16
    monkeypatch.setattr(distributed, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert engine.autocast_dtype(TrainConfig(precision="auto"), cpu) is None
    assert engine.autocast_dtype(TrainConfig(precision="bf16"), cpu) == torch.bfloat16
    assert engine.autocast_dtype(TrainConfig(precision="fp32"), cpu) is None


def test_bf16_run(tmp_path):
    summary, _ = run(tmp_path, "train.precision=bf16")
    assert summary["precision"] == "bf16" and 0.0 <= summary["eval_top1"] <= 1.0


def _image_folder(root: Path, corrupt: int) -> None:
    torch.manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for name in ("circle", "square", "stripe"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / "circle" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def _folder_overrides(root: Path, max_bad: float) -> tuple[str, ...]:
    return (
        "data.kind=imagefolder",
        f"data.root={root}",
        f"data.max_bad_fraction={max_bad}",
        "model.img_size=16",
        "model.in_chans=3",
        "model.overrides.patch_size=4",
        "train.batch_size=6",
        "train.steps=6",
    )


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    _image_folder(tmp_path / "images", corrupt=1)
    summary, _ = run(tmp_path, *_folder_overrides(tmp_path / "images", 0.1))
    assert f"skipped unreadable image {tmp_path / 'images' / 'train' / 'circle' / '0.png'}: " in capsys.readouterr().err
    assert summary["skipped_images"] == 1
    assert summary["skipped_files"] == [str(tmp_path / "images" / "train" / "circle" / "0.png")]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == summary["skipped_files"]


def test_too_many_corrupt_images_stop_the_run_naming_them(tmp_path, capsys):
    _image_folder(tmp_path / "images", corrupt=3)
    recipe = tiny(tmp_path, *_folder_overrides(tmp_path / "images", 0.05))
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "max_bad_fraction" in err and re.search(r"train/circle/[012]\.png", err)
    assert re.search(r"\d of 36 images of the imagefolder train split \(.*images/train\)", err)  # how many, where
    assert not (tmp_path / "r").exists()  # no half-written run directory is left behind


def test_progress_bar_on_a_terminal(tmp_path, capsys):
    log = RunLog(tmp_path, total_steps=10, progress=True)
    log.progress(4, loss=0.5, lr=0.01, images_per_s=123.0, eta_s=30.0)
    log.close()
    err = capsys.readouterr().err
    assert "4/10" in err and "loss=0.5" in err and "lr=0.01" in err and "img_s=123" in err
    assert "<" in err  # tqdm's elapsed<remaining (the ETA)


@pytest.mark.slow
def test_compile_option(tmp_path):
    summary, _ = run(tmp_path, "train.compile=true", "train.steps=2")
    assert 0.0 <= summary["eval_top1"] <= 1.0


def test_model_config_reaches_the_model(tmp_path):
    cfg = load_config(
        str(tiny(tmp_path, "model.drop_path_rate=0.2", "model.drop_rate=0.3", "train.head_bias_init=-6.9"))
    )
    model = engine.build_model(cfg, 7)
    assert model.config["drop_path_rate"] == 0.2 and model.head_drop.p == 0.3
    assert torch.all(model.head.bias == -6.9) and torch.all(model.head.weight == 0)


def test_finetune_on_grey_images_from_rgb_weights_adapts_the_stem(tmp_path, capsys):
    model = TINY["model"]
    rgb = allmlp.create_model(model["name"], img_size=model["img_size"], num_classes=3, **model["overrides"])
    allmlp.save_weights(rgb, tmp_path / "rgb.safetensors")
    recipe = tiny(tmp_path, "train.steps=1")
    # the weights file decides in_chans unless the command line says otherwise: grey digits, one channel
    argv = ["finetune", "--config", str(recipe), "--weights", str(tmp_path / "rgb.safetensors"), "model.in_chans=1"]
    assert main([*argv, "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "allmlp: stem.proj.weight: the 3-channel (RGB) stem adapted to in_chans=1 (RGB filters summed)" in err


def test_layer_decay_run_resumes_exactly(tmp_path, monkeypatch):
    overrides = ("optim.layer_decay=0.5", "checkpoint.every_steps=3")
    _, run_dir = run(tmp_path, *overrides)
    finished = weights(run_dir / "model.safetensors")
    _, plain = run(tmp_path, "checkpoint.every_steps=3", out="plain")
    assert not torch.equal(finished["stem.proj.weight"], weights(plain / "model.safetensors")["stem.proj.weight"])

    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    restored = []
    real_load = engine.load_checkpoint

    def load_and_look(path, model, optimizer, ema_model, *rest):
        position = real_load(path, model, optimizer, ema_model, *rest)
        restored.append(sorted({group["lr_scale"] for group in optimizer.param_groups}))
        return position

    monkeypatch.setattr(engine, "load_checkpoint", load_and_look)
    fit(load_config(str(run_dir / "config.yaml")), run_dir, resume=True)
    assert restored == [[0.25, 0.5, 1.0]]  # stem, the block (with the final norm), head
    resumed = weights(run_dir / "model.safetensors")
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)
