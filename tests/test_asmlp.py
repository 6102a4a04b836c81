"""AS-MLP as the authors compute it: the cupy-free axial shift, parity with their forward, their checkpoints, export."""

from pathlib import Path

import numpy as np
import pytest
import torch

import allmlp
from allmlp.models.asmlp import axial_shift
from allmlp.tools.convert import convert

from helpers import fake_yacs_module, onnx_outputs, published_shapes, randomise
from reference.asmlp import AUTHORS, kernel_shift, torch_shift

KEYS = Path(__file__).parent / "data" / "keys"
PUBLISHED_PARAMS = {"asmlp_t": 28_282_696, "asmlp_s": 49_594_696, "asmlp_b": 87_752_808}
KEY_FILES = {"asmlp_t": "asmlp_T_keys.txt", "asmlp_s": "asmlp_S_keys.txt", "asmlp_b": "asmlp_B_keys.txt"}

SMALL = dict(embed_dim=8, depths=[1, 2, 1, 1], shift_size=5, mlp_ratio=2.0, num_classes=10, drop_path_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / KEY_FILES[name])


def pair(seed: int = 0, **config):
    """(allmlp model, the authors' formulation) with the same random weights (norm scales around 1, biases too)."""
    config = {**SMALL, **config}
    torch.manual_seed(seed)
    model = randomise(allmlp.ASMLP(**config), seed).eval()
    reference = AUTHORS["ASMLP"](**config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


@pytest.mark.parametrize("shift_size", [3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 10, 7, 9), (1, 6, 2, 3), (1, 3, 5, 4), (2, 13, 11, 6)])
def test_axial_shift_is_the_cuda_kernel(shift_size, shape):
    """Bit-identical to the kernel's rule and to the authors' pure-PyTorch shift, for channel counts that leave
    fewer than shift_size groups (6 / 5 -> 3 groups of 2; 3 / 7 -> 3 groups of 1), grids smaller than the shift."""
    x = torch.randn(shape)
    for dim in (2, 3):
        expected = kernel_shift(x, shift_size, dim)
        assert torch.equal(torch_shift(x, shift_size, dim), expected)
        got = axial_shift(x.permute(0, 2, 3, 1), shift_size, dim - 1, shape[1]).permute(0, 3, 1, 2)
        assert torch.equal(got, expected)


def test_axial_shift_direction():
    x = torch.arange(5.0).reshape(1, 5, 1, 1) * torch.tensor([1.0, 10.0, 100.0])  # (B, H=5, W=1, C=3)
    shifted = axial_shift(x, 3, 1, 3)[0, :, 0]  # channel 0 reads i + 1, channel 1 i, channel 2 i - 1
    assert shifted[:, 0].tolist() == [1, 2, 3, 4, 0]
    assert shifted[:, 1].tolist() == [0, 10, 20, 30, 40]
    assert shifted[:, 2].tolist() == [0, 0, 100, 200, 300]
    assert torch.equal(axial_shift(x, 1, 1, 3), x)


@pytest.mark.parametrize(
    "config, size",
    [
        (dict(), (67, 99)),  # 16 x 24 patches: odd image sizes, the floor of the strided stem
        (dict(shift_size=3, embed_dim=10), (35, 64)),  # 10 channels in groups of 4, 4, 2
        (dict(shift_size=7, as_bias=False, patch_norm=False), (64, 32)),  # 7 > 1x1 grid of stage 4: all zeros
        (dict(shift_size=1, depths=[1, 1], patch_size=3, embed_dim=6), (31, 42)),  # two stages, no shift
        (dict(shift_size=5, embed_dim=6, depths=[2, 1, 1], patch_size=2), (33, 17)),  # 6 / 5: 3 groups of 2
    ],
)
@pytest.mark.parametrize("amplitude", [1.0, 1e-3])
def test_forward_equals_the_authors_code(config, size, amplitude):
    model, reference = pair(**config)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)) * amplitude
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            reference.forward_features(x),
            atol=1e-5,
            rtol=1e-5,
        )
    model.train(), reference.train()  # no batch statistics, no dropout: train mode is the same function
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_authors_code():
    model, reference = pair()
    x = torch.randn(2, 3, 32, 64)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_stage_outputs_are_the_authors_maps():
    model, reference = pair()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        y = reference.patch_embed(x)
        for i, layer in enumerate(reference.layers):
            for block in layer.blocks:
                y = block(y)
            torch.testing.assert_close(maps[i], y, atol=1e-5, rtol=1e-5)
            y = layer.downsample(y) if layer.downsample is not None else y
    assert [m.shape[1:] for m in maps] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_have_the_authors_parameters_and_keys(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes(name)


def published_file(path: Path, name: str, monkeypatch, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file as the authors release it: {"model": state dict, "config": yacs CfgNode} (random tensors)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in key_shapes(name).items():
        scale = 0.3 if len(shape) == 1 else 1.0 / max(1, int(np.prod(shape[1:]))) ** 0.5
        offset = 1.0 if "norm" in key and key.endswith("weight") else 0.0
        state_dict[key] = torch.randn(shape, generator=generator) * scale + offset
    CfgNode = fake_yacs_module(monkeypatch)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "asmlp", "NAME": f"{name}_patch4_shift5_224"}), "EPOCH": 300})
    torch.save({"model": state_dict, "config": config}, path)
    monkeypatch.delitem(__import__("sys").modules, "yacs.config")
    monkeypatch.delitem(__import__("sys").modules, "yacs")
    return state_dict


def test_released_file_loads_as_published(tmp_path, monkeypatch):
    path = tmp_path / "asmlp_tiny_patch4_shift5_224.pth"
    state_dict = published_file(path, "asmlp_t", monkeypatch)
    model = allmlp.create_model("asmlp_t", weights=path).eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())
    plain = allmlp.load_weights(allmlp.create_model("asmlp_t"), path).eval()
    converted = convert(path, tmp_path / "asmlp_t.safetensors")  # recognised from the names and shapes alone
    assert converted.config == model.config
    again = allmlp.create_model(tmp_path / "asmlp_t.safetensors").eval()
    reference = AUTHORS["ASMLP"](**allmlp.get_entry("asmlp_t").config).eval()
    reference.load_state_dict(state_dict, strict=True)
    x = torch.randn(1, 3, 224, 224) * 0.5
    with torch.no_grad():
        expected = reference(x)
        for loaded in (model, plain, again):
            torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)


def test_input_sizes_and_errors():
    model = pair()[0]
    for size in ((32, 32), (35, 35), (96, 131)):
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)
    with pytest.raises(
        ValueError,
        match=r"ASMLP expects input of shape \(B, 3, H, W\) with H // 4 and W // 4 "
        r"divisible by 8 .*got \(1, 3, 48, 64\)",
    ):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"got \(1, 3, 28, 28\)"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(shift_size=4), r"shift_size must be an odd int >= 1 \(the authors' Shift\), got 4"),
        (dict(depths=[]), r"depths must be a non-empty list of block counts >= 1, got \[\]"),
        (dict(embed_dim=0), "embed_dim must be a positive int, got 0"),
        (dict(patch_size=0), "patch_size must be a positive int, got 0"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(img_size=(224,)), "img_size must be a positive int or an"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.ASMLP(**{**SMALL, **overrides})


def test_safetensors_round_trip(tmp_path):
    model = pair(shift_size=3, as_bias=False)[0]
    path = allmlp.save_weights(model, tmp_path / "asmlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.ASMLP and again.config == model.config
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_features_only_strides():
    model = allmlp.create_model("asmlp_t", features_only=True, depths=[1, 1, 1, 1], embed_dim=8).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == [f"layers.{i}.blocks" for i in range(4)]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 24, 16), (1, 16, 12, 8), (1, 32, 6, 4), (1, 64, 3, 2)]


def test_bfloat16_forward_is_close_to_float32():
    model = pair()[0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


def test_torch_export_with_dynamic_sizes():
    from torch.export import Dim

    model = pair()[0]
    # a last-stage grid of at least 2x2 (1 is a special size for torch.export: a separate program)
    rows, cols = Dim("rows", min=2, max=8), Dim("cols", min=2, max=8)
    dynamic = {0: Dim("batch", min=1, max=16), 2: 32 * rows, 3: 32 * cols}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 96),), dynamic_shapes=(dynamic,))
    for shape in ((1, 3, 64, 64), (3, 3, 96, 256), (2, 3, 64, 96)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_at_the_smallest_input():
    """32x32 (a 1x1 grid in stage 4), static in height and width."""
    from torch.export import Dim

    model = pair()[0]
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: Dim("batch", max=16)},))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model = pair(depths=[1, 1], shift_size=3)[0]
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_equal_the_authors_code(name):
    torch.manual_seed(0)
    model = randomise(allmlp.create_model(name)).eval()
    reference = AUTHORS["ASMLP"](**allmlp.get_entry(name).config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
