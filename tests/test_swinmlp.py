"""Swin-MLP as the authors compute it: zero-padded shifted windows, clamped windows, grouped Conv1d heads, their
checkpoints, export."""

from pathlib import Path

import numpy as np
import pytest
import torch

import allmlp
from allmlp.tools.convert import convert

from helpers import onnx_outputs, published_shapes, randomise
from reference.swinmlp import AUTHORS

KEYS = Path(__file__).parent / "data" / "keys"
PUBLISHED_PARAMS = {
    "swinmlp_t_c24": 20_386_632,
    "swinmlp_t_c12": 21_152_072,
    "swinmlp_t_c6": 22_682_952,
    "swinmlp_b": 60_659_416,
}
KEY_FILES = {
    "swinmlp_t_c24": "swinmlp_tiny_c24_keys.txt",
    "swinmlp_t_c12": "swinmlp_tiny_c12_keys.txt",
    "swinmlp_t_c6": "swinmlp_tiny_c6_keys.txt",
    "swinmlp_b": "swinmlp_base_keys.txt",
}

SMALL = dict(
    img_size=64,
    embed_dim=8,
    depths=[2, 2, 2, 1],
    num_heads=[2, 2, 4, 4],
    window_size=4,
    mlp_ratio=2.0,
    num_classes=10,
    drop_path_rate=0.0,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / KEY_FILES[name])


def pair(seed: int = 0, **config):
    config = {**SMALL, **config}
    torch.manual_seed(seed)
    model = randomise(allmlp.SwinMLP(**config), seed).eval()
    reference = AUTHORS["SwinMLP"](**config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


def image(model, batch: int = 2, amplitude: float = 1.0, seed: int = 1) -> torch.Tensor:
    _, height, width = model.pretrained_cfg["input_size"]
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * amplitude


CASES = {
    # window 4 shifted by 2 in stages 1-2, clamped (4x4 and 2x2 grids, no shift) in stages 3-4
    "window4": dict(),
    # window 7 (odd: pad 4 before, 3 after), odd non-square image (59 x 115 -> 14 x 28 patches), stage 2 clamps
    # one side only (7 x 14: window 7 unshifted, two windows)
    "window7_odd": dict(img_size=(59, 115), depths=[2, 3], num_heads=[2, 4], window_size=7),
    # window 8 as the released tiny models: shifted in stages 1-2, stage 3's 8x8 grid is one unshifted window
    "window8": dict(img_size=128, depths=[2, 2, 2], num_heads=[1, 2, 8], window_size=8),
    # window 3 (pad 2 before, 1 after), patch 3, absolute position embedding, no patch norm
    "window3_ape": dict(
        img_size=(36, 72), patch_size=3, depths=[3, 2], num_heads=[4, 2], window_size=3, ape=True, patch_norm=False
    ),
    # window 5 on patch 2: odd image side (41 -> 20 patches, 20 and 10 are tiled by 5)
    "window5": dict(img_size=(41, 20), patch_size=2, depths=[2, 2], num_heads=[2, 8], window_size=5),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("amplitude", [1.0, 1e-3])
def test_forward_equals_the_authors_code(case, amplitude):
    model, reference = pair(**CASES[case])
    x = image(model, amplitude=amplitude)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            reference.forward_features(x),
            atol=1e-5,
            rtol=1e-5,
        )
    model.train(), reference.train()  # no batch statistics, dropout and drop path 0: the same function
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_window_layout_is_the_authors():
    model, reference = pair(**CASES["window7_odd"])
    ours = [(b.window_size, b.shift_size, b.padding) for layer in model.layers for b in layer.blocks]
    theirs = [(b.window_size, b.shift_size, b.padding) for layer in reference.layers for b in layer.blocks]
    assert ours == theirs
    assert ours[:3] == [(7, 0, [7, 0, 7, 0]), (7, 3, [4, 3, 4, 3]), (7, 0, [7, 0, 7, 0])]
    assert all(window == 7 and shift == 0 for window, shift, _ in ours[3:])  # 7 x 14: clamped to 7, no shift


def test_gradients_equal_the_authors_code():
    model, reference = pair(**CASES["window7_odd"])
    x = image(model)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_stage_outputs_are_the_authors_tokens():
    model, reference = pair()
    x = image(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        y = reference.patch_embed(x)
        for i, layer in enumerate(reference.layers):
            for block in layer.blocks:
                y = block(y)
            torch.testing.assert_close(maps[i].flatten(1, 2), y, atol=1e-5, rtol=1e-5)
            y = layer.downsample(y) if layer.downsample is not None else y
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_have_the_authors_parameters_and_keys(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes(name)


def test_registered_window_layouts():
    with torch.device("meta"):
        tiny, base = allmlp.create_model("swinmlp_t_c24"), allmlp.create_model("swinmlp_b")
    assert [[(b.window_size, b.shift_size) for b in layer.blocks] for layer in tiny.layers] == [
        [(8, 0), (8, 4)],
        [(8, 0), (8, 4)],
        [(8, 0), (8, 4)] * 3,
        [(8, 0), (8, 0)],  # 8x8 at 256: one window, the shift dropped
    ]
    assert [(b.window_size, b.shift_size) for b in base.layers[3].blocks] == [(7, 0), (7, 0)]
    assert base.layers[2].blocks[1].padding == [4, 3, 4, 3]
    assert tiny.pretrained_cfg["input_size"] == (3, 256, 256) and base.pretrained_cfg["input_size"] == (3, 224, 224)


def published_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in key_shapes(name).items():
        scale = 0.3 if len(shape) == 1 else 1.0 / max(1, int(np.prod(shape[1:]))) ** 0.5
        offset = 1.0 if "norm" in key and key.endswith("weight") else 0.0
        state_dict[key] = torch.randn(shape, generator=generator) * scale + offset
    return state_dict


def test_released_file_loads_as_published(tmp_path):
    """{"model": state dict} as on the GitHub release; by load_weights, create_model(weights=) and convert."""
    state_dict = published_state_dict("swinmlp_t_c12")
    path = tmp_path / "swin_mlp_tiny_c12_patch4_window8_256.pth"
    torch.save({"model": state_dict}, path)
    model = allmlp.create_model("swinmlp_t_c12", weights=path).eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())
    plain = allmlp.load_weights(allmlp.create_model("swinmlp_t_c12"), path).eval()
    converted = convert(path, tmp_path / "c12.safetensors")  # recognised from the names and shapes alone
    assert converted.config == model.config
    again = allmlp.create_model(tmp_path / "c12.safetensors").eval()
    reference = AUTHORS["SwinMLP"](**allmlp.get_entry("swinmlp_t_c12").config).eval()
    reference.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 256, 256) * 0.5
    with torch.no_grad():
        expected = reference(x)
        for loaded in (model, plain, again):
            torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)


def test_tiny_weights_load_at_512():
    """The window shapes of the 256 px tiny models fit a 512 px model too (stage 4 is then shifted)."""
    with torch.device("meta"):
        model = allmlp.create_model("swinmlp_t_c6", img_size=512)
    assert [(b.window_size, b.shift_size) for b in model.layers[3].blocks] == [(8, 0), (8, 4)]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes("swinmlp_t_c6")


def test_input_size_errors():
    model = pair()[0]
    with pytest.raises(ValueError, match=r"SwinMLP expects input of shape \(B, 3, 64, 64\) .*got \(1, 3, 68, 64\)"):
        model(torch.randn(1, 3, 68, 64))
    with pytest.raises(ValueError, match=r"got \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(img_size=72), r"img_size 72 with patch_size 4: stage 0 works on a 18x18 token grid, which windows of 4"),
        (
            dict(img_size=(48, 36), window_size=3),
            r"stage 0 works on a 12x9 token grid, which the 2x2 patch merging cannot halve",
        ),
        (dict(num_heads=[2, 2, 4]), r"num_heads needs one entry per stage \(4 stages\)"),
        (dict(num_heads=[3, 2, 4, 4]), r"stage 0: num_heads must be a positive int that divides the width 8, got 3"),
        (dict(window_size=0), "window_size must be a positive int, got 0"),
        (dict(depths=[]), r"depths must be a non-empty list"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(drop_rate=1.5), r"drop_rate must be in \[0, 1\), got 1.5"),
        (dict(img_size=2), "smaller than one patch of 4"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.SwinMLP(**{**SMALL, **overrides})


def test_safetensors_round_trip(tmp_path):
    model = pair(**CASES["window3_ape"])[0]
    path = allmlp.save_weights(model, tmp_path / "swinmlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.SwinMLP and again.config == model.config
    assert again.no_weight_decay() == {"absolute_pos_embed"}
    x = image(model)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_features_only_strides():
    model = allmlp.create_model(
        "swinmlp_t_c24", features_only=True, img_size=128, depths=[1, 1, 1, 1], embed_dim=8, num_heads=[1, 2, 2, 4]
    ).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == [f"layers.{i}.blocks" for i in range(4)]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 128))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 32, 32), (1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]


def test_bfloat16_forward_is_close_to_float32():
    model = pair(**CASES["window7_odd"])[0]
    x = image(model)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


def test_torch_export_with_dynamic_batch():
    from torch.export import Dim

    model = pair(**CASES["window7_odd"])[0]
    program = torch.export.export(model, (image(model),), dynamic_shapes=({0: Dim("batch", max=16)},))
    for batch in (1, 3):
        x = image(model, batch=batch)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model = pair(**CASES["window7_odd"])[0]
    x = image(model)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_equal_the_authors_code(name):
    torch.manual_seed(0)
    model = randomise(allmlp.create_model(name)).eval()
    reference = AUTHORS["SwinMLP"](**allmlp.get_entry(name).config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = image(model, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
