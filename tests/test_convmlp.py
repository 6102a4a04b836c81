"""ConvMLP as the authors compute it: parity with their formulation (tests/reference/convmlp.py) on small configs,
odd and tiny input sizes and low-amplitude inputs, the dense backbone, their released files, export, errors."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.tools.convert import convert

from helpers import assert_checkpointing_changes_nothing, onnx_outputs, published_shapes, randomise
from reference.convmlp import AUTHORS, ReferenceConvMLP

KEYS = Path(__file__).parent / "data" / "keys"
PUBLISHED_PARAMS = {"convmlp_s": 9_022_920, "convmlp_m": 17_410_504, "convmlp_l": 42_728_440}

SMALL = dict(blocks=[1, 2, 1], dims=[8, 16, 24], mlp_ratios=[2, 3, 1.5], channels=6, n_conv_blocks=2)
CONFIGS = [
    SMALL,
    dict(blocks=[2, 1], dims=[12, 20], mlp_ratios=[2, 2], channels=7, n_conv_blocks=1),  # odd tokenizer width
    dict(blocks=[1], dims=[10], mlp_ratios=[3], channels=4, n_conv_blocks=0),  # no bottleneck, one stage
    dict(blocks=[1, 1, 1, 1], dims=[8, 8, 16, 16], mlp_ratios=[1, 2, 2, 1], channels=8, n_conv_blocks=1),
]
SIZES = [(37, 45), (1, 1), (3, 5), (17, 64), (30, 31)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def randomise_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BatchNorm running statistics too (variances around 1, never near 0)."""
    randomise(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.3)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model


def pair(config: dict, seed: int = 0, **overrides) -> tuple[allmlp.ConvMLP, nn.Module]:
    """(allmlp's model, the authors' formulation) with the same random weights, loaded strictly both ways."""
    config = {**config, "num_classes": 10, "drop_path_rate": 0.0, **overrides}
    model = randomise_all(allmlp.ConvMLP(**config), seed)
    reference = AUTHORS["ConvMLP"](**model.config)
    reference.load_state_dict(model.state_dict(), strict=True)
    return model.eval(), reference.eval()


def image(size: tuple[int, int], batch: int = 2, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * scale


def key_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' model, from its key list."""
    return published_shapes(KEYS / f"convmlp_{variant}_keys.txt")


def released_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in the published layout (a plain state dict, the authors' keys, shapes and dtypes), random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in key_shapes(variant).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(12345)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            fan_in = max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


# ---------------------------------------------------------------------------------------------------------------
# Parity with the authors' forward


@pytest.mark.parametrize("config", CONFIGS, ids=["three-stages", "two-stages", "one-stage", "four-stages"])
def test_forward_equals_the_authors_code(config):
    model, reference = pair(config)
    with torch.no_grad():
        for size in SIZES:
            for scale in (1.0, 1e-3):  # low amplitude: BatchNorm shifts and LayerNorm's eps dominate
                x = image(size, scale=scale)
                torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5, msg=f"{size} x{scale}")


def test_features_and_global_pool_equal_the_authors_tokens():
    model, reference = pair(SMALL)
    tokens_model, _ = pair(SMALL, global_pool="")
    x = image((41, 29))
    with torch.no_grad():
        features = model.forward_features(x)
        backbone = AUTHORS["ConvMLP"](**{**model.config, "classifier_head": False})
        backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("norm", "head"))})
        torch.testing.assert_close(
            features, model.norm(ReferenceConvMLP.forward(backbone.eval(), x)), atol=1e-5, rtol=1e-5
        )
        assert features.shape == (2, 2, 1, 24)  # 41 x 29 -> ceil(/32): 2 x 1
        torch.testing.assert_close(tokens_model(x).mean((1, 2)), reference(x), atol=1e-5, rtol=1e-5)


def test_train_mode_equals_the_authors_code():
    """BatchNorm on batch statistics, running statistics updated alike; no stochastic depth (drop_path_rate 0)."""
    model, reference = pair(SMALL)
    model.train(), reference.train()
    x = image((33, 35), batch=3)
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    theirs = reference.state_dict()
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, theirs[name], atol=1e-6, rtol=1e-6, msg=name)


def test_stochastic_depth_rates_rise_within_each_stage():
    model = allmlp.ConvMLP(**SMALL)  # the authors' default: 0.1
    rates = [[block.drop_path.rate for block in stage.blocks] for stage in model.stages]
    assert rates == [[0.0], [0.0, 0.1], [0.0]]
    reference = AUTHORS["ConvMLP"](**model.config)
    theirs = [[getattr(b.drop_path, "drop_prob", 0.0) for b in stage.blocks] for stage in reference.stages]
    assert np.allclose(rates[1], theirs[1]) and theirs[0] == theirs[2] == [0.0]


# ---------------------------------------------------------------------------------------------------------------
# The dense backbone (classifier_head=False)


def test_backbone_returns_the_authors_dense_maps():
    model, reference = pair(SMALL, classifier_head=False)
    assert model.num_classes == 0 and isinstance(model.norm, nn.Identity) and isinstance(model.head, nn.Identity)
    assert not any(k.startswith(("norm", "head")) for k in model.state_dict())
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    assert [info["module"] for info in model.feature_info] == ["tokenizer", "conv_stages", "stages.0", "stages.2"]
    assert [info["num_chs"] for info in model.feature_info] == [6, 8, 16, 24]
    for size in ((61, 75), (5, 3), (64, 64)):
        x = image(size)
        with torch.no_grad():
            got, expected = model.forward_intermediates(x, intermediates_only=True), reference(x)
            tokens = model(x)  # the authors' ConvMLP(classifier_head=False): the last stage's tokens
            expected_tokens = ReferenceConvMLP.forward(reference, x)
            assert torch.equal(tokens, model.forward_features(x))
        assert len(got) == len(expected) == 4
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            red = model.feature_info[i]["reduction"]
            assert g.shape == (2, model.feature_info[i]["num_chs"], -(-size[0] // red), -(-size[1] // red))
            assert g.is_contiguous()
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="classifier_head=False"):
        model.reset_classifier(3)


@pytest.mark.parametrize(
    "blocks, modules, reductions",
    [
        ([1], ["tokenizer", "stages.0"], [4, 8]),
        ([1, 1], ["tokenizer", "conv_stages", "stages.1"], [4, 8, 16]),
        ([1, 1, 1, 1], ["tokenizer", "conv_stages", "stages.0", "stages.1", "stages.3"], [4, 8, 16, 32, 64]),
    ],
)
def test_feature_info_of_other_depths_is_one_map_per_stride(blocks, modules, reductions):
    n = len(blocks)
    model = allmlp.ConvMLP(blocks=blocks, dims=[8] * n, mlp_ratios=[2] * n, channels=4, n_conv_blocks=1).eval()
    assert [i["module"] for i in model.feature_info] == modules
    assert [i["reduction"] for i in model.feature_info] == reductions
    x = image((70, 50), batch=1)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    for m, red in zip(maps, reductions, strict=True):
        assert m.shape[2:] == (-(-70 // red), -(-50 // red))


def test_features_only_at_every_stride():
    model = allmlp.create_model("convmlp_s", features_only=True, blocks=[1, 1, 1], n_conv_blocks=1)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 99, 70))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 25, 18), (128, 13, 9), (256, 7, 5), (512, 4, 3)]
    early = allmlp.create_model("convmlp_s", features_only=True, out_indices=[0], blocks=[1, 1, 1], n_conv_blocks=1)
    assert isinstance(early.model.conv_stages, nn.Identity) and len(early.model.stages) == 0
    assert len(early.model._feature_stages()) == 1
    assert all(k.startswith("model.tokenizer.") for k in early.state_dict())
    with torch.no_grad():
        (tokenizer_map,) = early(torch.randn(1, 3, 99, 70))
        assert early.model(torch.randn(1, 3, 99, 70)).shape == (1, 25, 18, 64)  # the pruned model: tokenizer tokens
    assert tokenizer_map.shape == (1, 64, 25, 18)


# ---------------------------------------------------------------------------------------------------------------
# Registered variants and the released files


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_and_keys_match_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert own == key_shapes(name.split("_")[1])


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_backbone_keys_are_the_released_ones_without_norm_and_head(variant):
    with torch.device("meta"):
        model = allmlp.create_model(f"convmlp_{variant}", classifier_head=False)
    expected = {k: v for k, v in key_shapes(variant).items() if not k.startswith(("norm.", "head."))}
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == expected


def test_released_file_loads_by_every_route(tmp_path):
    """A plain state dict as published (convmlp_s_imagenet.pth): load_weights, create_model(weights=) and an
    auto-detecting `allmlp convert` all give the authors' outputs."""
    state = released_state_dict("s")
    path = tmp_path / "convmlp_s_imagenet.pth"
    torch.save(state, path)
    reference = AUTHORS["ConvMLP"](**allmlp.get_entry("convmlp_s").config)
    reference.load_state_dict(state, strict=True)
    reference.eval()
    x = image((64, 48), batch=1)
    with torch.no_grad():
        expected = reference(x)
    loaded = allmlp.load_weights(allmlp.create_model("convmlp_s"), path).eval()
    created = allmlp.create_model("convmlp_s", weights=path).eval()
    converted = convert(path, tmp_path / "s.safetensors").eval()
    assert converted.config == created.config
    again = allmlp.create_model(tmp_path / "s.safetensors").eval()
    with torch.no_grad():
        for model in (loaded, created, converted, again):
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(created.state_dict()["tokenizer.block.1.num_batches_tracked"], torch.tensor(12345))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["m", "l"])
def test_released_m_and_l_files_load_and_convert(tmp_path, variant):
    state = released_state_dict(variant)
    path = tmp_path / f"convmlp_{variant}_imagenet.pth"
    torch.save(state, path)
    converted = convert(path, tmp_path / f"{variant}.safetensors")
    assert converted.config == allmlp.create_model(f"convmlp_{variant}", device="meta").config
    own = converted.state_dict()
    assert all(torch.equal(own[key], value) for key, value in state.items())


def test_released_weights_load_into_the_backbone_without_their_head(tmp_path):
    state = released_state_dict("s")
    backbone = allmlp.create_model("convmlp_s", classifier_head=False)
    with pytest.raises(allmlp.WeightsError, match=r"unexpected \(2\): norm\.weight, norm\.bias"):
        allmlp.load_weights(backbone, state)
    allmlp.load_weights(backbone, state, strict=False)
    assert torch.equal(backbone.stages[2].blocks[1].connect.weight, state["stages.2.blocks.1.connect.weight"])


def test_convert_recognises_a_backbone_file(tmp_path):
    backbone = allmlp.create_model("convmlp_m", classifier_head=False)
    torch.save(backbone.state_dict(), tmp_path / "m_backbone.pth")
    converted = convert(tmp_path / "m_backbone.pth", tmp_path / "m_backbone.safetensors")
    assert converted.config == backbone.config and not converted.classifier_head


def test_registry_entries():
    for variant, top1 in (("s", 76.8), ("m", 79.0), ("l", 80.2)):
        entry = allmlp.get_entry(f"convmlp_{variant}")
        (release,) = entry.releases
        assert release.top1 == top1 and release.num_classes == 1000
        assert release.url == f"https://shi-labs.com/projects/convmlp/checkpoints/convmlp_{variant}_imagenet.pth"
        assert release.file_name == f"projects/convmlp/checkpoints/convmlp_{variant}_imagenet.pth"
        p = entry.preprocessing
        assert (p.interpolation, p.crop_pct, p.mean, p.std) == (
            "bicubic",
            0.9,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
        )


# ---------------------------------------------------------------------------------------------------------------
# Precision, export, checkpointing


def test_bfloat16_forward_is_close_to_float32():
    model, _ = pair(SMALL)
    x = image((45, 45))
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1 * expected.abs().max().item(), rtol=0.05)


def test_torch_export_runs_at_other_sizes():
    from torch.export import Dim

    model, reference = pair(SMALL)
    # one program covers H, W >= 33 (every grid at least 2x2; a 1x1 grid specialises the shapes)
    dynamic = {0: Dim("batch", min=1, max=16), 2: Dim("height", min=33, max=256), 3: Dim("width", min=33, max=256)}
    program = torch.export.export(model, (image((64, 48)),), dynamic_shapes=(dynamic,))
    exported = program.module()
    with torch.no_grad():
        for batch, size in ((1, (37, 45)), (3, (64, 64)), (2, (33, 200))):
            x = image(size, batch=batch)
            torch.testing.assert_close(exported(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9)])
def test_torch_export_at_small_inputs(size):
    """Inputs down to 1x1 (every grid 1x1) export with a static size and a dynamic batch."""
    from torch.export import Dim

    model, reference = pair(SMALL)
    program = torch.export.export(model, (image(size),), dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    with torch.no_grad():
        for batch in (1, 3):
            x = image(size, batch=batch)
            torch.testing.assert_close(program.module()(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo):
    model, _ = pair(SMALL)
    x = image((29, 38))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)


def test_onnx_export_of_the_backbone(tmp_path):
    model, _ = pair(SMALL, classifier_head=False)
    x = image((29, 38))
    with torch.no_grad():
        expected = model(x).numpy()  # the last stage's tokens
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "b.onnx", False), expected, atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_outputs_gradients_and_statistics():
    """Stochastic depth replays its draws; BatchNorm (outside the recomputed blocks) updates its statistics once."""
    model, _ = pair(SMALL, drop_path_rate=0.3)
    assert_checkpointing_changes_nothing(model.train(), image((41, 39)), buffers=True)


# ---------------------------------------------------------------------------------------------------------------
# Errors, files, initialisation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mlp_ratios=[2, 2]), r"blocks, dims and mlp_ratios must agree in size"),
        (dict(dims=[8, 16]), r"blocks, dims and mlp_ratios must agree in size"),
        (dict(blocks=[1, 0, 1]), r"blocks must hold ints >= 1, got \[1, 0, 1\]"),
        (dict(dims=[8, 16.0, 24]), r"dims must hold ints >= 1"),
        (dict(blocks=[]), r"blocks must be a non-empty list"),
        (dict(mlp_ratios=[2, -1, 2]), r"mlp_ratios must be positive numbers"),
        (dict(channels=1), r"channels \(the tokenizer's width\) must be an int >= 2, got 1"),
        (dict(n_conv_blocks=-1), r"n_conv_blocks must be an int >= 0, got -1"),
        (dict(classifier_head="no"), r"classifier_head must be True or False, got 'no'"),
        (dict(num_classes=-1), r"num_classes must be an int >= 0"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(global_pool="max"), r"global_pool must be 'avg'"),
        (dict(img_size=0), r"img_size must be a positive int"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.ConvMLP(**{**SMALL, **overrides})


def test_bad_inputs_are_clear_errors():
    model, _ = pair(SMALL)
    for bad in (torch.randn(2, 1, 32, 32), torch.randn(3, 32, 32), torch.randn(2, 3, 0, 5)):
        got = "(" + ", ".join(str(d) for d in bad.shape) + ")"
        with pytest.raises(
            ValueError, match=re.escape(f"ConvMLP expects input of shape (B, 3, H, W) with any H, W >= 1, got {got}")
        ):
            model(bad)


@pytest.mark.parametrize("classifier_head", [True, False])
def test_safetensors_round_trip(tmp_path, classifier_head):
    model, _ = pair(SMALL, classifier_head=classifier_head, drop_path_rate=0.1)
    path = allmlp.save_weights(model, tmp_path / "convmlp.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.ConvMLP and again.config == model.config
    x = image((40, 33))
    with torch.no_grad():
        a, b = again(x), model(x)
    for got, want in zip(a if not classifier_head else [a], b if not classifier_head else [b], strict=True):
        assert torch.equal(got, want)


def test_interface():
    model, _ = pair(SMALL)
    x = image((50, 35))
    features = model.forward_features(x)
    assert features.shape == (2, 2, 2, 24) and features.is_contiguous()
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features) == (2, 24)
    assert torch.equal(model(x), model.forward_head(features))
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.config["num_classes"] == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 24)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "tokenizer.block.0" and not cfg["fixed_input_size"] and cfg["crop_pct"] == 0.9


def test_authors_init():
    model = allmlp.ConvMLP(**SMALL)
    fc = model.stages[1].blocks[0].channel_mlp1.fc1
    assert torch.count_nonzero(fc.bias) == 0 and 0.01 < fc.weight.std() < 0.03
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)))
    assert model.stages[0].blocks[0].channel_mlp1.act.approximate == "none"
    conv = model.conv_stages.conv_blocks[0][3]  # 3x3, 8 -> 8: Kaiming fan_out std sqrt(2 / (8 * 9))
    assert 0.1 < conv.weight.std() < 0.25
    assert model.conv_stages.downsample.bias is not None and model.stages[0].downsample_mlp.downsample.bias is not None
    assert model.stages[0].blocks[0].connect.bias is None and model.tokenizer.block[0].bias is None


def test_activations_stay_channels_last():
    """The convolutions run on channels_last memory: the NHWC tokens between modules are contiguous views."""
    model, _ = pair(SMALL)
    seen = {}
    for name in ("tokenizer", "conv_stages", "stages.0", "stages.0.blocks.0.connect", "tokenizer.block.9"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        model(image((37, 45)))
    for name in ("tokenizer", "conv_stages", "stages.0"):
        assert seen[name].is_contiguous(), name
    for name in ("stages.0.blocks.0.connect", "tokenizer.block.9"):
        assert seen[name].is_contiguous(memory_format=torch.channels_last), name
