"""A weights file is enough: an allmlp file's stored config decides the architecture in finetune and eval,
conflicting command-line `model.*` values are errors naming both, and class names travel with the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.train.commands import resolve_config
from allmlp.train.config import ConfigError

# a grey 28x28 Mixer like the demo's, small: what `allmlp train` leaves in runs/<demo>/model.safetensors
GREY = dict(img_size=28, in_chans=1, patch_size=7, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32)
FAST = ["train.steps=2", "train.batch_size=6", "train.grad_accum=1", "train.eval_batch_size=50", "train.threads=1"]
FAST += ["train.precision=fp32", "schedule.warmup_steps=1", "data.num_workers=0", "checkpoint.every_steps=0"]


def grey_weights(path: Path, names: list[str] | None = None) -> str:
    torch.manual_seed(0)
    model = allmlp.create_model("mixer_s16_224", num_classes=10, **GREY)
    with torch.no_grad():
        model.head.weight.normal_()
    return allmlp.save_weights(model, path, class_names=names)


def shapes_folder(root: Path) -> Path:
    torch.manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ("circle", "square", "stripe"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_finetune_a_demo_model_at_another_size_and_predict_names_its_classes(tmp_path, capsys):
    weights = grey_weights(tmp_path / "demo.safetensors")
    data = shapes_folder(tmp_path / "shapes")
    out = tmp_path / "ft"
    args = ["finetune", "--weights", weights, "--img-size", "56", f"data.root={data}", "--output", str(out), *FAST]
    assert main(args) == 0, capsys.readouterr().err
    tuned = allmlp.create_model(out / "model.safetensors")
    assert tuned.config["img_size"] == (56, 56) and tuned.config["in_chans"] == 1 and tuned.num_classes == 3
    assert tuned.config["hidden_dim"] == 16 and tuned.config["tokens_mlp_dim"] == 8 * 4  # block-diagonal x (2x2)
    assert allmlp.weights.read_class_names(out / "model.safetensors") == ["circle", "square", "stripe"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"].startswith("MlpMixer(img_size=56, patch_size=7, hidden_dim=16")

    capsys.readouterr()
    assert main(["predict", str(data / "val" / "square" / "0.png"), "--weights", str(out / "model.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(name in lines[1] for name in ("circle", "square", "stripe"))  # names, not "2  2"

    # eval of the fine-tuned file with the default (empty) recipe: its own architecture, no key listing
    assert (
        main(["eval", "--weights", str(out / "model.safetensors"), f"data.root={data}", "data.kind=imagefolder"]) == 0
    )
    assert "(6 images)" in capsys.readouterr().out


def test_eval_of_a_demo_file_builds_the_stored_architecture(tmp_path, capsys):
    weights = grey_weights(tmp_path / "demo.safetensors")
    assert main(["eval", "--weights", weights, "data.kind=demo", "train.eval_batch_size=500"]) == 0
    assert "(1000 images)" in capsys.readouterr().out
    cfg = resolve_config("eval", None, ["data.kind=demo"], weights)
    assert cfg.model.in_chans == 1 and cfg.model.img_size == 28 and cfg.model.overrides["hidden_dim"] == 16


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.overrides.hidden_dim=32", "model.overrides.hidden_dim=32 contradicts"),
        ("model.in_chans=3", "model.in_chans=3 contradicts"),
        ("model.name=cyclemlp_b1", "model.name=cyclemlp_b1 is a CycleMLP, but"),
    ],
)
def test_a_conflicting_model_override_names_both(tmp_path, override, named):
    weights = grey_weights(tmp_path / "demo.safetensors")
    with pytest.raises(ConfigError, match="MlpMixer|stores|trained with") as error:
        resolve_config("eval", None, ["data.kind=demo", override], weights)
    assert named in str(error.value) and weights in str(error.value)


def test_the_recipe_yields_to_the_file_and_a_matching_override_is_fine(tmp_path):
    weights = grey_weights(tmp_path / "demo.safetensors")
    cfg = resolve_config(
        "eval", "mixer_finetune_imagefolder", ["data.kind=demo", "model.overrides.hidden_dim=16"], weights
    )
    assert cfg.model.name == "mixer_b16_224" and cfg.model.img_size == 28 and cfg.model.in_chans == 1
    assert cfg.model.overrides["hidden_dim"] == 16 and cfg.model.overrides["num_blocks"] == 2


def test_class_names_travel_in_the_metadata(tmp_path):
    names = [f"digit {i}" for i in range(10)]
    weights = grey_weights(tmp_path / "w.safetensors", names)
    assert allmlp.weights.read_class_names(weights) == names
    assert allmlp.weights.read_class_names(grey_weights(tmp_path / "plain.safetensors")) is None
    with pytest.raises(allmlp.WeightsError, match="3 class names for a head of 10 classes"):
        grey_weights(tmp_path / "bad.safetensors", names[:3])
