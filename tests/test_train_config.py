"""Recipe configs: YAML + dotted overrides, type checks, and bad configs failing before any work."""

from __future__ import annotations

import pytest

import allmlp.train.engine as engine
from allmlp.cli import build_parser, main
from allmlp.train.config import (
    ConfigError,
    RunConfig,
    check_run_config,
    describe_fields,
    load_config,
    recipe_path,
)

from helpers import TINY_DEMO_MODEL


def test_shipped_recipe_by_name_and_overrides_by_dotted_path():
    cfg = load_config("demo", ["optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "train.epochs=3", "data.shift_pixels=1"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)  # YAML would read 1e-3 as a string
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.epochs == 3.0 and cfg.data.shift_pixels == 1
    assert cfg.model.overrides["hidden_dim"] == 128  # the recipe's values survive unrelated overrides
    cfg = load_config("demo", ["model.overrides.num_blocks=2", "model.weights=null", "data.root=2024"])
    assert cfg.model.overrides["num_blocks"] == 2 and cfg.model.weights is None
    assert cfg.data.root == "2024"  # a path field keeps the text, not YAML's integer


def test_recipe_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim: {name: sgd, lr: 0.1}\ntrain: {steps: 5}\n")
    cfg = load_config(str(path), ["optim.momentum=0.5"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.train.steps) == ("sgd", 0.1, 0.5, 5)
    assert recipe_path(str(path)) == path


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("optim.lrr=0.1", ["optim.lrr", "optim.lr"]),  # unknown field, closest name suggested
        ("trian.steps=3", ["trian", "train"]),
        ("optim.lr=fast", ["optim.lr", "a number", "'fast'"]),
        ("train.steps=2.5", ["train.steps", "an integer"]),
        ("train.channels_last=yes please", ["train.channels_last", "true or false"]),
        ("optim.name=lars", ["optim.name", "adam, adamw, sgd, lamb"]),
        ("optim.betas=[0.9]", ["optim.betas", "a list"]),
        ("data.kind=mnist", ["data.kind", "demo"]),  # the data section's own check
        ("optim=3", ["optim is a section"]),
        ("optim.lr", ["FIELD=VALUE"]),
    ],
)
def test_bad_override_names_field_and_expectation(override, names):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    for name in names:
        assert name in str(err.value)


def test_bad_yaml_type_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer, got 'many'"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("overrides", "command", "message"),
    [
        (["model.name=mixer_b99"], "train", r"model.name: unknown model 'mixer_b99'"),
        (["data.kind=imagefolder", "data.root=/nonexistent/images"], "train", r"data.root: folder not found"),
        (["data.kind=cifar10"], "train", r"data.root: data.kind=cifar10 needs"),
        (["model.weights=/nonexistent.safetensors"], "train", r"model.weights: file not found"),
        ([], "finetune", r"model.weights: `allmlp finetune` needs weights"),
        (["train.batch_size=100", "train.grad_accum=3"], "train", r"train.batch_size: 100 must divide"),
        (["train.steps=null", "train.epochs=null"], "train", r"train.epochs / train.steps"),
        (["optim.lr=0"], "train", r"optim.lr: expected a number > 0"),
        (["train.ema_decay=1.5"], "train", r"train.ema_decay"),
        (["model.in_chans=4"], "train", r"model.in_chans"),
    ],
)
def test_semantic_checks(overrides, command, message):
    with pytest.raises(ConfigError, match=message):
        check_run_config(load_config("demo", overrides), command)


def test_cli_fails_before_any_work(monkeypatch, capsys, tmp_path):
    """A bad config exits with status 2 and a message; no training, no run directory."""
    monkeypatch.setattr(engine, "build_loaders", lambda *a, **k: pytest.fail("data was loaded"))
    out = tmp_path / "run"
    for args in (
        ["train", "--output", str(out), "optim.lr=abc"],
        ["train", "--output", str(out), "model.name=nope"],
        ["train", "--output", str(out), "--config", "no_such_recipe"],
        ["eval", "--config", "demo"],  # no weights
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "error:" in err
    assert not out.exists()


def test_help_documents_every_option_and_field(capsys):
    for command in ("train", "finetune", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in ("--config", "--output", "--weights", "FIELD=VALUE"):
            assert option in text
        for line in describe_fields():
            path = line.split("=")[0].strip()
            assert f"{path} =" in text, path
        assert "demo" in text  # the shipped recipes are listed
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_train_without_arguments_is_the_demo(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default run directory is created (atomically) under ./runs
    seen = {}

    def fake_fit(cfg, run_dir, **kwargs):
        seen.update(cfg=cfg, run_dir=run_dir)
        return {"eval_top1": 0.5, "eval_top5": 0.9, "wall_time_s": 1.0}

    monkeypatch.setattr("allmlp.train.commands.fit", fake_fit)
    assert main(["train"]) == 0
    assert seen["cfg"] == load_config("demo")
    assert seen["run_dir"].parts[0] == "runs" and seen["run_dir"].name.startswith("demo-")


def test_a_key_given_twice_in_a_recipe_is_an_error(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' on line 4 \(first on line 2\)"):
        load_config(str(recipe))
    recipe.write_text("train:\n  steps: 3\ntrain:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match="duplicate key 'train'"):
        load_config(str(recipe))


def test_a_warm_up_longer_than_the_run_is_a_clear_warning(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_DEMO_MODEL, "data": {"kind": "demo"},
        "schedule": {"warmup_epochs": 2.0},
        "train": {"steps": 3, "batch_size": 50, "precision": "fp32", "eval_batch_size": 500}}))  # fmt: skip
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "warning: the warm-up (160 steps: schedule.warmup_steps 0 + warmup_epochs 2 x 80 steps/epoch)" in err
    assert "longer than the run (3 steps)" in err
