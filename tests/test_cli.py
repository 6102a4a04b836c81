"""The command line entry points: `allmlp` and `python -m allmlp`, list and info."""

import subprocess
import sys

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
