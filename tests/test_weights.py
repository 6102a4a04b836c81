"""Every Mixer weight format: timm state dicts, the official JAX .npz, allmlp safetensors; hostile files."""

import argparse
import datetime
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import allmlp
from allmlp.cli import main as cli
from allmlp.models.mixer import CONFIGS, MlpMixer
from allmlp.weights import WeightsError

from helpers import fake_yacs_module, randomise, tiny_mixer

OFFICIAL_B16 = Path(__file__).parent / "data" / "official_mixer_b16_params.txt"


def official_layout(path: Path = OFFICIAL_B16) -> dict[str, tuple[int, ...]]:
    """Names and shapes exactly as listed for the released Mixer-B_16.npz (file order kept)."""
    layout = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip()).groups()
        layout[name] = tuple(int(d) for d in shape.replace(" ", "").split(",") if d)
    return layout


def random_official_arrays(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in layout.items():
        if name.endswith("scale"):
            array = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            array = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:
            array = 0.1 * rng.standard_normal(shape)
        arrays[name] = array.astype(np.float32)
    return arrays


def numpy_mixer_forward(p: dict[str, np.ndarray], images_nhwc: np.ndarray) -> np.ndarray:
    """The official Flax MlpMixer, written independently in NumPy (float64): tanh GELU, LayerNorm eps 1e-6."""

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def mlp(x, prefix):
        hidden = gelu(x @ p[f"{prefix}/Dense_0/kernel"] + p[f"{prefix}/Dense_0/bias"])
        return hidden @ p[f"{prefix}/Dense_1/kernel"] + p[f"{prefix}/Dense_1/bias"]

    p = {k: v.astype(np.float64) for k, v in p.items()}
    kernel = p["stem/kernel"]  # HWIO
    ph, pw, cin, cout = kernel.shape
    b, h, w, _ = images_nhwc.shape
    patches = images_nhwc.reshape(b, h // ph, ph, w // pw, pw, cin).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(b, (h // ph) * (w // pw), ph * pw * cin) @ kernel.reshape(-1, cout) + p["stem/bias"]
    blocks = sorted({int(k.split("/")[0].split("_")[1]) for k in p if k.startswith("MixerBlock_")})
    for i in blocks:
        y = layer_norm(x, f"MixerBlock_{i}/LayerNorm_0").transpose(0, 2, 1)
        x = x + mlp(y, f"MixerBlock_{i}/token_mixing").transpose(0, 2, 1)
        x = x + mlp(layer_norm(x, f"MixerBlock_{i}/LayerNorm_1"), f"MixerBlock_{i}/channel_mixing")
    x = layer_norm(x, "pre_head_layer_norm").mean(1)
    return x @ p["head/kernel"] + p["head/bias"]


@pytest.fixture(scope="module")
def official_b16(tmp_path_factory):
    arrays = random_official_arrays(official_layout())
    path = tmp_path_factory.mktemp("official") / "Mixer-B_16.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_official_layout_file_is_the_released_b16():
    layout = official_layout()
    assert len(layout) == 150
    assert sum(int(np.prod(s)) for s in layout.values()) == 59_880_472
    assert list(layout)[:2] == ["MixerBlock_0/LayerNorm_0/bias", "MixerBlock_0/LayerNorm_0/scale"]


def test_official_npz_equals_independent_numpy_forward(official_b16):
    path, arrays = official_b16
    model = allmlp.create_model("mixer_b16_224", weights=path).eval()
    images = np.random.default_rng(1).uniform(-1, 1, (2, 224, 224, 3))
    expected = numpy_mixer_forward(arrays, images)
    with torch.no_grad():
        exact = model.double()(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
        np.testing.assert_allclose(exact, expected, rtol=1e-9, atol=1e-9)
        single = model.float()(torch.from_numpy(images.transpose(0, 3, 1, 2)).float()).numpy()
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_official_npz_every_array_lands_transposed(official_b16):
    _, arrays = official_b16
    state = allmlp.create_model("mixer_b16_224", weights=dict(arrays)).state_dict()
    assert torch.equal(state["stem.proj.weight"], torch.from_numpy(arrays["stem/kernel"]).permute(3, 2, 0, 1))
    # Block 10 sorts between 1 and 2 in the file: the index must be parsed, not enumerated.
    assert torch.equal(
        state["blocks.10.mlp_tokens.fc1.weight"],
        torch.from_numpy(arrays["MixerBlock_10/token_mixing/Dense_0/kernel"].T),
    )
    assert torch.equal(
        state["blocks.2.mlp_channels.fc2.weight"],
        torch.from_numpy(arrays["MixerBlock_2/channel_mixing/Dense_1/kernel"].T),
    )
    assert torch.equal(state["blocks.11.norm2.weight"], torch.from_numpy(arrays["MixerBlock_11/LayerNorm_1/scale"]))
    assert torch.equal(state["norm.bias"], torch.from_numpy(arrays["pre_head_layer_norm/bias"]))
    assert torch.equal(state["head.weight"], torch.from_numpy(arrays["head/kernel"].T))


def scaled_layout(variant: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The released layout of another variant, derived from the B/16 listing by its Table 1 dimensions."""
    cfg = CONFIGS[variant]
    tokens = (224 // cfg["patch_size"]) ** 2
    c, ds, dc, p = cfg["hidden_dim"], cfg["tokens_mlp_dim"], cfg["channels_mlp_dim"], cfg["patch_size"]
    sizes = {768: c, 384: ds, 3072: dc, 196: tokens, 1000: num_classes}
    layout = {}
    for name, shape in official_layout().items():
        block = re.match(r"MixerBlock_(\d+)/", name)
        if block and int(block[1]) > 0:
            continue
        layout[name] = (p, p, 3, c) if name == "stem/kernel" else tuple(sizes.get(d, d) for d in shape)
    for i in range(1, cfg["num_blocks"]):
        for name, shape in list(layout.items()):
            if name.startswith("MixerBlock_0/"):
                layout[name.replace("MixerBlock_0/", f"MixerBlock_{i}/")] = shape
    return layout


@pytest.mark.parametrize(
    "variant, num_classes",
    [("s32", 1000), ("s16", 1000), ("s8", 1000), ("b32", 1000), ("b16", 21843), ("l16", 1000), ("l16", 21843)],
)
def test_every_released_set_maps_onto_its_registered_model(variant, num_classes):
    layout = scaled_layout(variant, num_classes)
    arrays = {name: np.zeros(shape, np.float32) for name, shape in layout.items()}
    state_dict, _ = allmlp.weights.read_state_dict(arrays)
    with torch.device("meta"):
        model = allmlp.create_model(f"mixer_{variant}_224", num_classes=num_classes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected


@pytest.mark.parametrize("name", ["mixer_s32_224", "mixer_b16_224"])
def test_timm_state_dict_gives_identical_logits(name, tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.02)
        peer.head.bias.normal_(0, 1)  # a non-zero head, unlike the reference init
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = peer(x)
    path = tmp_path / "timm.pth"
    torch.save(peer.state_dict(), path)
    model = allmlp.create_model(name, gelu="erf", weights=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "wrap, suffix",
    [
        ("bare", ".pth"),
        ("model", ".pth"),
        ("state_dict", ".bin"),
        ("module_prefix", ".pth"),
        ("bare", ".safetensors"),
        ("module_prefix", ".safetensors"),
    ],
)
def test_timm_files_bare_or_wrapped(wrap, suffix, tmp_path):
    peer = timm.create_model("mixer_s32_224", pretrained=False, num_classes=7, img_size=64)
    state = peer.state_dict()
    if wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state if wrap in ("bare", "module_prefix") else {wrap: state, "epoch": 3}, path)
    model = allmlp.create_model("mixer_s32_224", num_classes=7, img_size=64, gelu="erf")
    allmlp.load_weights(model, path)
    for key, value in peer.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def tiny(**overrides):
    config = dict(
        img_size=32, patch_size=8, num_classes=10, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32
    )
    torch.manual_seed(0)
    model = MlpMixer(**{**config, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_safetensors_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = tiny(img_size=(32, 48), gelu="erf").eval()
    path = tmp_path / "model.safetensors"
    allmlp.save_weights(model, path)
    rebuilt = allmlp.create_model(path).eval()
    assert rebuilt.config == model.config
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert allmlp.create_model(str(path), num_classes=4).head.weight.abs().sum() == 0


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    allmlp.save_weights(tiny(), path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("allmlp.weights.files.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        allmlp.save_weights(tiny(num_classes=3), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_head_of_another_size_needs_reset_head(tmp_path):
    path = tmp_path / "ten.safetensors"
    source = tiny()
    allmlp.save_weights(source, path)
    with pytest.raises(allmlp.WeightsError, match="the checkpoint has 10 classes, the model 3; pass reset_head=True"):
        allmlp.load_weights(tiny(num_classes=3), path)
    model = allmlp.load_weights(tiny(num_classes=3), path, reset_head=True)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert torch.equal(model.blocks[1].mlp_tokens.fc1.weight, source.blocks[1].mlp_tokens.fc1.weight)
    same_size = allmlp.load_weights(tiny(), path, reset_head=True)
    assert same_size.head.weight.abs().sum() == 0
    features = allmlp.load_weights(tiny(num_classes=0), path)  # a headless model ignores the head
    assert torch.equal(features.norm.weight, source.norm.weight)


def test_missing_unexpected_and_misshaped_keys_in_one_error():
    state = tiny().state_dict()
    del state["blocks.1.norm1.weight"]
    state["blocks.7.extra"] = torch.zeros(1)
    state["blocks.0.mlp_tokens.fc1.weight"] = torch.zeros(8, 99)
    with pytest.raises(allmlp.WeightsError) as err:
        allmlp.load_weights(tiny(), state)
    message = str(err.value)
    assert "mis-shaped (1): blocks.0.mlp_tokens.fc1.weight (checkpoint (8, 99), model (8, 16))" in message
    assert "missing (1): blocks.1.norm1.weight" in message
    assert "unexpected (1): blocks.7.extra" in message
    assert "adapt_resolution" in message
    loose = allmlp.load_weights(tiny(), {k: v for k, v in tiny().state_dict().items() if "norm" not in k}, strict=False)
    assert isinstance(loose, MlpMixer)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(allmlp.WeightsError, match="never unpickled|refused"):
        allmlp.load_weights(tiny(), path)
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(allmlp.WeightsError):
        allmlp.load_weights(tiny(), legacy)
    assert not marker.exists()


def test_npz_with_object_arrays_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"stem/kernel": np.array([object()], dtype=object)})
    with pytest.raises(allmlp.WeightsError, match="pickled object arrays"):
        allmlp.load_weights(tiny(), path)


def test_corrupt_and_unknown_files_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    allmlp.save_weights(tiny(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(allmlp.WeightsError, match="truncated.safetensors"):
        allmlp.load_weights(tiny(), truncated)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(allmlp.WeightsError, match="unrecognised weight file"):
        allmlp.load_weights(tiny(), junk)
    with pytest.raises(allmlp.WeightsError, match="not found"):
        allmlp.load_weights(tiny(), tmp_path / "missing.pth")
    stray = tmp_path / "stray.npz"
    np.savez(
        stray, **{"stem/kernel": np.zeros((8, 8, 3, 16), np.float32), "MixerBlock_0/Attention/kernel": np.zeros(2)}
    )
    with pytest.raises(allmlp.WeightsError, match="belong to no Mixer parameter.*MixerBlock_0/Attention/kernel"):
        allmlp.load_weights(tiny(), stray)


def test_convert_command_npz_to_safetensors(official_b16, tmp_path, capsys):
    path, arrays = official_b16
    out = tmp_path / "b16.safetensors"
    assert cli(["convert", str(path), str(out)]) == 0
    model = allmlp.create_model(out)
    assert model.config["gelu"] == "tanh" and model.config["num_blocks"] == 12 and model.num_tokens == 196
    reference = allmlp.create_model("mixer_b16_224", weights=path)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_convert_command_timm_file_with_and_without_model_name(tmp_path, capsys):
    peer = timm.create_model("mixer_s32_224", pretrained=False, num_classes=5)
    src = tmp_path / "timm.pth"
    torch.save({"state_dict": peer.state_dict()}, src)
    assert cli(["convert", str(src), str(tmp_path / "a.safetensors")]) == 0
    inferred = allmlp.create_model(tmp_path / "a.safetensors")
    assert inferred.config["gelu"] == "erf" and inferred.num_classes == 5
    assert cli(["convert", str(src), str(tmp_path / "b.safetensors"), "--model", "mixer_s32_224"]) == 0
    named = allmlp.create_model(tmp_path / "b.safetensors")
    assert named.config == {**inferred.config, "gelu": "tanh"}
    assert cli(["convert", str(src), str(tmp_path / "c.safetensors"), "--model", "mixer_b16_224"]) == 2
    assert "mis-shaped" in capsys.readouterr().err


# ---------------------------------------------------------------- a 3-channel stem into another in_chans


@pytest.mark.parametrize("in_chans", [1, 2, 4, 5, 6, 7])
def test_adapt_stem_matches_timm(in_chans):
    from timm.models._manipulate import adapt_input_conv

    rgb = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(in_chans))
    torch.testing.assert_close(allmlp.weights.adapt_stem(rgb, in_chans), adapt_input_conv(in_chans, rgb.clone()))
    half = allmlp.weights.adapt_stem(rgb.half(), in_chans)
    assert half.dtype == torch.float16 and half.shape == (16, in_chans, 8, 8)


def test_adapt_stem_sums_or_repeats_and_scales():
    rgb = torch.randn(4, 3, 2, 2)
    assert torch.equal(allmlp.weights.adapt_stem(rgb, 1), rgb.sum(1, keepdim=True))
    torch.testing.assert_close(allmlp.weights.adapt_stem(rgb, 2), rgb[:, :2] * 1.5)
    torch.testing.assert_close(allmlp.weights.adapt_stem(rgb, 5), torch.cat([rgb, rgb[:, :2]], 1) * 0.6)
    with pytest.raises(allmlp.WeightsError, match=r"only a 3-channel stem .* got \(4, 1, 2, 2\)"):
        allmlp.weights.adapt_stem(rgb[:, :1], 2)


def grey_equals_rgb(model_grey, model_rgb, x_grey):
    """A 1-channel model on x gives what the RGB model gives on (x, x, x): summed filters are linear in x."""
    with torch.no_grad():
        torch.testing.assert_close(model_grey(x_grey), model_rgb(x_grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def official_arrays(model: MlpMixer) -> dict[str, np.ndarray]:
    """A Mixer's weights under the official .npz names and layouts (HWIO stem, (in, out) Dense kernels)."""
    modules = {
        "norm1": "LayerNorm_0",
        "mlp_tokens.fc1": "token_mixing/Dense_0",
        "mlp_tokens.fc2": "token_mixing/Dense_1",
        "norm2": "LayerNorm_1",
        "mlp_channels.fc1": "channel_mixing/Dense_0",
        "mlp_channels.fc2": "channel_mixing/Dense_1",
        "stem.proj": "stem",
        "norm": "pre_head_layer_norm",
        "head": "head",
    }
    arrays = {}
    for key, value in model.state_dict().items():
        module, _, param = key.rpartition(".")
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        name = f"MixerBlock_{block[1]}/{modules[block[2]]}" if block else modules[module]
        if param == "weight" and value.ndim > 1:
            param, value = "kernel", value.permute(2, 3, 1, 0) if value.ndim == 4 else value.T
        elif param == "weight":
            param = "scale"
        arrays[f"{name}/{param}"] = value.numpy().copy()
    return arrays


def test_official_npz_into_one_channel_mixer(tmp_path, caplog):
    rgb = tiny(gelu="tanh").eval()
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **official_arrays(rgb))
    with caplog.at_level("INFO", logger="allmlp.weights"):
        grey = allmlp.load_weights(tiny(gelu="tanh", in_chans=1), path).eval()
    assert "stem.proj.weight: the 3-channel (RGB) stem adapted to in_chans=1 (RGB filters summed)" in caplog.text
    torch.testing.assert_close(grey.stem.proj.weight, rgb.stem.proj.weight.sum(1, keepdim=True))
    rgb_state = rgb.state_dict()
    assert all(torch.equal(v, rgb_state[k]) for k, v in grey.state_dict().items() if k != "stem.proj.weight")
    grey_equals_rgb(grey, rgb, torch.randn(2, 1, 32, 32))


def test_create_model_adapts_the_stem_of_its_weights(tmp_path):
    rgb = tiny(gelu="tanh")
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **official_arrays(rgb))
    small = dict(img_size=32, patch_size=8, num_classes=10, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8)
    grey = allmlp.create_model("mixer_s32_224", channels_mlp_dim=32, in_chans=1, weights=path, **small)
    torch.testing.assert_close(grey.stem.proj.weight, rgb.stem.proj.weight.sum(1, keepdim=True))
    assert torch.equal(grey.stem.proj.bias, rgb.stem.proj.bias)  # the bias does not depend on the channels


def test_timm_file_into_two_and_six_channel_mixers(tmp_path):
    from timm.models._manipulate import adapt_input_conv
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    peer = TimmMixer(num_classes=7, img_size=32, patch_size=8, embed_dim=16, num_blocks=2, mlp_ratio=(0.5, 2.0))
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": peer.state_dict()}, path)
    two = allmlp.load_weights(tiny(num_classes=7, gelu="erf", in_chans=2), path)
    assert torch.equal(two.stem.proj.weight, adapt_input_conv(2, peer.stem.proj.weight.detach().clone()))
    six = allmlp.load_weights(tiny(num_classes=7, gelu="erf", in_chans=6), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # filters repeated twice at half weight: (x, x) gives what the RGB model gives on x
        torch.testing.assert_close(six(torch.cat([x, x], 1)), peer.eval()(x), rtol=1e-4, atol=1e-4)


def authors_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """allmlp CycleMLP weights as the authors' checkpoints hold them: with every Cycle FC's offset buffer."""
    from allmlp.weights.authors import cycle_offsets

    layout = dict(state_dict)
    for key, value in state_dict.items():
        for fc, kernel in (("sfc_h", (1, 3)), ("sfc_w", (3, 1))):
            if key.endswith(f".{fc}.weight"):
                layout[key.replace(".weight", ".offset")] = cycle_offsets(value.shape[1], kernel)
    return layout


@pytest.mark.parametrize("family", ["cyclemlp", "vip"])
def test_authors_checkpoints_into_a_one_channel_model(family, tmp_path):
    if family == "cyclemlp":
        config = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2], transitions=[True] * 4)
        build, size = allmlp.CycleMLP, 64
    else:
        config = dict(layers=[1, 1], img_size=28, patch_size=7, embed_dims=[16, 32], transitions=[True, False],
                      segment_dim=[4, 2], mlp_ratios=[2, 2])  # fmt: skip
        build, size = allmlp.VisionPermutator, 28
    torch.manual_seed(0)
    rgb = build(num_classes=10, **config).eval()
    with torch.no_grad():
        for p in rgb.parameters():
            p.normal_(0, 0.1)
    state = authors_layout(rgb.state_dict()) if family == "cyclemlp" else rgb.state_dict()
    assert any(k.endswith("sfc_h.offset") for k in state) == (family == "cyclemlp")
    path = tmp_path / "authors.pth"
    torch.save({"model": state, "epoch": 299}, path)
    grey = allmlp.load_weights(build(num_classes=10, in_chans=1, **config), path).eval()
    assert grey.pretrained_cfg["first_conv"] == "patch_embed.proj"
    torch.testing.assert_close(grey.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
    grey_equals_rgb(grey, rgb, torch.randn(2, 1, size, size))


def test_allmlp_safetensors_into_a_one_channel_model_and_by_create_model(tmp_path):
    source = tiny(gelu="erf").eval()
    path = tmp_path / "rgb.safetensors"
    allmlp.save_weights(source, path)
    grey = allmlp.create_model(path, in_chans=1).eval()
    assert grey.config["in_chans"] == 1 and grey.pretrained_cfg["input_size"] == (1, 32, 32)
    grey_equals_rgb(grey, source, torch.randn(2, 1, 32, 32))
    # the adapted model saves as what it is now: a 1-channel model, rebuilt from its file without adaptation
    allmlp.save_weights(grey, tmp_path / "grey.safetensors")
    again = allmlp.create_model(tmp_path / "grey.safetensors")
    assert torch.equal(again.stem.proj.weight, grey.stem.proj.weight)


def test_only_an_rgb_stem_is_adapted_and_other_mismatches_stay_errors():
    grey_state = tiny(in_chans=1).state_dict()
    with pytest.raises(allmlp.WeightsError) as err:  # 1 -> 3 channels is not an adaptation timm or allmlp makes
        allmlp.load_weights(tiny(), grey_state)
    assert "stem.proj.weight (checkpoint (16, 1, 8, 8), model (16, 3, 8, 8))" in str(err.value)
    assert "only a 3-channel (RGB) stem with the model's filter count and kernel size" in str(err.value)
    other_kernel = r"stem.proj.weight \(checkpoint \(16, 3, 8, 8\), model \(16, 1, 4, 4\)"
    with pytest.raises(allmlp.WeightsError, match=other_kernel):
        allmlp.load_weights(tiny(in_chans=1, patch_size=4), tiny().state_dict())
    wider = tiny().state_dict()
    wider["blocks.0.norm1.weight"] = torch.ones(17)  # the stem adapts, every other shape is still checked
    with pytest.raises(allmlp.WeightsError, match=r"mis-shaped \(1\): blocks.0.norm1.weight"):
        allmlp.load_weights(tiny(in_chans=1), wider)


def test_refused_pickles_do_not_repeat_torchs_advice_to_load_unsafely(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(1)}, "payload": _Exploit(tmp_path / "pwned")}, path)
    with pytest.raises(allmlp.WeightsError) as error:
        allmlp.load_weights(tiny(), path)
    message = str(error.value)
    assert "never unpickled" in message and "GLOBAL" in message
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message


def test_a_huge_or_cut_safetensors_header_is_reported_as_such(tmp_path):
    import struct

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 200_000_000) + b"{" + b" " * 200_000_000)
    with pytest.raises(allmlp.WeightsError, match=r"safetensors header of 200,000,000 bytes, more than"):
        allmlp.load_weights(tiny(), huge)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 10**12) + b'{"a": 1}')
    with pytest.raises(allmlp.WeightsError, match=r"header claims 1,000,000,000,000 bytes, but the file has 16"):
        allmlp.load_weights(tiny(), cut)


def test_configs_pickled_beside_the_weights_are_read_as_data(tmp_path, monkeypatch):
    """AS-MLP's yacs config and DeiT's argparse.Namespace load without their code; the weights come out."""
    model = tiny_mixer()
    CfgNode = fake_yacs_module(monkeypatch)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "as_mlp", "DEPTHS": [2, 2, 6, 2]}), "BASE_LR": 1e-3})
    args = argparse.Namespace(model="hire_mlp_tiny", lr=5e-4, model_ema=True)
    torch.save({"model": model.state_dict(), "config": config, "args": args, "epoch": 299}, tmp_path / "ckpt.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    loaded = allmlp.load_weights(tiny_mixer(), tmp_path / "ckpt.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


class Innocent:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("extra", [Innocent(), datetime.date(2021, 5, 4), types.SimpleNamespace(a=1)])
def test_other_pickled_types_are_refused_by_name(tmp_path, extra, capsys):
    torch.save({"model": tiny_mixer().state_dict(), "args": extra}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match="never unpickled") as err:
        allmlp.load_weights(tiny_mixer(), tmp_path / "ckpt.pth")
    named = r"it pickles (print|datetime.date|types.SimpleNamespace), which is not among the types allowed"
    assert re.search(named, str(err.value)), str(err.value)
    assert "this ran" not in capsys.readouterr().out


def test_a_model_says_which_checkpoint_entry_holds_its_weights(tmp_path):
    """DeiT-style checkpoints hold `model` and `model_ema`; a family whose authors evaluate the EMA weights
    (ActiveMLP) lists `model_ema` first in `checkpoint_entries`, the others take `model`."""
    trained, averaged = tiny_mixer(), randomise(tiny_mixer(), seed=5)
    torch.save({"model": trained.state_dict(), "model_ema": averaged.state_dict()}, tmp_path / "ckpt.pth")
    plain = allmlp.load_weights(tiny_mixer(), tmp_path / "ckpt.pth")
    assert torch.equal(plain.head.weight, trained.head.weight)
    ema_first = tiny_mixer()
    ema_first.checkpoint_entries = ("model_ema", "model")
    allmlp.load_weights(ema_first, tmp_path / "ckpt.pth")
    assert torch.equal(ema_first.head.weight, averaged.head.weight)
