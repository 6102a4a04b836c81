"""Shipped recipes: all load and pass the checks, resolve by name from the installed package, and hold the
published settings they cite."""

from __future__ import annotations

from pathlib import Path

import pytest

import allmlp
from allmlp.train.config import RECIPES_DIR, check_run_config, list_recipes, load_config, recipe_path

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EXPECTED = {
    "demo",
    "mixer_b16_i1k",
    "mixer_l16_i1k",
    "mixer_b16_i21k",
    "mixer_finetune_cifar10",
    "mixer_finetune_imagefolder",
    "mixer_cifar10_scratch",
    "cyclemlp_b1_i1k",
    "vip_s7_i1k",
    "resmlp_12_224_i1k",
    "msmlp_t_i1k",
    "convmlp_s_i1k",
    "asmlp_t_i1k",
    "swinmlp_t_c24_i1k",
    "activemlp_xt_i1k",
    "repmlpnet_b256_i1k",
    "smlpnet_s_i1k",
    "spach_ms_mlp_s_i1k",
    "wavemlp_t_i1k",
    "hiremlp_tiny_i1k",
}


def test_every_recipe_is_shipped_in_the_package():
    assert set(list_recipes()) == EXPECTED
    assert RECIPES_DIR.parent == Path(allmlp.__file__).resolve().parent
    assert sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) == sorted(p.name for p in REPO_RECIPES.glob("*.yaml"))
    for name in EXPECTED:
        assert recipe_path(name).read_text() == (REPO_RECIPES / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_passes_every_check(name, tmp_path):
    cfg = load_config(name)
    overrides = [f"data.root={tmp_path}"] if cfg.data.kind not in ("demo", "webdataset") else []
    cfg = load_config(name, overrides)
    command = "train"
    if "finetune" in name:
        weights = tmp_path / "w.safetensors"
        weights.touch()
        cfg = load_config(name, [*overrides, f"model.weights={weights}"])
        command = "finetune"
    check_run_config(cfg, command)
    assert cfg.model.name in allmlp.list_models()
    lines = recipe_path(name).read_text().splitlines()
    for above, line in zip(["", *lines], lines, strict=False):
        if line.startswith("  ") and not line.lstrip().startswith("#"):  # a value: its source is said beside or above
            assert "#" in line or above.lstrip().startswith("#"), f"{name}: no source for {line!r}"


def test_mixer_imagenet_recipes_follow_table4_and_big_vision():
    for name, model in (("mixer_b16_i1k", "mixer_b16_224"), ("mixer_l16_i1k", "mixer_l16_224")):
        cfg = load_config(name)
        assert cfg.model.name == model and cfg.model.drop_path_rate == 0.1 and cfg.model.drop_rate == 0.0
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad_norm) == (
            "adamw",
            1e-3,
            0.1,
            1.0,
        )
        assert (cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.end_lr) == (10000, "linear", 1e-5)
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.loss, cfg.train.head_bias_init) == (
            300,
            4096,
            "sigmoid",
            -6.9,
        )
        d = cfg.data
        assert d.inception_crop and d.hflip and d.randaugment_layers == 2 and d.mixup_alpha == 0.5
        assert d.eval_preset == "resmall_crop" and d.crop_pct == 0.875
    i21k = load_config("mixer_b16_i21k")
    assert i21k.data.mixup_alpha == 0.2 and i21k.data.num_classes == 21843 and i21k.train.epochs == 300


@pytest.mark.parametrize("name", ["mixer_finetune_cifar10", "mixer_finetune_imagefolder"])
def test_finetune_recipes_are_the_reference_defaults(name):
    cfg = load_config(name)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.9, 0.03, 0.0)
    assert cfg.optim.clip_grad_norm == 1.0
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay) == (500, "cosine")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.loss) == (10000, 512, "softmax")
    assert cfg.data.eval_preset == "resize" and cfg.data.mixup_alpha == 0.0
    assert cfg.data.crop_scale == (0.05, 1.0)
    preprocessing = allmlp.get_entry(cfg.model.name).preprocessing
    assert preprocessing.mean == preprocessing.std == (0.5, 0.5, 0.5)  # pixels in [-1, 1]


def test_cyclemlp_and_vip_recipes():
    cyc, vip = load_config("cyclemlp_b1_i1k"), load_config("vip_s7_i1k")
    assert cyc.model.name == "cyclemlp_b1" and vip.model.name == "vip_s7"
    for cfg in (cyc, vip):
        assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.05 and cfg.model.drop_path_rate == 0.1
        assert cfg.train.label_smoothing == 0.1 and cfg.data.mixup_alpha == 0.8 and cfg.data.cutmix_alpha == 1.0
        assert cfg.data.random_erasing == 0.25 and cfg.schedule.end_lr == 1e-5 and cfg.schedule.warmup_start_lr == 1e-6
    assert cyc.optim.lr * 512 / cyc.train.batch_size == 5e-4 and cyc.schedule.warmup_epochs == 5
    assert vip.optim.lr == 2e-3 and vip.train.batch_size == 2048 and vip.schedule.warmup_epochs == 20
    assert vip.data.crop_pct == 0.9


def test_resmlp_recipe_has_the_papers_settings():
    cfg = load_config("resmlp_12_224_i1k")
    assert cfg.model.name == "resmlp_12_224"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("lamb", 5e-3, 0.2)
    assert (cfg.train.batch_size, cfg.train.epochs) == (2048, 400)
    assert cfg.data.crop_pct == 0.9 == allmlp.get_entry("resmlp_12_224").preprocessing.crop_pct


def test_msmlp_recipe_follows_the_authors_config():
    cfg = load_config("msmlp_t_i1k")
    assert cfg.model.name == "msmlp_t" and cfg.model.drop_path_rate == 0.1
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.clip_grad_norm) == ("adamw", 0.05, 5.0)
    assert cfg.optim.lr * 512 / cfg.train.batch_size == 5e-4  # main.py's linear scaling
    assert cfg.schedule.warmup_start_lr * 512 / cfg.train.batch_size == 5e-7
    assert cfg.schedule.end_lr * 512 / cfg.train.batch_size == 5e-6
    assert (cfg.schedule.warmup_epochs, cfg.train.epochs, cfg.train.label_smoothing) == (20, 300, 0.1)
    assert (cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.data.random_erasing) == (0.8, 1.0, 0.25)
    assert cfg.data.crop_pct == allmlp.get_entry("msmlp_t").preprocessing.crop_pct == 0.875


@pytest.mark.parametrize("name, model", [("smlpnet_s_i1k", "smlpnet_s"), ("spach_ms_mlp_s_i1k", "spach_ms_mlp_s")])
def test_spach_repository_recipes_build_their_model(name, model):
    """microsoft/SPACH main.py defaults: lr 5e-4 x 1024 / 512, 20 warmup epochs; sMLPNet's stochastic depth is its
    constructor's dp_rate (0.2 for S), which the trainer's drop_path_rate reaches under timm's name."""
    from allmlp.train.engine import build_model, model_img_size

    cfg = load_config(name)
    assert cfg.model.name == model and cfg.optim.lr == 1e-3 and cfg.train.batch_size == 1024
    assert cfg.schedule.warmup_epochs == 20 and cfg.optim.weight_decay == 0.05 and cfg.data.crop_pct == 0.875
    built = build_model(cfg, 10)
    assert model_img_size(cfg) == 224 and built.num_classes == 10
    expected = {"smlpnet_s": ("dp_rate", 0.2), "spach_ms_mlp_s": ("drop_path_rate", 0.1)}[model]
    assert built.config[expected[0]] == expected[1]
