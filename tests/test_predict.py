"""allmlp predict / embed: names, preprocessing of the entry, unreadable files reported while the rest goes on."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.tools import inference
from allmlp.tools.inference import eval_transform, load_model
from allmlp.tools.predict import class_names, embed, load_embeddings, predict

SMALL = dict(img_size=16, patch_size=4, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16)


def save_tiny(path, num_classes: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = allmlp.create_model("mixer_s32_224", num_classes=num_classes, **SMALL)
    with torch.no_grad():
        model.head.weight.normal_()  # a zero head would give every class the same probability
        model.head.bias.normal_()
    return allmlp.save_weights(model, path)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 255, size=(12, 12), dtype=np.uint8)).convert("L").save(folder / "grey.png")
    (folder / "notes.txt").write_text("not an image, and skipped when listing a folder")
    return folder


def reference_logits(weights, path) -> torch.Tensor:
    model = load_model(weights, "mixer_s32_224")
    with Image.open(path) as image:
        x = eval_transform(model, "mixer_s32_224")(image.convert("RGB"))
    with torch.no_grad():
        return model(x[None])[0]


def test_predict_top_k_with_imagenet_names(tmp_path, images):
    weights = save_tiny(tmp_path / "m.safetensors", 1000)
    records = predict([images], weights, "mixer_s32_224", topk=3, device="cpu")
    assert [r["path"] for r in records] == [str(images / n) for n in ("a.png", "b.jpg", "grey.png", "sub/c.png")]
    names = class_names(1000)
    assert names[0] == "tench" and len(names) == 1000
    expected = reference_logits(weights, images / "a.png").softmax(0).topk(3)
    top = records[0]["top"]
    assert [g["class"] for g in top] == expected.indices.tolist()
    assert [g["name"] for g in top] == [names[i] for i in expected.indices.tolist()]
    np.testing.assert_allclose([g["prob"] for g in top], expected.values.numpy(), rtol=1e-5)


def test_predict_names_from_file_or_ids(tmp_path, images):
    weights = save_tiny(tmp_path / "m.safetensors", 4)
    records = predict([images / "a.png"], weights, "mixer_s32_224", topk=10, device="cpu")
    assert len(records[0]["top"]) == 4 and {g["name"] for g in records[0]["top"]} == {"0", "1", "2", "3"}
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n")
    records = predict([images / "a.png"], weights, "mixer_s32_224", topk=2, labels_file=labels, device="cpu")
    assert all(g["name"] == ["cat", "dog", "bird", "fish"][g["class"]] for g in records[0]["top"])
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(ValueError, match="3 class names for a model with 4 classes"):
        predict([images / "a.png"], weights, "mixer_s32_224", labels_file=tmp_path / "labels.json")


def test_unreadable_files_are_reported_and_the_rest_goes_on(tmp_path, images, capsys):
    weights = save_tiny(tmp_path / "m.safetensors", 1000)
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["predict", str(images / "a.png"), str(broken), str(tmp_path / "missing.jpg"), str(images / "sub")]
    status = main([*argv, "--model", "mixer_s32_224", "--weights", weights, "--json", "--workers", "0"])
    captured = capsys.readouterr()
    assert status == 1
    records = json.loads(captured.out)
    assert [("top" in r, "error" in r) for r in records] == [(True, False), (False, True), (False, True), (True, False)]
    assert "cannot read" in captured.err and "broken.png" in captured.err and "missing.jpg" in captured.err

    status = main(["predict", str(images / "a.png"), "--model", "mixer_s32_224", "--weights", weights, "--topk", "2"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0 and out[0].endswith("a.png") and len(out) == 3 and out[1].lstrip().startswith("1.")


def test_predict_bad_input(tmp_path, images):
    headless = allmlp.save_weights(allmlp.create_model("mixer_s32_224", num_classes=0, **SMALL), tmp_path / "h.st")
    with pytest.raises(ValueError, match="no classifier head"):
        predict([images], headless, "mixer_s32_224")
    weights = save_tiny(tmp_path / "m.safetensors", 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        predict([tmp_path / "empty"], weights, "mixer_s32_224")
    records = predict([tmp_path / "missing.png"], weights, "mixer_s32_224")
    assert records == [{"path": str(tmp_path / "missing.png"), "error": records[0]["error"]}]
    assert "FileNotFoundError" in records[0]["error"]
    with pytest.raises(ValueError, match="unknown model"):
        predict([images], headless, "mixer_b17_224")
    with pytest.raises(ValueError, match="--topk must be >= 1"):
        predict([images], headless, "mixer_s32_224", topk=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embed_writes_pre_logits_with_paths(tmp_path, images, suffix, capsys):
    weights = save_tiny(tmp_path / "m.safetensors", 7)
    (images / "bad.png").write_bytes(b"nope")
    out = tmp_path / f"emb{suffix}"
    status = main(["embed", str(images), "--model", "mixer_s32_224", "--weights", weights, "-o", str(out)])
    assert status == 1 and "bad.png" in capsys.readouterr().err
    features, paths = load_embeddings(out)
    assert paths == [str(images / n) for n in ("a.png", "b.jpg", "grey.png", "sub/c.png")]
    assert features.shape == (4, 16) and features.dtype == torch.float32
    model = load_model(weights, "mixer_s32_224")
    with Image.open(images / "b.jpg") as image:
        x = eval_transform(model, "mixer_s32_224")(image.convert("RGB"))
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x[None]), pre_logits=True)[0]
    torch.testing.assert_close(features[1], expected)
    if suffix == ".npy":
        assert json.loads(out.with_suffix(".json").read_text())["model"] == "mixer_s32_224"


def test_embed_rejects_unknown_output_suffix(tmp_path, images):
    with pytest.raises(ValueError, match=r"\.safetensors or \.npy"):
        embed([images], save_tiny(tmp_path / "m.safetensors", 3), "mixer_s32_224", tmp_path / "out.csv")


def test_weights_of_another_architecture_are_refused(tmp_path, monkeypatch):
    weights = save_tiny(tmp_path / "m.safetensors", 3)
    with pytest.raises(ValueError, match="unknown model"):
        load_model(weights, "not_a_model")
    assert load_model(weights, "mixer_b16_224").config["hidden_dim"] == 16  # the file's own config wins
    entry = allmlp.get_entry("mixer_b16_224")
    monkeypatch.setattr(inference, "get_entry", lambda name: dataclasses.replace(entry, architecture=torch.nn.Linear))
    with pytest.raises(ValueError, match="holds a MlpMixer, but --model mixer_b16_224 is a Linear"):
        load_model(weights, "mixer_b16_224")
