"""ResMLP against the authors' forward (tests/reference/resmlp.py) and timm's, FB's and timm's released layouts,
registry, export and errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import allmlp
from allmlp.models.resmlp import CONFIGS, ResMLPBlock
from allmlp.tools.convert import convert
from allmlp.weights.timm_families import convert_timm_resmlp, is_timm_resmlp

from helpers import assert_checkpointing_changes_nothing, onnx_outputs, published_shapes, randomise
from reference.resmlp import AUTHORS

KEYS = Path(__file__).parent / "data" / "keys"
KEY_FILES = {
    "resmlp_12_224": "resmlp_resmlp_12_keys.txt",
    "resmlp_24_224": "resmlp_resmlp_24_keys.txt",
    "resmlp_36_224": "resmlp_resmlp_36_keys.txt",
    "resmlp_big_24_224": "resmlp_resmlpB_24_keys.txt",
}
PUBLISHED_PARAMS = {
    "resmlp_12_224": 15_350_872,
    "resmlp_24_224": 30_020_680,
    "resmlp_36_224": 44_690_488,
    "resmlp_big_24_224": 129_138_280,
}
FB_INIT_SCALES = {"resmlp_12_224": 0.1, "resmlp_24_224": 1e-5, "resmlp_36_224": 1e-6, "resmlp_big_24_224": 1e-6}
SMALL = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, init_scale=0.1, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / KEY_FILES[name])


def pair(**overrides):
    """(allmlp ResMLP, the authors' formulation) with the same random weights."""
    config = {**SMALL, **overrides}
    torch.manual_seed(0)
    ours = randomise(allmlp.ResMLP(**config), seed=3).eval()
    reference = AUTHORS["ResMLP"](**config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def size_of(config: dict) -> tuple[int, int]:
    size = config["img_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_have_the_published_sizes_keys_and_init_scales(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes(name)
    assert list(model.state_dict()) == list(key_shapes(name))  # the authors' order too
    assert allmlp.get_entry(name).config["init_scale"] == FB_INIT_SCALES[name]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(img_size=(32, 48)),  # non-square image: a 4 x 6 token grid
        dict(img_size=(36, 20), patch_size=(6, 4)),  # non-square patches
        dict(img_size=(30, 45), patch_size=7),  # not a multiple of the patch: the conv drops the rest
        dict(depth=3, embed_dim=24, init_scale=1e-5),
        dict(num_classes=0),
    ],
)
def test_forward_equals_the_authors_code(overrides):
    ours, reference = pair(**overrides)
    config = {**SMALL, **overrides}
    x = torch.randn(3, 3, *size_of(config), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for scale in (1.0, 1e-3):
            torch.testing.assert_close(ours(x * scale), reference(x * scale), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   reference.forward_features(x), atol=1e-5, rtol=1e-5)  # fmt: skip
    ours.train(), reference.train()  # no dropout or drop path: training mode computes the same
    out, expected = ours(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def timm_resmlp(**overrides):
    """timm's ResMLP (its MlpMixer with ResBlock and Affine) in the small config, random weights."""
    from functools import partial

    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    config = dict(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16, mlp_ratio=4)
    config.update(overrides)
    torch.manual_seed(0)
    return randomise(MlpMixer(**config, block_layer=partial(ResBlock, init_values=0.1), norm_layer=Affine), 5)


@pytest.mark.parametrize("overrides", [{}, dict(img_size=(24, 40)), dict(global_pool="")])
def test_timm_state_dicts_load_and_compute_what_timm_computes(overrides):
    theirs = timm_resmlp(**overrides).eval()
    state_dict = theirs.state_dict()
    assert is_timm_resmlp(list(state_dict))
    assert state_dict["blocks.0.norm1.alpha"].shape == (1, 1, 16)
    config = {**SMALL, **overrides}
    ours = allmlp.load_weights(allmlp.ResMLP(**config), state_dict).eval()
    x = torch.randn(2, 3, *size_of(config), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-5, rtol=1e-5)
        for norm in (False, True):
            final, maps = ours.forward_intermediates(x, norm=norm)
            final_t, maps_t = theirs.forward_intermediates(x, norm=norm)
            torch.testing.assert_close(final, final_t, atol=1e-5, rtol=1e-5)
            for a, b in zip(maps, maps_t, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # timm's own FB -> timm renaming gives back timm's file from ours: the two namings are one-to-one
    from timm.models.mlp_mixer import checkpoint_filter_fn

    again = checkpoint_filter_fn(ours.state_dict(), theirs)
    assert set(again) == set(state_dict)
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())


def test_the_timm_renaming_touches_nothing_else():
    assert not is_timm_resmlp(["stem.proj.weight", "blocks.0.mlp_tokens.fc1.weight", "blocks.0.norm1.weight"])
    assert not is_timm_resmlp(["stem.proj.weight", "blocks.0.mlp_channels.gate.proj.weight"])  # gMLP
    assert not is_timm_resmlp(["patch_embed.proj.weight", "blocks.0.attn.weight"])  # FB's own
    extra = {"stem.proj.weight": torch.zeros(1), "blocks.0.linear_tokens.weight": torch.zeros(1),
             "blocks.0.something.ls1": torch.zeros(1), "pos_embed": torch.zeros(1)}  # fmt: skip
    assert list(convert_timm_resmlp(extra)) == [
        "patch_embed.proj.weight",
        "blocks.0.attn.weight",
        "blocks.0.something.ls1",
        "pos_embed",
    ]
    with pytest.raises(allmlp.WeightsError, match=r"norm\.alpha: .*\(1, 1, dim\), got \(2, 8\)"):
        convert_timm_resmlp({"stem.proj.weight": torch.zeros(1), "norm.alpha": torch.zeros(2, 8)})


def fb_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the exact layout of FB's released file for `name` (plain, the authors' keys and shapes)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * (0.05 if len(shape) > 1 else 0.3)
        for key, shape in key_shapes(name).items()
    }


def test_fb_released_layout_loads_every_way_and_computes_what_the_authors_compute(tmp_path):
    state_dict = fb_state_dict("resmlp_12_224")
    path = tmp_path / "resmlp_12_no_dist.pth"
    torch.save(state_dict, path)
    reference = AUTHORS["ResMLP"](**allmlp.get_entry("resmlp_12_224").config).eval()
    reference.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)
    loaded = allmlp.load_weights(allmlp.create_model("resmlp_12_224"), path)
    created = allmlp.create_model("resmlp_12_224", weights=path)
    converted = convert(path, tmp_path / "resmlp_12.safetensors")
    rebuilt = allmlp.create_model(tmp_path / "resmlp_12.safetensors")
    assert converted.config == allmlp.get_entry("resmlp_12_224").config | {"global_pool": "avg", "drop_rate": 0.0,
        "drop_path_rate": 0.0, "in_chans": 3}  # fmt: skip
    for model in (loaded, created, converted, rebuilt):
        assert type(model) is allmlp.ResMLP
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_timm_released_layout_loads_every_way(tmp_path):
    """timm's resmlp_12_224 weights (safetensors in timm's names, Affine (1, 1, dim)) load like FB's."""
    import timm

    theirs = randomise(timm.create_model("resmlp_12_224"), seed=4).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(x)
    loaded = allmlp.load_weights(allmlp.create_model("resmlp_12_224"), path)
    created = allmlp.create_model("resmlp_12_224", weights=path)
    converted = convert(path, tmp_path / "converted.safetensors")
    for model in (loaded, created, converted):
        assert type(model) is allmlp.ResMLP and model.config["depth"] == 12
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resmlp_24_224", "resmlp_36_224", "resmlp_big_24_224"])
def test_convert_recognises_every_fb_release(tmp_path, name):
    state_dict = fb_state_dict(name)
    torch.save(state_dict, tmp_path / "fb.pth")
    model = convert(tmp_path / "fb.pth", tmp_path / "fb.safetensors")
    assert model.config == allmlp.create_model(name, device="meta").config
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())


def test_a_head_of_other_classes_is_a_clear_error_or_a_fresh_start():
    ours, reference = pair()
    state_dict = reference.state_dict()
    with pytest.raises(allmlp.WeightsError, match="the checkpoint has 10 classes, the model 5"):
        allmlp.load_weights(allmlp.ResMLP(**{**SMALL, "num_classes": 5}), state_dict)
    fresh = allmlp.load_weights(allmlp.ResMLP(**{**SMALL, "num_classes": 5}), state_dict, reset_head=True)
    assert torch.count_nonzero(fresh.head.weight) == 0
    assert torch.equal(fresh.blocks[1].attn.weight, ours.blocks[1].attn.weight)


def test_registry_entries_record_the_releases_and_preprocessing():
    for name in PUBLISHED_PARAMS:
        entry = allmlp.get_entry(name)
        p = entry.preprocessing
        assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
        assert p.interpolation == "bicubic" and p.crop_pct == 0.9  # the authors' evaluation (README_resmlp.md)
        assert "arXiv 2105.03404" in entry.paper
    tags = {name: {r.tag: r for r in allmlp.get_entry(name).releases} for name in PUBLISHED_PARAMS}
    expected_fb = {
        "resmlp_12_224": {"dist": 77.8, "no_dist": 76.6, "dino": None},
        "resmlp_24_224": {"dist": 80.8, "no_dist": 79.4, "dino": None},
        "resmlp_36_224": {"dist": 81.1, "no_dist": 79.7},
        "resmlp_big_24_224": {"dist": 83.6, "no_dist": 81.0, "22k": 84.4},
    }
    files = {"resmlp_12_224": "resmlp_12", "resmlp_24_224": "resmlp_24", "resmlp_36_224": "resmlp_36",
             "resmlp_big_24_224": "resmlpB_24"}  # fmt: skip
    for name, releases in expected_fb.items():
        for tag, top1 in releases.items():
            release = tags[name][tag]
            assert release.top1 == top1 and release.num_classes == 1000
            assert release.url == f"https://dl.fbaipublicfiles.com/deit/{files[name]}_{tag}.pth"
            assert release.file_name == f"deit/{files[name]}_{tag}.pth"
        timm_tags = {t for t in tags[name] if t.startswith("timm:")}
        assert len(timm_tags) == len(releases)
        for tag in timm_tags:
            assert tags[name][tag].url.startswith(f"https://huggingface.co/timm/{name}.{tag[5:]}/")
    assert "DINO" in tags["resmlp_24_224"]["dino"].trained_on


def test_init_follows_the_authors():
    with torch.device("meta"):
        for name, scale in FB_INIT_SCALES.items():
            model = allmlp.create_model(name)
            assert model.blocks[0].gamma_1.shape == (model.num_features,) and model.config["init_scale"] == scale
    model = allmlp.create_model("resmlp_12_224")
    assert torch.all(model.blocks[3].gamma_2 == 0.1) and torch.all(model.blocks[3].gamma_1 == 0.1)
    assert torch.all(model.norm.alpha == 1) and torch.all(model.blocks[0].norm1.beta == 0)
    assert 0.018 < model.blocks[0].mlp.fc1.weight.std() < 0.022 and torch.count_nonzero(model.blocks[0].attn.bias) == 0
    assert 0.018 < model.head.weight.std() < 0.022
    assert model.blocks[0].mlp.act.approximate == "none"
    assert allmlp.ResMLP(**{**SMALL, "init_scale": 1e-5}).blocks[1].gamma_1[0].item() == pytest.approx(1e-5)


def test_non_square_interface():
    model = allmlp.ResMLP(**{**SMALL, "img_size": (32, 56)}).eval()
    x = torch.randn(2, 3, 32, 56)
    with torch.no_grad():
        tokens = model.forward_features(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert tokens.shape == (2, 4 * 7, 16) and model(x).shape == (2, 10)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 7)] * 2
    assert model.pretrained_cfg["input_size"] == (3, 32, 56) and model.pretrained_cfg["fixed_input_size"]
    features = allmlp.create_model("resmlp_12_224", img_size=(32, 48), patch_size=8, embed_dim=16, depth=3,
                                   features_only=True, out_indices=(0, 2))  # fmt: skip
    assert [tuple(m.shape) for m in features(torch.randn(1, 3, 32, 48))] == [(1, 16, 4, 6)] * 2
    assert features.feature_info.reduction() == [8, 8]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depth=0), "depth must be a positive int, got 0"),
        (dict(embed_dim=2.5), "embed_dim must be a positive int, got 2.5"),
        (dict(img_size=(32, 0)), r"img_size must be a positive int or an \(H, W\) pair"),
        (dict(img_size=6), r"img_size \(6, 6\) must be at least patch_size \(8, 8\)"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be a number in \[0, 1\), got 1.0"),
        (dict(drop_rate=-0.1), r"drop_rate must be a number in \[0, 1\)"),
        (dict(init_scale="0.1"), "init_scale must be a number"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(global_pool="max"), "global_pool must be 'avg'"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.ResMLP(**{**SMALL, **overrides})


def test_wrong_input_is_a_clear_error():
    model = allmlp.ResMLP(**{**SMALL, "img_size": (32, 40)})
    with pytest.raises(ValueError, match=r"ResMLP expects input of shape \(B, 3, 32, 40\).*4x5 patch grid.*got "
                                         r"\(1, 3, 32, 32\)"):  # fmt: skip
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 1, 32, 40\)"):
        model(torch.randn(1, 1, 32, 40))


def test_safetensors_round_trip(tmp_path):
    model, _ = pair(img_size=(32, 40), drop_path_rate=0.1, init_scale=1e-5)
    path = allmlp.save_weights(model, tmp_path / "resmlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.ResMLP and again.config == model.config
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_drop_path_is_the_same_rate_in_every_block_as_the_authors():
    model = allmlp.ResMLP(**{**SMALL, "depth": 3, "drop_path_rate": 0.2})
    assert [block.drop_path.rate for block in model.blocks] == [0.2, 0.2, 0.2]
    assert isinstance(model.blocks[0], ResMLPBlock)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model, _ = pair(drop_path_rate=0.3)
    assert_checkpointing_changes_nothing(model.train(), torch.randn(2, 3, 32, 32))


def test_bfloat16_forward_is_close_to_float32():
    model, _ = pair(embed_dim=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


def test_exported_program_reproduces_pytorch():
    model, _ = pair(img_size=(32, 40))
    x = torch.randn(2, 3, 32, 40)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model, _ = pair(img_size=(32, 40))
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_configs_are_the_authors_constructors():
    assert CONFIGS["big_24"] == dict(patch_size=8, embed_dim=768, depth=24, init_scale=1e-6)
    assert {name: c["depth"] for name, c in CONFIGS.items()} == {"12": 12, "24": 24, "36": 36, "big_24": 24}


def test_dropout_and_drop_path_change_training_only():
    ours, reference = pair(drop_rate=0.2, drop_path_rate=0.2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)  # eval: both are identities
        ours.train()
        torch.manual_seed(0)
        first = ours(x)
        torch.manual_seed(1)
        assert (ours(x) - first).abs().max() > 1e-4
