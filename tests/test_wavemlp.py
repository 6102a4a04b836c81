"""Wave-MLP as the authors compute it: parity with their formulation (tests/reference/wavemlp.py) in every norm,
mode and option, the published variants' sizes and keys, the released files (thop counters beside the weights),
export, bf16, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import allmlp
from allmlp.tools.convert import convert
from allmlp.weights.wavemlp import drop_thop_counters, has_thop_counters

from helpers import (
    assert_checkpointing_changes_nothing,
    onnx_outputs,
    published_shapes,
    randomise,
    randomise_batchnorm_stats,
)
from reference.wavemlp import AUTHORS

KEYS = Path(__file__).parent / "data" / "keys"
KEY_FILES = {"t_dw": "T_dw", "t": "T", "s": "S", "m": "M", "b": "B"}
PUBLISHED_PARAMS = {
    "wavemlp_t_dw": 15_286_472,
    "wavemlp_t": 17_193_160,
    "wavemlp_s": 30_708_040,
    "wavemlp_m": 44_056_632,
    "wavemlp_b": 63_586_360,
}
RELEASED = ("t_dw", "t", "s", "m")  # WaveMLP_{T_dw,T,S,M}.pth.tar; B has no released weights

SMALL = dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 24, 32], transitions=[True] * 4, mlp_ratios=[2, 3, 2, 2])
VARIANTS = {  # every norm / mode / option the released models use, and qkv_bias
    "batch-fc": dict(norm_layer="batch", mode="fc"),
    "batch-depthwise": dict(norm_layer="batch", mode="depthwise"),
    "group-fc-no-ds-norm": dict(norm_layer="group", mode="fc", ds_use_norm=False),
    "group-depthwise-qkv-bias": dict(norm_layer="group", mode="depthwise", qkv_bias=True),
}
SIZES = [(37, 53), (3, 3), (64, 41), (29, 29)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def pair(seed: int = 0, **config) -> tuple[allmlp.WaveMLP, nn.Module]:
    """(allmlp's model, the authors' formulation) with the same random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    ours = randomise_batchnorm_stats(randomise(allmlp.WaveMLP(**{**SMALL, "num_classes": 10, **config}), seed), seed)
    reference = AUTHORS["WaveMLP"](**ours.config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def assert_outputs_close(got, expected, atol=1e-5, rtol=1e-5):
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=atol, rtol=rtol)
    else:
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fork_feat", [False, True], ids=["classifier", "fork_feat"])
def test_forward_equals_the_authors_code(variant, fork_feat):
    ours, reference = pair(**VARIANTS[variant], fork_feat=fork_feat)
    ours.eval(), reference.eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            assert_outputs_close(ours(x), reference(x))
            assert_outputs_close(ours(x * 1e-3), reference(x * 1e-3))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_mode_equals_the_authors_code(variant):
    """Batch statistics (BatchNorm in training) and the gradients, without drop rates: deterministic."""
    ours, reference = pair(**VARIANTS[variant])
    ours.train(), reference.train()
    x = torch.randn(3, 3, 45, 38, generator=torch.Generator().manual_seed(2))
    out, expected = ours(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
    buffers = dict(reference.named_buffers())
    for name, b in ours.named_buffers():  # the running statistics moved alike
        torch.testing.assert_close(b, buffers[name], atol=1e-5, rtol=1e-5, msg=name)


def test_phase_estimation_is_batchnorm_in_group_norm_models():
    model = allmlp.WaveMLP(**SMALL, norm_layer="group", mode="fc")
    attn = model.network[0][0].attn
    assert isinstance(model.network[0][0].norm1, nn.GroupNorm) and model.network[0][0].norm1.num_groups == 1
    assert isinstance(attn.theta_h_conv[1], nn.BatchNorm2d) and isinstance(attn.theta_w_conv[1], nn.BatchNorm2d)
    assert isinstance(model.norm, nn.GroupNorm)
    assert attn.fc_h.bias is None and attn.fc_c.bias is None and attn.proj.bias is not None
    assert attn.tfc_h.kernel_size == (1, 7) and attn.tfc_w.kernel_size == (7, 1)  # width, height
    assert model.network[0][0].mlp.act.approximate == "none"


def test_tfc_pairs_channels_2c_and_2c_plus_1_of_the_concatenation():
    """Channel 0's output reads the cosines of channels 0 and 1; the last channel's reads sines."""
    model = allmlp.WaveMLP(**SMALL).eval()
    attn = model.network[0][0].attn
    seen = {}
    attn.tfc_h.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    x, y = seen["x"], seen["y"]
    weight = attn.tfc_h.weight  # (C, 2, 1, 7)
    first = nn.functional.conv2d(x[:, 0:2], weight[0:1], padding=(0, 3))
    last = nn.functional.conv2d(x[:, 14:16], weight[7:8], padding=(0, 3))
    torch.testing.assert_close(y[:, 0:1], first)
    torch.testing.assert_close(y[:, 7:8], last)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_and_keys_match_the_authors_models(name):
    with torch.device("meta"):
        model = allmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    expected = published_shapes(KEYS / f"wavemlp_WaveMLP_{KEY_FILES[name.removeprefix('wavemlp_')]}_keys.txt")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("variant", RELEASED)
def test_released_layout_is_the_weights_plus_thop_counters_on_every_module(variant):
    """The released files' keys: the model's, plus a total_ops / total_params pair for every module thop visited
    (each module of the model, the model itself included), each of shape (1,)."""
    released = published_shapes(KEYS / f"wavemlp_WaveMLP_{KEY_FILES[variant]}_released_layout_keys.txt")
    with torch.device("meta"):
        model = allmlp.create_model(f"wavemlp_{variant}")
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    counters = {k: v for k, v in released.items() if k not in weights}
    assert {k: v for k, v in released.items() if k in weights} == weights
    assert all(shape == (1,) for shape in counters.values())
    assert has_thop_counters(list(released)) and not has_thop_counters(list(weights))
    owners = {k.rsplit(".", 1)[0] if "." in k else "" for k in counters}
    assert all(k.endswith((".total_ops", ".total_params")) or k in ("total_ops", "total_params") for k in counters)
    assert len(counters) == 2 * len(owners)
    module_names = {name for name, _ in model.named_modules()}
    assert owners <= module_names  # thop counted modules of the authors' model, which allmlp keeps by name


def released_file(model: nn.Module, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file like the released ones: the model's state dict and thop's float64 counters on every module."""
    state_dict = dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    for name, _ in model.named_modules():
        prefix = f"{name}." if name else ""
        state_dict[f"{prefix}total_ops"] = torch.rand(1, generator=generator, dtype=torch.float64) * 1e9
        state_dict[f"{prefix}total_params"] = torch.rand(1, generator=generator, dtype=torch.float64) * 1e6
    torch.save(state_dict, path)
    return state_dict


def test_released_layout_loads_into_a_small_model(tmp_path):
    source, reference = pair(**VARIANTS["batch-depthwise"])
    written = released_file(reference, tmp_path / "WaveMLP_small.pth.tar")
    assert sum(k.endswith("total_ops") for k in written) > 50
    model = allmlp.load_weights(allmlp.WaveMLP(**source.config), tmp_path / "WaveMLP_small.pth.tar").eval()
    x = torch.randn(1, 3, 45, 50)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


def test_only_the_thop_counters_are_dropped():
    state_dict = {
        "total_ops": torch.zeros(1, dtype=torch.float64),
        "a.total_params": torch.zeros(1, dtype=torch.float64),
        "a.weight": torch.ones(2),
        "b.total_ops": torch.zeros(3),  # not thop's one-element counter: kept, so a strict load reports it
    }
    assert drop_thop_counters(state_dict).keys() == {"a.weight", "b.total_ops"}
    model = allmlp.WaveMLP(**SMALL)
    with_extra = {**released_like(model), "network.0.0.attn.total_ops": torch.zeros(2)}
    with pytest.raises(allmlp.WeightsError, match=r"unexpected \(1\): network\.0\.0\.attn\.total_ops"):
        allmlp.load_weights(model, with_extra)
    missing = {k: v for k, v in released_like(model).items() if k != "network.2.0.attn.fc_c.weight"}
    with pytest.raises(allmlp.WeightsError, match=r"missing \(1\): network\.2\.0\.attn\.fc_c\.weight"):
        allmlp.load_weights(model, missing)


def released_like(model: nn.Module) -> dict[str, torch.Tensor]:
    state_dict = dict(model.state_dict())
    for name, _ in model.named_modules():
        state_dict[f"{name}.total_ops" if name else "total_ops"] = torch.zeros(1, dtype=torch.float64)
    return state_dict


def check_released_file_loads(variant: str, tmp_path: Path) -> None:
    """A randomised released-layout file of a registered variant loads through load_weights, create_model(weights=)
    and `allmlp convert` (recognised by names and shapes), and computes what the authors' formulation computes."""
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = allmlp.create_model(f"wavemlp_{variant}")
    # PyTorch's default init (random weights on this deep a network make the phases chaotic: cos and sin of
    # phases in the hundreds turn float32 rounding into visible differences), random BatchNorm statistics
    reference = randomise_batchnorm_stats(AUTHORS["WaveMLP"](**shapes.config), seed=1).eval()
    path = tmp_path / f"WaveMLP_{KEY_FILES[variant]}.pth.tar"
    released_file(reference, path)
    x = torch.randn(1, 3, 67, 59)
    with torch.no_grad():
        expected = reference(x)
    models = [
        allmlp.load_weights(allmlp.create_model(f"wavemlp_{variant}"), path),
        allmlp.create_model(f"wavemlp_{variant}", weights=path),
        convert(path, tmp_path / "converted.safetensors"),
        allmlp.create_model(tmp_path / "converted.safetensors"),
    ]
    assert models[2].config == shapes.config
    for model in models:
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=1e-4, rtol=1e-4)


def test_released_t_dw_file_loads_everywhere(tmp_path):
    check_released_file_loads("t_dw", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["t", "s", "m"])
def test_released_files_load_everywhere(variant, tmp_path):
    check_released_file_loads(variant, tmp_path)


def test_convert_recognises_a_dense_prediction_backbone(tmp_path):
    backbone = allmlp.create_model("wavemlp_t", fork_feat=True)
    torch.save(backbone.state_dict(), tmp_path / "t_feat.pth")
    converted = convert(tmp_path / "t_feat.pth", tmp_path / "t_feat.safetensors")
    assert converted.config == backbone.config and converted.fork_feat


def test_fork_feat_pyramid_and_norm_names():
    with torch.device("meta"):
        model = allmlp.create_model("wavemlp_m", fork_feat=True)
        maps = model(torch.empty(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 56, 56), (128, 28, 28), (320, 14, 14), (512, 7, 7)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    norms = {name: type(m) for name, m in model.named_children() if name.startswith("norm")}
    assert sorted(norms) == ["norm", "norm0", "norm2", "norm4", "norm6"] and norms["norm"] is nn.Identity
    assert all(issubclass(kind, nn.GroupNorm) for name, kind in norms.items() if name != "norm")
    with pytest.raises(ValueError, match="fork_feat=True"):
        model.reset_classifier(3)


def test_features_only_strides_and_any_input_size():
    model = allmlp.create_model("wavemlp_t", features_only=True, layers=[1, 1, 1, 1]).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for size in ((3, 3), (97, 50)):
        with torch.no_grad():
            maps = model(torch.randn(1, 3, *size))
        assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
        grid = [(side - 3) // 4 + 1 for side in size]  # the stem: 7x7 stride 4 padding 2; then ceil halves
        for i, m in enumerate(maps):
            assert list(m.shape[2:]) == grid, i
            grid = [-(-side // 2) for side in grid]


def test_interface_and_input_errors():
    model, _ = pair()
    model.eval()
    x = torch.randn(2, 3, 50, 35)
    features = model.forward_features(x)
    assert features.shape == (2, 2, 2, 32) and features.is_contiguous()
    assert torch.equal(model(x), model.forward_head(features))
    with pytest.raises(ValueError, match=r"WaveMLP expects input of shape \(B, 3, H, W\).*got \(2, 1, 50, 35\)"):
        model(torch.randn(2, 1, 50, 35))
    with pytest.raises(ValueError, match=r"H, W >= 3, got \(1, 3, 2, 40\)"):
        model(torch.randn(1, 3, 2, 40))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_layer="layer"), r"norm_layer must be one of 'batch', 'group', got 'layer'"),
        (dict(norm_layer=nn.BatchNorm2d), r"norm_layer must be one of 'batch', 'group', got <class"),
        (dict(mode="conv"), r"mode must be one of 'fc', 'depthwise', got 'conv'"),
        (dict(transitions=[True, False, True, True]), r"stage 1 changes the width \(16 -> 24\) without a transition"),
        (dict(mlp_ratios=[2, 2]), r"mlp_ratios needs one entry per stage \(4 stages\)"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(layers=[1, 0, 1, 1]), "layers must be a non-empty list of block counts >= 1"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        allmlp.WaveMLP(**{**SMALL, **overrides})


def test_safetensors_round_trip(tmp_path):
    model, _ = pair(**VARIANTS["group-fc-no-ds-norm"], fork_feat=True)
    model.eval()
    path = allmlp.save_weights(model, tmp_path / "wave.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is allmlp.WaveMLP and again.config == model.config and again.fork_feat
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for a, b in zip(again(x), model(x), strict=True):
            assert torch.equal(a, b)


def test_authors_init():
    model = allmlp.WaveMLP(**SMALL, num_classes=10)
    assert torch.count_nonzero(model.head.bias) == 0 and 0.015 < model.head.weight.std() < 0.025
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            assert module.eps == 1e-5 and torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_drop_rate_is_recorded_but_unused_as_in_the_authors_code():
    model, _ = pair(drop_rate=0.5)
    model.train()
    x = torch.randn(2, 3, 33, 33)
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)  # no dropout anywhere without drop path
    assert model.config["drop_rate"] == 0.5


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model, _ = pair(drop_path_rate=0.3)
    assert_checkpointing_changes_nothing(model.train(), torch.randn(2, 3, 41, 39), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["batch-fc", "group-depthwise-qkv-bias"])
def test_bfloat16_forward_is_close_to_float32(variant):
    model, _ = pair(**VARIANTS[variant])
    model.eval()
    x = torch.randn(2, 3, 45, 45)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1 * expected.abs().max().item(), rtol=0.05)


def test_torch_export_runs_at_other_sizes():
    from torch.export import Dim

    model, _ = pair(**VARIANTS["group-fc-no-ds-norm"])
    model.eval()
    dynamic = {0: Dim("batch", min=1, max=16), 2: Dim("height", min=35, max=256), 3: Dim("width", min=35, max=256)}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=(dynamic,))
    exported = program.module()
    for shape in ((1, 3, 35, 35), (3, 3, 61, 90)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("variant", ["batch-depthwise", "group-fc-no-ds-norm"])
def test_onnx_export_reproduces_pytorch(tmp_path, dynamo, variant):
    model, _ = pair(**VARIANTS[variant], layers=[1, 1, 1, 1])
    model.eval()
    x = torch.randn(2, 3, 29, 38)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)
