"""The command line entry points: `allmlp` and `python -m allmlp`, list and info."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main as cli


def test_list_prints_every_model_with_its_parameter_count(capsys):
    assert cli(["list", "mixer_*"]) == 0
    out = capsys.readouterr().out
    assert "mixer_b16_224  59,880,472" in out and "mixer_h14_224  432,350,952" in out
    assert "imagenet1k, imagenet21k, sam, gsam" in out


def test_info_names_preprocessing_and_provenance(capsys):
    assert cli(["info", "mixer_b16_224"]) == 0
    out = capsys.readouterr().out
    assert "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), bilinear" in out
    assert "gs://mixer_models/imagenet21k/Mixer-B_16.npz" in out and "21843 classes" in out


def test_unknown_model_is_an_error_with_close_matches(capsys):
    assert cli(["info", "mixer_b16"]) == 2
    assert "did you mean mixer_b16_224" in capsys.readouterr().err


def test_python_dash_m_is_the_console_script():
    result = subprocess.run([sys.executable, "-m", "allmlp", "--help"], capture_output=True, text=True, check=True)
    assert "usage: allmlp" in result.stdout and "convert" in result.stdout


def test_finetune_img_size_becomes_the_model_img_size_override(monkeypatch):
    seen = {}

    def fake_train_command(command, config, overrides, output, resume, weights):
        seen.update(command=command, overrides=overrides, weights=weights)

    monkeypatch.setattr("allmlp.train.commands.train_command", fake_train_command)
    assert cli(["finetune", "--weights", "w.npz", "--img-size", "448", "data.root=/data/pets"]) == 0
    assert seen == {
        "command": "finetune",
        "overrides": ["data.root=/data/pets", "model.img_size=448"],
        "weights": "w.npz",
    }


def test_overrides_are_accepted_anywhere_among_the_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "allmlp.train.commands.train_command",
        lambda command, config, overrides, output, resume, weights: seen.update(overrides=overrides, output=output),
    )
    assert cli(["train", "train.epochs=1", "--output", "X", "train.seed=1"]) == 0
    assert seen == {"overrides": ["train.epochs=1", "train.seed=1"], "output": "X"}


def test_a_stray_argument_is_refused_with_the_command_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["train", "train.epochs=1", "--output", "X", "stray"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: allmlp train" in err and "unrecognized arguments: stray" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"allmlp {allmlp.__version__}"


def test_list_with_no_match_says_so(capsys):
    assert cli(["list", "zzz"]) == 1
    assert "no registered model matches 'zzz'" in capsys.readouterr().err


def test_a_name_in_other_case_suggests_the_registered_one_first(capsys):
    assert cli(["info", "Mixer_B16_224"]) == 2
    assert "did you mean mixer_b16_224," in capsys.readouterr().err


def test_help_is_wrapped_and_shows_the_recipe_values(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    result = subprocess.run(
        [sys.executable, "-m", "allmlp", "train", "--help"], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 70
    assert any(line.startswith("  train.batch_size = 64 ") for line in lines)  # the demo recipe's, not 128
    assert any(line.startswith("  optim.lr = 0.01 ") for line in lines)


def _under_a_file(tmp_path: Path, name: str) -> str:
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / name)


@pytest.mark.parametrize(
    "command",
    [
        lambda w, out: ["convert", w, out("c.safetensors")],
        lambda w, out: ["embed", "IMG", "--weights", w, "-o", out("e.npy"), "--workers", "0"],
        lambda w, out: ["export", "--weights", w, "--format", "torchscript", "-o", out("m.pt")],
        lambda w, out: ["visualize", "--weights", w, "--out", out("pictures")],
        lambda w, out: ["eval", "--weights", w, "--output", out("e"), "data.kind=demo"],
        lambda w, out: ["train", "--output", out("run"), "train.steps=1"],
    ],
    ids=["convert", "embed", "export", "visualize", "eval", "train"],
)
def test_an_output_path_that_cannot_be_written_is_one_line(tmp_path, capsys, command):
    model = allmlp.create_model("mixer_s32_224", img_size=32, num_classes=3, hidden_dim=8, num_blocks=1)
    weights = allmlp.save_weights(model, tmp_path / "w.safetensors")
    image = tmp_path / "IMG.png"
    Image.new("RGB", (32, 32)).save(image)
    args = [str(image) if a == "IMG" else a for a in command(weights, lambda name: _under_a_file(tmp_path, name))]
    assert cli(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err and "file" in errors[0], err


def test_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import allmlp.atomic

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(allmlp.atomic.tempfile, "mkstemp", refuse)
    model = allmlp.create_model("mixer_s32_224", img_size=32, num_classes=3, hidden_dim=8, num_blocks=1)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert cli(["convert", str(tmp_path / "w.pth"), str(tmp_path / "ro" / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"allmlp convert: error: cannot write or read {tmp_path / 'ro'}: Permission denied"
