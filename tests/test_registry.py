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
        allmlp.create_model("resnet50")


def test_unknown_override_lists_options():
    with pytest.raises(ValueError, match="MlpMixer has no option depth; options: .*num_blocks"):
        allmlp.create_model("mixer_s32_224", depth=3)


def test_file_without_allmlp_config_is_explained(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(allmlp.WeightsError, match="no allmlp config in this file"):
        allmlp.create_model(path)
