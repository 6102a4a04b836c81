"""gMLP and gMixer against timm's implementation (tests/reference/gmlp.py), timm's released layouts, registry,
init, export and errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import allmlp
from allmlp.models.gmlp import GluMlp, SpatialGatingUnit
from allmlp.tools.convert import convert, is_timm_mixer
from allmlp.weights.timm_families import is_timm_resmlp

from helpers import onnx_outputs, randomise
from reference.gmlp import AUTHORS

PUBLISHED_PARAMS = {
    "gmlp_ti16_224": 5_867_328,
    "gmlp_s16_224": 19_422_656,
    "gmlp_b16_224": 73_075_392,
    "gmixer_12_224": 12_701_080,
    "gmixer_24_224": 24_721_096,
}
SMALL = {
    "GMLP": dict(img_size=32, patch_size=8, embed_dim=16, num_blocks=2, mlp_ratio=3, num_classes=10),
    "GMixer": dict(img_size=32, patch_size=8, embed_dim=16, num_blocks=2, mlp_ratio=[1.0, 4.0], num_classes=10),
}
CLASSES = {"GMLP": allmlp.GMLP, "GMixer": allmlp.GMixer}
ARCHITECTURES = pytest.mark.parametrize("architecture", sorted(SMALL))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def pair(architecture: str, **overrides):
    """(allmlp model, timm's) with the same random weights, timm's loaded strictly into ours."""
    config = {**SMALL[architecture], **overrides}
    torch.manual_seed(0)
    theirs = randomise(AUTHORS[architecture](**config), seed=7).eval()
    ours = CLASSES[architecture](**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def size_of(config: dict) -> tuple[int, int]:
    size = config["img_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_registered_variants_have_the_published_sizes_and_timm_keys(name):
    import timm

    with torch.device("meta"):
        model = allmlp.create_model(name)
        theirs = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    assert model.pretrained_cfg["first_conv"] == "stem.proj"


@ARCHITECTURES
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(img_size=(32, 48)),
        dict(img_size=(36, 20), patch_size=(6, 4)),
        dict(num_blocks=3, embed_dim=24),
        dict(global_pool=""),
        dict(num_classes=0),
    ],
)
def test_forward_equals_timm(architecture, overrides):
    ours, theirs = pair(architecture, **overrides)
    config = {**SMALL[architecture], **overrides}
    x = torch.randn(3, 3, *size_of(config), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for scale in (1.0, 1e-3):
            torch.testing.assert_close(ours(x * scale), theirs(x * scale), atol=1e-5, rtol=1e-5)
        for norm in (False, True):
            final, maps = ours.forward_intermediates(x, norm=norm)
            final_t, maps_t = theirs.forward_intermediates(x, norm=norm)
            torch.testing.assert_close(final, final_t, atol=1e-5, rtol=1e-5)
            for a, b in zip(maps, maps_t, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ours.train(), theirs.train()  # no dropout or drop path: training mode computes the same
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@ARCHITECTURES
def test_interface_equals_timm(architecture):
    ours, theirs = pair(architecture)
    assert ours.feature_info == theirs.feature_info
    assert ours.group_matcher() == theirs.group_matcher()
    assert ours.num_features == theirs.num_features


@pytest.mark.parametrize("name", ["gmlp_s16_224", "gmixer_24_224"])
def test_timm_released_layout_loads_every_way(tmp_path, name):
    """timm's published weights (safetensors on the hub, a plain .pth on GitHub) load by every route; `allmlp
    convert` recognises the variant by its names and shapes (not as an MLP-Mixer, whose names gMixer shares)."""
    import timm

    theirs = randomise(timm.create_model(name), seed=4).eval()
    state_dict = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert not is_timm_mixer(state_dict) and not is_timm_resmlp(list(state_dict))
    save_file(state_dict, tmp_path / "model.safetensors")
    torch.save(state_dict, tmp_path / "model.pth")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(x)
    entry = allmlp.get_entry(name)
    loaded = allmlp.load_weights(allmlp.create_model(name), tmp_path / "model.safetensors")
    created = allmlp.create_model(name, weights=tmp_path / "model.pth")
    converted = convert(tmp_path / "model.pth", tmp_path / "converted.safetensors")
    rebuilt = allmlp.create_model(tmp_path / "converted.safetensors")
    for model in (loaded, created, converted, rebuilt):
        assert type(model) is entry.architecture
        assert model.config["num_blocks"] == entry.config["num_blocks"]
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_convert_still_takes_timm_mixer_files_for_mixer(tmp_path):
    from timm.models.mlp_mixer import MlpMixer

    mixer = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
    assert is_timm_mixer(mixer.state_dict()) and not is_timm_resmlp(list(mixer.state_dict()))
    torch.save(mixer.state_dict(), tmp_path / "mixer.pth")
    model = convert(tmp_path / "mixer.pth", tmp_path / "mixer.safetensors")
    assert type(model) is allmlp.MlpMixer and model.config["gelu"] == "erf"
    gmixer, _ = pair("GMixer")
    assert not is_timm_mixer(gmixer.state_dict())


def test_registry_entries():
    for name in PUBLISHED_PARAMS:
        entry = allmlp.get_entry(name)
        assert entry.preprocessing.interpolation == "bicubic" and entry.preprocessing.crop_pct == 0.875
    # timm's gMLP weights expect pixels in [-1, 1], gMixer's ImageNet mean / std (timm's default_cfgs)
    assert allmlp.get_entry("gmlp_s16_224").preprocessing.mean == (0.5, 0.5, 0.5)
    assert allmlp.get_entry("gmixer_24_224").preprocessing.mean == (0.485, 0.456, 0.406)
    s16 = {r.tag: r for r in allmlp.get_entry("gmlp_s16_224").releases}
    assert s16["ra3_in1k"].url == "https://huggingface.co/timm/gmlp_s16_224.ra3_in1k/resolve/main/model.safetensors"
    assert s16["ra3_in1k"].top1 == 79.652 and s16["ra3_in1k_github"].url.endswith("gmlp_s16_224_raa-10536d42.pth")
    g24 = {r.tag: r for r in allmlp.get_entry("gmixer_24_224").releases}
    assert g24["ra3_in1k"].top1 == 78.048 and g24["ra3_in1k_github"].url.endswith("gmixer_24_224_raa-7daf7ae6.pth")
    for name in ("gmlp_ti16_224", "gmlp_b16_224", "gmixer_12_224"):
        assert allmlp.get_entry(name).releases == ()
    assert "2105.08050" in allmlp.get_entry("gmlp_b16_224").paper


def test_init_as_timm_and_the_paper():
    torch.manual_seed(0)
    model = allmlp.GMLP(**SMALL["GMLP"])
    for module in model.modules():
        if isinstance(module, SpatialGatingUnit):  # the paper: weights near zero, bias 1 (gate starts as identity)
            assert torch.all(module.proj.bias == 1) and module.proj.weight.abs().max() < 1e-5
            assert module.proj.weight.std() > 1e-7
            assert module.norm.eps == 1e-5
    assert model.blocks[0].norm.eps == model.norm.eps == 1e-6
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.blocks[0].mlp_channels.fc1.bias.abs().max() < 1e-5  # N(0, 1e-6)
    mixer = allmlp.GMixer(**SMALL["GMixer"])
    glu = mixer.blocks[1].mlp_channels
    assert isinstance(glu, GluMlp) and isinstance(glu.act, torch.nn.SiLU)
    half = glu.fc1.weight.shape[0] // 2
    assert torch.all(glu.fc1.bias[half:] == 1) and glu.fc1.weight[half:].abs().max() < 1e-5
    assert glu.fc1.weight[:half].abs().max() > 1e-2  # xavier-uniform
    assert [b.drop_path.rate for b in allmlp.GMLP(**SMALL["GMLP"], drop_path_rate=0.1).blocks] == [0.1, 0.1]


@pytest.mark.parametrize(
    "architecture, overrides, message",
    [
        ("GMLP", dict(mlp_ratio=3, embed_dim=9), r"mlp_ratio must be a number giving an even hidden width"),
        ("GMLP", dict(num_blocks=0), "num_blocks must be a positive int, got 0"),
        ("GMixer", dict(mlp_ratio=[1.0]), r"mlp_ratio must be a number or a \(tokens, channels\) pair"),
        ("GMixer", dict(proj_drop_rate=1.5), r"proj_drop_rate must be a number in \[0, 1\)"),
        ("GMixer", dict(patch_size=0), "patch_size must be a positive int"),
        ("GMLP", dict(global_pool="token"), "global_pool must be 'avg'"),
    ],
)
def test_bad_configs(architecture, overrides, message):
    with pytest.raises(ValueError, match=message):
        CLASSES[architecture](**{**SMALL[architecture], **overrides})


@ARCHITECTURES
def test_wrong_input_is_a_clear_error(architecture):
    model = CLASSES[architecture](**SMALL[architecture])
    with pytest.raises(
        ValueError, match=rf"{architecture} expects input of shape \(B, 3, 32, 32\).*got \(2, 3, 32, 40\)"
    ):
        model(torch.randn(2, 3, 32, 40))


@ARCHITECTURES
def test_safetensors_round_trip(tmp_path, architecture):
    model, _ = pair(architecture, img_size=(32, 40), drop_path_rate=0.1)
    path = allmlp.save_weights(model, tmp_path / "model.safetensors")
    again = allmlp.create_model(path).eval()
    assert type(again) is CLASSES[architecture] and again.config == model.config
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@ARCHITECTURES
def test_bfloat16_forward_is_close_to_float32(architecture):
    model, _ = pair(architecture, embed_dim=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


@ARCHITECTURES
def test_exported_program_reproduces_pytorch(architecture):
    model, _ = pair(architecture, img_size=(32, 40))
    x = torch.randn(2, 3, 32, 40)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@ARCHITECTURES
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_reproduces_pytorch(tmp_path, architecture, dynamo):
    model, _ = pair(architecture, img_size=(32, 40))
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_outputs(model, x, tmp_path / "m.onnx", dynamo), expected, atol=1e-4, rtol=1e-4)
