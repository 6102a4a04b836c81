"""sMLPNet as the authors compute it: parity with their forward (tests/reference/smlp.py), their keys and parameter
counts, their released file layout (the `proh_w` typo included), export, and clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.models.smlp import SMLPNet, SparseMLP
from allmlp.tools.convert import convert

from helpers import onnx_outputs, published_shapes, randomise, randomise_batchnorm_stats
from reference.smlp import authors_smlpnet

KEYS = Path(__file__).parent / "data" / "keys"
VARIANTS = {  # registered name: (key file, parameters as the authors' code counts them)
    "smlpnet_t": ("smlpnet_tiny_keys.txt", 24_123_584),
    "smlpnet_s": ("smlpnet_small_keys.txt", 48_558_136),
    "smlpnet_b": ("smlpnet_base_keys.txt", 65_880_408),
}
SMALL = dict(in_chans=3, dim=8, alpha=2, num_classes=10, patch_size=4, image_size=36, depths=[1, 2, 1, 1], dp_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' state dict, from its key list."""
    return published_shapes(KEYS / name)


def randomise_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BatchNorm running statistics too."""
    return randomise_batchnorm_stats(randomise(model, seed), seed + 1)


def pair(**overrides) -> tuple[SMLPNet, nn.Module]:
    """(allmlp's model, the authors') with the same random weights, loaded strictly both ways of naming."""
    config = {**SMALL, **overrides}
    torch.manual_seed(0)
    ours = randomise_all(SMLPNet(**config))
    theirs = authors_smlpnet(**ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registered_variants_have_the_authors_keys_shapes_and_parameter_counts(name):
    key_file, params = VARIANTS[name]
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(state) == list(key_shapes(key_file))  # the authors' order too
    assert state == key_shapes(key_file)
    assert any(".proh_w." in key for key in state)  # the authors' typo is the key


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, 36),  # 9x9 patch grid: odd grids at every stage (9, 4, 2, 1)
        ({}, 39),  # the largest input the stride-4 stem maps to the same grid
        (dict(image_size=64, depths=[2, 1, 2], dim=6, alpha=3), 64),
        (dict(image_size=30, patch_size=3, depths=[1, 1]), 32),
        (dict(in_chans=1, num_classes=0), 36),
    ],
)
def test_forward_equals_the_authors_code(overrides, size):
    ours, theirs = pair(**overrides)
    x = torch.randn(2, ours.config["in_chans"], size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        small = x * 1e-3  # low amplitude: BatchNorm statistics, not the input, decide the activations
        torch.testing.assert_close(ours(small), theirs(small), atol=1e-5, rtol=1e-5)


def test_non_square_input_inside_the_accepted_range():
    ours, theirs = pair()
    x = torch.randn(2, 3, 37, 39)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_train_mode_outputs_gradients_and_running_statistics_equal_the_authors():
    ours, theirs = pair()
    ours.train(), theirs.train()
    x = torch.randn(3, 3, 36, 36)
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    mine = ours.state_dict()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=1e-6, msg=key)  # BN statistics updated alike


def test_proj_h_mixes_along_the_width_and_proh_w_along_the_height():
    block = SparseMLP(side=3, channels=2).eval()
    with torch.no_grad():
        block.BN.weight.fill_(1.0), block.BN.bias.zero_()
        block.BN.running_mean.zero_(), block.BN.running_var.fill_(1.0)
        block.BN.eps = 0.0
        shift = torch.roll(torch.eye(3), 1, dims=0)[:, :, None, None]  # output position i reads position i - 1
        for conv in (block.proj_h, block.proh_w):
            conv.weight.copy_(shift), conv.bias.zero_()
        block.fuse.weight.zero_()
        block.fuse.weight[0, 2] = 1.0  # channel 0 out <- the width branch, channel 0
        block.fuse.weight[1, 5] = 1.0  # channel 1 out <- the height branch, channel 1
        x = torch.randn(1, 3, 3, 2).abs() + 1.0  # (B, H, W, C), where GELU is nearly the identity
        out = block(x)
        activated = nn.functional.gelu(x)
    torch.testing.assert_close(out[..., 0], torch.roll(activated[..., 0], 1, dims=2))  # moved along W
    torch.testing.assert_close(out[..., 1], torch.roll(activated[..., 1], 1, dims=1))  # moved along H


def released_state_dict(key_file: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every key of the authors' state dict, with its shapes (BatchNorm counters as ints)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in key_shapes(key_file).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    return state


def test_released_layout_loads_through_every_door(tmp_path):
    """smlp_s.pth as published ({"model": state_dict}): load_weights, create_model(weights=), `allmlp convert`
    (which recognises smlpnet_s from the names and shapes), and a fresh head for other classes."""
    state = released_state_dict("smlpnet_small_keys.txt")
    path = tmp_path / "smlp_s.pth"
    torch.save({"model": state}, path)
    loaded = [
        allmlp.load_weights(allmlp.create_model("smlpnet_s"), path),
        allmlp.create_model("smlpnet_s", weights=path),
        convert(path, tmp_path / "smlp_s.safetensors"),
        allmlp.create_model(tmp_path / "smlp_s.safetensors"),
    ]
    for model in loaded:
        own = model.state_dict()
        assert set(own) == set(state)
        assert all(torch.equal(own[key], value) for key, value in state.items())
    assert loaded[2].config == loaded[0].config
    fresh = allmlp.create_model("smlpnet_s", num_classes=7, weights=path)
    assert fresh.get_classifier().out_features == 7 and torch.count_nonzero(fresh.get_classifier().weight) == 0
    assert torch.equal(fresh.batch_norm.running_var, state["batch_norm.running_var"])
    with pytest.raises(allmlp.WeightsError, match="the checkpoint has 1000 classes, the model 7"):
        allmlp.load_weights(allmlp.create_model("smlpnet_s", num_classes=7), path)


def test_released_layout_of_a_small_model_gives_the_authors_outputs(tmp_path):
    """A file in the released layout, written from the authors' model, gives their outputs once loaded."""
    torch.manual_seed(0)
    _, theirs = pair()
    randomise_all(theirs, seed=3).eval()
    torch.save({"model": theirs.state_dict()}, tmp_path / "small.pth")
    ours = allmlp.load_weights(SMLPNet(**SMALL), tmp_path / "small.pth").eval()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smlpnet_s_at_224_equals_the_authors_code():
    torch.manual_seed(0)
    ours = randomise_all(allmlp.create_model("smlpnet_s")).eval()
    theirs = authors_smlpnet(**ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_safetensors_round_trip(tmp_path):
    ours, _ = pair(dp_rate=0.1, global_pool="")
    path = allmlp.save_weights(ours, tmp_path / "smlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is SMLPNet and again.config == ours.config
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_interface():
    ours, _ = pair()
    x = torch.randn(2, 3, 36, 36)
    features = ours.forward_features(x)
    assert features.shape == (2, 1, 1, 64) and features.is_contiguous()  # (B, H, W, C) after the BatchNorm
    assert torch.equal(ours(x), ours.forward_head(features))
    assert [info["reduction"] for info in ours.feature_info] == [4, 8, 16, 32]
    modules = ["channel_mix.0", "channel_mix.2", "channel_mix.3", "channel_mix.4"]  # each stage's last block
    assert [info["module"] for info in ours.feature_info] == modules
    maps = ours.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 9, 9), (2, 16, 4, 4), (2, 32, 2, 2), (2, 64, 1, 1)]
    assert ours.pretrained_cfg["classifier"] == "mlp_head.0" and ours.get_classifier() is ours.mlp_head[0]
    ours.reset_classifier(3)
    assert ours(x).shape == (2, 3) and ours.config["num_classes"] == 3
    features_only = allmlp.create_model("smlpnet_t", features_only=True, out_indices=(1, 3), depths=[1, 1, 1, 1])
    assert [tuple(m.shape) for m in features_only(torch.randn(1, 3, 224, 224))] == [(1, 160, 28, 28), (1, 640, 7, 7)]


def test_bfloat16_forward_is_close_to_float32():
    ours, _ = pair()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        expected = ours(x)
        got = ours.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.15, rtol=0.05)


def test_torch_export_runs_the_model():
    from torch.export import Dim

    ours, _ = pair()
    x = torch.randn(2, 3, 36, 36)
    program = torch.export.export(ours, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    for batch in (1, 3):
        y = torch.randn(batch, 3, 36, 36)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(y), ours(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    ours, _ = pair()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        expected = ours(x).numpy()
    np.testing.assert_allclose(onnx_outputs(ours, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=38), r"image_size must be a multiple of patch_size .* got image_size 38 and patch_size 4"),
        (dict(image_size=(36, 36)), r"image_size must be a positive int \(sMLPNet takes square inputs\)"),
        (dict(image_size=16), r"gives a 4x4 patch grid, too small for 4 stages .* use image_size >= 32"),
        (dict(depths=[]), "depths must be a non-empty list of block counts >= 1"),
        (dict(depths=[1, 0]), "depths must be a non-empty list"),
        (dict(dp_rate=1.0), r"dp_rate must be in \[0, 1\)"),
        (dict(dim=0), "dim must be a positive int, got 0"),
        (dict(alpha=2.5), "alpha must be a positive int, got 2.5"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(global_pool="max"), "global_pool must be 'avg'"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        SMLPNet(**{**SMALL, **overrides})


@pytest.mark.parametrize("shape", [(2, 3, 35, 36), (2, 3, 36, 40), (2, 1, 36, 36), (3, 36, 36)])
def test_inputs_outside_the_grid_are_clear_errors(shape):
    ours, _ = pair()
    got = ", ".join(str(s) for s in shape)
    with pytest.raises(ValueError, match=rf"SMLPNet expects input of shape \(B, 3, 36, 36\) \(height and width in "
                       rf"36..39.*got \({got}\)"):  # fmt: skip
        ours(torch.randn(shape))


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    ours, _ = pair(dp_rate=0.3)
    ours.train()
    x = torch.randn(2, 3, 36, 36)
    torch.manual_seed(1)
    expected_out = ours(x)
    expected_out.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.load_state_dict(pair(dp_rate=0.3)[0].state_dict())  # the BatchNorm statistics of before the first pass
    ours.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out = ours(x)
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    out.square().sum().backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=0, rtol=0, msg=name)
