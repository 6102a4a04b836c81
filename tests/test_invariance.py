"""The paper's invariance experiment: fixed input permutations (data.permute) and the six-run command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from torch import nn

import allmlp
from allmlp.cli import main
from allmlp.data import DataConfig, build_loaders
from allmlp.data.permute import FixedPermutation
from allmlp.evaluate import invariance
from allmlp.models.registry import get_entry
from allmlp.tools.foreign import load_foreign, small_image_resnet
from allmlp.weights.files import write_safetensors

from helpers import TINY_DEMO_MODEL

HALF = get_entry("mixer_s16_224").preprocessing  # mean = std = 0.5


@pytest.mark.parametrize("kind", ["patches", "pixels"])
def test_a_fixed_permutation_is_a_bijection_fixed_by_its_seed(kind):
    perm = FixedPermutation(kind, (12, 8), seed=3, patch_size=4)
    assert torch.equal(torch.sort(perm.index).values, torch.arange(96))
    assert torch.equal(perm.index, FixedPermutation(kind, (12, 8), seed=3, patch_size=4).index)
    assert not torch.equal(perm.index, FixedPermutation(kind, (12, 8), seed=4, patch_size=4).index)
    images = torch.randn(2, 3, 12, 8)
    out = perm(images)
    # every channel is moved alike, nothing is lost, and a single image is treated as a batch of one
    assert torch.equal(out.flatten(2), images.flatten(2)[:, :, perm.index])
    assert torch.equal(torch.sort(out.flatten(2), dim=2).values, torch.sort(images.flatten(2), dim=2).values)
    assert torch.equal(perm(images[1]), out[1])


def test_patch_permutation_moves_whole_patches_with_one_pixel_order():
    perm = FixedPermutation("patches", (8, 12), seed=0, patch_size=4)  # 2 x 3 patch grid
    source = perm.index.reshape(8, 12)
    offsets = []
    for gr in range(2):
        for gc in range(3):
            block = source[gr * 4 : gr * 4 + 4, gc * 4 : gc * 4 + 4]
            rows, cols = block // 12, block % 12
            # the output patch is exactly one source patch ...
            assert len(set((rows // 4).flatten().tolist())) == 1 and len(set((cols // 4).flatten().tolist())) == 1
            src_patch = int(rows[0, 0] // 4) * 3 + int(cols[0, 0] // 4)
            assert src_patch == perm.patch_order[gr * 3 + gc]
            offsets.append(((rows % 4) * 4 + cols % 4).flatten())
    # ... and inside every patch the pixels follow the same order
    assert all(torch.equal(o, perm.pixel_order) for o in offsets)
    assert not torch.equal(perm.pixel_order, torch.arange(16)) and not torch.equal(perm.patch_order, torch.arange(6))


def test_a_mixer_undoes_a_patch_permutation_by_permuting_its_weights():
    torch.manual_seed(0)
    model = allmlp.MlpMixer(
        img_size=(8, 12), patch_size=4, in_chans=2, num_classes=5, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8
    )
    with torch.no_grad():
        model.head.weight.normal_()  # the fresh head is zero, which would make any two models agree
    perm = FixedPermutation("patches", (8, 12), seed=1, patch_size=4)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        # token-mixing: input token g of the permuted model is source token patch_order[g]; so is its output
        for block in moved.blocks:
            fc1, fc2 = block.mlp_tokens.fc1, block.mlp_tokens.fc2
            fc1.weight.copy_(fc1.weight[:, perm.patch_order])
            fc2.weight.copy_(fc2.weight[perm.patch_order])
            fc2.bias.copy_(fc2.bias[perm.patch_order])
        # the stem reads the pixels of each patch in the permuted order
        kernel = moved.stem.proj.weight
        kernel.copy_(kernel.flatten(2)[:, :, perm.pixel_order].reshape(kernel.shape))
    x = torch.randn(3, 2, 8, 12)
    expected = model(x)
    torch.testing.assert_close(moved(perm(x)), expected, atol=1e-5, rtol=1e-5)
    # without the weight permutation the permuted input gives other logits, so the check above has teeth
    assert (model(perm(x)) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["patches", "pixels"])
def test_train_and_eval_batches_get_the_same_permutation(kind):
    common = dict(img_size=28, in_chans=1, preprocessing=HALF, batch_size=16, eval_batch_size=100, seed=0)
    plain = build_loaders(DataConfig(shift_pixels=2, num_workers=0), **common)
    permuted = build_loaders(
        DataConfig(shift_pixels=2, num_workers=0, permute=kind, permute_patch=4, permute_seed=5), **common
    )
    perm = FixedPermutation(kind, 28, seed=5, patch_size=4)
    (x_plain, y_plain), (x_perm, y_perm) = next(plain.train.batches(0)), next(permuted.train.batches(0))
    assert torch.equal(y_plain, y_perm) and torch.equal(x_perm, perm(x_plain))
    (v_plain, _), (v_perm, _) = next(iter(plain.val)), next(iter(permuted.val))
    assert torch.equal(v_perm, perm(v_plain))
    # the per-image path (RandAugment forces it) applies the same permutation, on train and eval alike
    per_image = build_loaders(
        DataConfig(randaugment_layers=1, num_workers=0, permute=kind, permute_patch=4, permute_seed=5), **common
    )
    assert torch.equal(next(iter(per_image.val))[0], v_perm)


def test_permute_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"data.permute must be null or one of patches, pixels, got 'tokens'"):
        DataConfig(permute="tokens")
    with pytest.raises(ValueError, match=r"data.permute_patch must be the patch size .* got None"):
        DataConfig(permute="patches")
    with pytest.raises(ValueError, match=r"data.permute=patches: patch size 5 must divide the image size 28 x 28"):
        build_loaders(
            DataConfig(permute="patches", permute_patch=5, num_workers=0),
            img_size=28,
            in_chans=1,
            preprocessing=HALF,
            batch_size=16,
            eval_batch_size=100,
            seed=0,
        )


def test_allmlp_train_takes_data_permute(tmp_path):
    recipe = {
        "model": TINY_DEMO_MODEL,
        "data": {"kind": "demo", "num_workers": 0},
        "train": {"steps": 1, "batch_size": 50, "eval_batch_size": 500, "precision": "fp32", "threads": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    overrides = ["data.permute=patches", "data.permute_patch=7", "data.permute_seed=2"]
    assert main(["train", "--config", str(tmp_path / "r.yaml"), "--output", str(out), *overrides]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (saved["permute"], saved["permute_patch"], saved["permute_seed"]) == ("patches", 7, 2)


def test_small_image_resnet_and_loading_it_back(tmp_path):
    model = small_image_resnet()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        write_safetensors(model.state_dict(), tmp_path / "r.safetensors", {"format": "pt"})
        again = load_foreign("torchvision:resnet18", tmp_path / "r.safetensors")
        torch.testing.assert_close(again(x), model(x))


class _TinyCnn(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
        )


def _tiny_mixer() -> nn.Module:
    return allmlp.MlpMixer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4
    )


def test_the_experiment_writes_six_runs_a_table_and_a_chart(tmp_path):
    settings = invariance.InvarianceSettings(steps=1, batch_size=50, threads=1)
    rows = invariance.run_invariance(tmp_path, settings, {"mixer": _tiny_mixer, "cnn": _TinyCnn}, save_models=True)
    assert [(r["model"], r["condition"]) for r in rows] == [
        (m, c) for m in ("mixer", "cnn") for c in ("original", "patches", "pixels")
    ]
    assert all(0.0 <= r["top1"] <= 1.0 and r["steps"] == 1 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,condition,top1") and len(csv_lines) == 7
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | original | patches | pixels |")
    assert table[2].startswith(f"| mixer | {100 * rows[0]['top1']:.2f}% | {100 * rows[1]['top1']:.2f}% |")
    assert (tmp_path / "invariance.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mixer_pixels.safetensors").is_file() and (tmp_path / "cnn_original.safetensors").is_file()


def test_the_command_line_runs_the_experiment(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(invariance, "MODELS", {"mixer": _tiny_mixer, "cnn": _TinyCnn})
    assert main(["invariance", "--out", str(tmp_path), "--steps", "1", "--threads", "1", "--mixer-lr", "0.5"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 6 and {r["lr"] for r in rows} == {0.5, invariance.InvarianceSettings().resnet_lr}
    assert "| mixer |" in capsys.readouterr().out
