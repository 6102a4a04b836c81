"""allmlp compare: linear CKA (full, debiased, minibatch) and the command that compares two models' layers."""

from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.evaluate import cka
from allmlp.evaluate.compare import block_stacks, compare, image_set, load_layered
from allmlp.tools.foreign import load_foreign, small_image_resnet, split_spec
from allmlp.weights.files import write_safetensors


def correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 7, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        n, 7, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(unbiased):
    x, y = correlated(40)
    acc = cka.CKAAccumulator(unbiased)
    acc.update([cka.gram(x), cka.gram(y)], [cka.gram(x), cka.gram(y)])
    matrix = acc.result()
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(2, dtype=torch.float64))
    assert 0.1 < matrix[0, 1] < 0.99 and torch.allclose(matrix, matrix.T)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(unbiased):
    x, y = correlated(30)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    reference = cka.linear_cka(x, y, unbiased)
    assert cka.linear_cka(x @ q, y, unbiased) == pytest.approx(reference, abs=1e-12)
    assert cka.linear_cka(x, 3.7 * y, unbiased) == pytest.approx(reference, abs=1e-12)
    assert cka.linear_cka(0.01 * x @ q, 50 * y, unbiased) == pytest.approx(reference, abs=1e-12)
    # not invariant to an arbitrary invertible map: the check above can fail
    skew = torch.diag(torch.logspace(-2, 2, 12, dtype=torch.float64))
    assert abs(cka.linear_cka(x @ skew, y, unbiased) - reference) > 1e-3


def test_hand_computed_small_case():
    # x = (0, 1, 2) centres to (-1, 0, 1); y's centred columns give Yᵀx = (-1, 1): ||Yᵀx||² = 2, ||xᵀx|| = 2,
    # YᵀY = [[2/3, -1/3], [-1/3, 2/3]] with Frobenius norm sqrt(10)/3, so CKA = 2 / (2 sqrt(10) / 3) = 3/sqrt(10)
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert cka.linear_cka(x, y) == pytest.approx(3 / math.sqrt(10), abs=1e-12)


def test_unbiased_hsic_is_the_u_statistic_over_distinct_quadruples():
    # Song et al. 2012: HSIC_1 is the mean over ordered distinct (i, j, q, r) of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq
    x, y = correlated(7, seed=3)
    k, l_ = (x @ x.T).numpy(), (y @ y.T).numpy()
    terms = [
        k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
        for i, j, q, r in itertools.permutations(range(7), 4)
    ]
    acc = cka.CKAAccumulator(unbiased=True)
    acc.update([cka.gram(x)], [cka.gram(y)])
    assert float(acc.cross[0, 0]) == pytest.approx(np.mean(terms), rel=1e-10)


def test_minibatch_estimate_agrees_with_the_full_one():
    x, y = correlated(1500, seed=2)
    full = cka.linear_cka(x, y, unbiased=True)
    # one batch holding everything is the full debiased estimate, exactly
    assert cka.minibatch_cka(x, y, batch_size=1500) == pytest.approx(full, abs=1e-12)
    # batches of 200: unbiased HSIC averages, so the estimate stays close to the full one
    assert cka.minibatch_cka(x, y, batch_size=200) == pytest.approx(full, abs=0.01)
    # the plain estimator on the same minibatches is biased by the batch size, further off
    biased = cka.CKAAccumulator(unbiased=False)
    for rows in cka.batch_slices(1500, 20):
        biased.update([cka.gram(x[rows])], [cka.gram(y[rows])])
    assert abs(float(biased.result()[0, 0]) - full) > 0.03
    assert cka.linear_cka(x, y, unbiased=False) == pytest.approx(full, abs=0.01)


def test_batches_and_errors():
    assert [(s.start, s.stop) for s in cka.batch_slices(10, 4)] == [(0, 3), (3, 7), (7, 10)]
    acc = cka.CKAAccumulator(unbiased=True)
    with pytest.raises(ValueError, match="needs batches of >= 4 inputs, got 3"):
        acc.update([torch.eye(3)], [torch.eye(3)])
    with pytest.raises(ValueError, match=r"same inputs, got sizes \[4, 5\]"):
        acc.update([torch.eye(4)], [torch.eye(5)])
    with pytest.raises(ValueError, match="no batches were added"):
        acc.result()
    with pytest.raises(ValueError, match="got 5 and 6 rows"):
        cka.linear_cka(torch.ones(5, 2), torch.ones(6, 2))


def tiny_mixer_file(tmp_path, name="m.safetensors", seed=0):
    torch.manual_seed(seed)
    model = allmlp.MlpMixer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, hidden_dim=16, num_blocks=3, tokens_mlp_dim=8
    )
    allmlp.save_weights(model, tmp_path / name)
    return tmp_path / name


def test_compare_a_mixer_with_itself_and_with_a_resnet(tmp_path, monkeypatch):
    path = tiny_mixer_file(tmp_path)
    mixer = load_layered("mixer_s16_224", path)
    assert mixer.layers == ["blocks.0", "blocks.1", "blocks.2"]
    images = image_set("demo", max_images=40)
    report = compare(mixer, load_layered("mixer_s16_224", path, ["0", "-1"]), images, cka_batch=20, progress=False)
    matrix = np.array(report["cka"])
    assert matrix.shape == (3, 2) and report["b"]["layers"] == ["blocks.0", "blocks.2"]
    assert matrix[0, 0] == pytest.approx(1.0) and matrix[2, 1] == pytest.approx(1.0)
    assert report["images"] == 40 and report["cka_batches"] == 2

    torch.manual_seed(0)
    write_safetensors(small_image_resnet().state_dict(), tmp_path / "r.safetensors", {"format": "pt"})
    resnet = load_layered("torchvision:resnet18", tmp_path / "r.safetensors", img_size=28)
    assert resnet.layers == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    out = tmp_path / "out"
    args = ["compare", "--a", "mixer_s16_224", "--weights-a", str(path), "--b", "torchvision:resnet18"]
    args += ["--weights-b", str(tmp_path / "r.safetensors"), "--img-size-b", "28", "--layers-b", "layer1.0", "layer4.1"]
    args += ["--data", "demo", "--max-images", "24", "--cka-batch", "0", "--out", str(out)]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    saved = json.loads((out / "cka.json").read_text())
    assert np.array(saved["cka"]).shape == (3, 2) and saved["estimator"] == "full, unbiased HSIC"
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in saved["cka"] for v in row)
    assert (out / "cka.csv").read_text().splitlines()[0].endswith(",layer1.0,layer4.1")
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun reads the cached Gram matrices (one file per model) and computes nothing
    assert len(list((tmp_path / "cache").iterdir())) == 2

    def no_forward(*args, **kwargs):
        raise AssertionError("the Gram matrices should come from the cache")

    monkeypatch.setattr("allmlp.evaluate.compare._batch_grams", no_forward)
    assert main(args) == 0
    with pytest.raises(AssertionError, match="from the cache"):  # other images (another order): no stale hit
        main([*args, "--seed", "1"])
    assert json.loads((out / "cka.json").read_text())["cka"] == saved["cka"]


def test_image_folder_data_and_a_timm_vit(tmp_path):
    pytest.importorskip("timm")
    for i in range(6):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    noise = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    images = image_set(tmp_path)
    assert len(images.items) == 7 and images.name == str(tmp_path.resolve())
    vit = load_layered("timm:vit_tiny_patch16_224", layers=["0", "11"], img_size=32)
    mixer = load_layered("mixer_s16_224", tiny_mixer_file(tmp_path), img_size=28)
    report = compare(vit, mixer, images, cka_batch=None, unbiased=False, progress=False)
    assert report["a"]["layers"] == ["blocks.0", "blocks.11"] and np.array(report["cka"]).shape == (2, 3)
    # timm weights load back at the size and head they were saved with
    torch.manual_seed(0)
    small = load_foreign("timm:vit_tiny_patch16_224", None, img_size=32)
    small.reset_classifier(7)
    write_safetensors(small.state_dict(), tmp_path / "vit.safetensors", {"format": "pt"})
    again = load_foreign("timm:vit_tiny_patch16_224", tmp_path / "vit.safetensors", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small.eval()(x))


def test_model_and_layer_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"expected a registered allmlp name or one of torchvision:NAME, timm:NAME"):
        split_spec("keras:resnet")
    with pytest.raises(ValueError, match="torchvision has no model 'resnet999'"):
        load_layered("torchvision:resnet999")
    path = tiny_mixer_file(tmp_path)
    with pytest.raises(ValueError, match=r"layer 3 of mixer_s16_224 is out of range: it has 3 \(0..2\)"):
        load_layered("mixer_s16_224", path, ["3"])
    with pytest.raises(ValueError, match="indices \\(integers, negative from the end\\), got \\['blocks.1'\\]"):
        load_layered("mixer_s16_224", path, ["blocks.1"])
    with pytest.raises(ValueError, match="has no nodes \\['layer9'\\]"):
        load_layered("torchvision:resnet18", layers=["layer9"])
    with pytest.raises(ValueError, match="--data must be an image folder or 'demo'"):
        image_set(tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm is optional: without it, a timm: model says so
    with pytest.raises(ValueError, match=r"model 'timm:vit_tiny_patch16_224' needs timm, which is not installed"):
        load_layered("timm:vit_tiny_patch16_224")


def test_block_stacks_of_torchvision_models():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=8)
    assert block_stacks(vit) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
