"""The model registry: names, configs, preprocessing and provenance, overrides and unknown names."""

import pytest
import torch

import allmlp
from allmlp.models.registry import get_entry

MIXER_NAMES = [
    "mixer_s32_224",
    "mixer_s16_224",
    "mixer_s8_224",
    "mixer_b32_224",
    "mixer_b16_224",
    "mixer_l32_224",
    "mixer_l16_224",
    "mixer_h14_224",
]


def test_every_mixer_is_registered():
    assert set(MIXER_NAMES) <= set(allmlp.list_models())
    assert allmlp.list_models("mixer_s*") == ["mixer_s16_224", "mixer_s32_224", "mixer_s8_224"]


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_mixer_entries_record_official_preprocessing(name):
    p = get_entry(name).preprocessing
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)  # pixels to [-1, 1]
    assert p.interpolation == "bilinear" and p.crop_pct == 1.0


def test_provenance_of_published_weights():
    b16 = {r.tag: r for r in get_entry("mixer_b16_224").releases}
    assert {"imagenet1k", "imagenet21k", "sam", "gsam"} <= set(b16)
    assert b16["imagenet21k"].num_classes == 21843
    assert b16["imagenet1k"].trained_on.startswith("ImageNet-1k") and b16["imagenet1k"].top1 == 76.44
    # timm's tag says in21k, but these are the ImageNet-1k-from-scratch weights.
    assert b16["timm:goog_in21k_ft_in1k"].trained_on.startswith("ImageNet-1k")
    assert [r.tag for r in get_entry("mixer_s8_224").releases] == ["gsam"]
    assert get_entry("mixer_h14_224").releases == ()


def test_create_model_overrides():
    model = allmlp.create_model("mixer_s32_224", num_classes=10, img_size=64, drop_path_rate=0.1)
    assert model.num_classes == 10 and model.num_tokens == 4
    assert model.blocks[-1].drop_path.rate == pytest.approx(0.1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'mixer_b16'; did you mean mixer_b16_224"):
        allmlp.create_model("mixer_b16")
    with pytest.raises(ValueError, match="registered: "):
        allmlp.create_model("vgg16")  # resnet50 is close to repmlpnet_*


def test_unknown_override_lists_options():
    with pytest.raises(ValueError, match="MlpMixer has no option depth; options: .*num_blocks"):
        allmlp.create_model("mixer_s32_224", depth=3)


def test_file_without_allmlp_config_is_explained(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(allmlp.WeightsError, match="no allmlp config in this file"):
        allmlp.create_model(path)


# Small configs under registered names: the entry's preprocessing, cheap models.
SMALL_MIXER = dict(img_size=32, patch_size=8, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32)
SMALL_CYCLEMLP = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float64])
def test_create_model_on_a_device_and_dtype(device, dtype):
    model = allmlp.create_model("mixer_s32_224", num_classes=10, device=device, dtype=dtype, **SMALL_MIXER)
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == device, name
        assert tensor.dtype == (dtype or torch.float32), name


def test_create_model_builds_on_the_device_without_a_detour(monkeypatch):
    created = []
    real = torch.nn.Parameter.__new__

    def record(cls, data=None, requires_grad=True):
        created.append(data.device.type)
        return real(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", record)
    allmlp.create_model("mixer_s32_224", device="meta", **SMALL_MIXER)
    assert created and set(created) == {"meta"}  # no parameter was made on the CPU first


def test_create_model_loads_weights_on_its_device_and_dtype(tmp_path):
    source = allmlp.create_model("mixer_s32_224", num_classes=10, **SMALL_MIXER)
    allmlp.save_weights(source, tmp_path / "w.safetensors")
    model = allmlp.create_model(tmp_path / "w.safetensors", device="cpu", dtype=torch.float64)
    for key, value in source.state_dict().items():
        assert model.state_dict()[key].dtype == torch.float64 and torch.equal(model.state_dict()[key], value.double())
    by_name = allmlp.create_model("mixer_s32_224", weights=tmp_path / "w.safetensors", dtype=torch.bfloat16,
                                  num_classes=10, **SMALL_MIXER)  # fmt: skip
    assert torch.equal(by_name.head.weight, source.head.weight.bfloat16())
    with pytest.raises(ValueError, match="device='meta' holds no values, so weights cannot be loaded there"):
        allmlp.create_model(tmp_path / "w.safetensors", device="meta")


@pytest.mark.parametrize(
    "name, mean, std, interpolation, crop_pct",
    [
        ("mixer_b16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0),
        ("cyclemlp_b1", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875),
        ("vip_s7", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.9),
    ],
)
def test_timm_data_config_of_registered_models(name, mean, std, interpolation, crop_pct):
    from timm.data import resolve_model_data_config

    model = allmlp.create_model(name, device="meta")
    config = resolve_model_data_config(model)
    assert config["mean"] == mean and config["std"] == std
    assert config["interpolation"] == interpolation and config["crop_pct"] == crop_pct
    assert config["input_size"] == (3, 224, 224) and config["crop_mode"] == "center"
    assert model.pretrained_cfg["architecture"] == name
    assert model.default_cfg == model.pretrained_cfg


def test_pretrained_cfg_input_size_follows_the_model():
    model = allmlp.create_model("mixer_s32_224", in_chans=1, img_size=(64, 96), device="meta")
    assert model.pretrained_cfg["input_size"] == (1, 64, 96)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the entry's statistics; timm's loaders take their mean


def test_safetensors_file_keeps_its_entry_preprocessing(tmp_path):
    named = allmlp.create_model("cyclemlp_b1", num_classes=10, **SMALL_CYCLEMLP)
    allmlp.save_weights(named, tmp_path / "named.safetensors")
    rebuilt = allmlp.create_model(tmp_path / "named.safetensors")
    for key in ("architecture", "mean", "std", "interpolation", "crop_pct", "input_size"):
        assert rebuilt.pretrained_cfg[key] == named.pretrained_cfg[key], key
    assert rebuilt.pretrained_cfg["architecture"] == "cyclemlp_b1"

    # a Mixer under the Mixer entry's statistics, and one built directly: the family default
    mixer = allmlp.create_model("mixer_s32_224", num_classes=10, **SMALL_MIXER)
    allmlp.save_weights(mixer, tmp_path / "mixer.safetensors")
    assert allmlp.create_model(tmp_path / "mixer.safetensors").pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    direct = allmlp.MlpMixer(num_classes=10, **SMALL_MIXER)
    allmlp.save_weights(direct, tmp_path / "direct.safetensors")
    default = allmlp.create_model(tmp_path / "direct.safetensors").pretrained_cfg
    for key in ("mean", "std", "interpolation", "crop_pct"):
        assert default[key] == direct.pretrained_cfg[key], key
    assert default.get("architecture") == direct.pretrained_cfg.get("architecture")
