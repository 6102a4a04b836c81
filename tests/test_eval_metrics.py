"""Metrics (top-k, per-class, ReaL) and the `allmlp eval` / `allmlp finetune` commands on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.evaluate.metrics import Accuracy, RealAccuracy, imagenet_val_index, load_real_labels, topk_correct
from allmlp.train import load_config
from allmlp.train.engine import build_model

from helpers import TINY_DEMO_MODEL


def test_topk_and_per_class():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 2, 2, 1])
    top1, top2 = topk_correct(logits, targets, (1, 2))
    assert top1.tolist() == [True, False, True, False]
    assert top2.tolist() == [True, False, True, True]
    accuracy = Accuracy(3)
    accuracy.update(logits[:2], targets[:2])
    accuracy.update(logits[2:], targets[2:])
    result = accuracy.result()
    assert result["eval_top1"] == 0.5 and result["eval_top5"] == 1.0  # top-5 of 3 classes: every image
    assert result["per_class"] == [None, 0.5, 0.5] and result["eval_images"] == 4


def test_counts_sum_over_processes():
    a, b = Accuracy(2), Accuracy(2)
    a.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    b.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    others = [b.top1[None], b.top5[None], b.per_class_correct, b.per_class_total]
    a.reduce(lambda packed: packed.add_(torch.cat(others)))  # what all_reduce(SUM) does with a second process
    assert a.result()["eval_top1"] == 0.5 and a.result()["per_class"] == [1.0, 0.0]


def test_real_accuracy(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps([[3], [], [1, 2], [0]]))
    labels = load_real_labels(path)
    real = RealAccuracy(labels)
    real.update([3, 5, 2, 1], [0, 1, 2, 3])  # image 1 has no ReaL label: left out
    assert real.result() == {"real_top1": 2 / 3, "real_images": 3}
    assert imagenet_val_index("/x/n01440764/ILSVRC2012_val_00000293.JPEG") == 292
    with pytest.raises(ValueError, match="ILSVRC2012_val"):
        imagenet_val_index("cat.jpg")
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="real.json"):
        load_real_labels(path)


def _val_folder(root: Path) -> list[str]:
    """A 3-class ImageFolder whose files carry ImageNet validation names (ILSVRC2012_val_000000NN.JPEG)."""
    torch.manual_seed(0)
    names = []
    index = 1
    for split in ("train", "val"):
        for label in ("a", "b", "c"):
            (root / split / label).mkdir(parents=True)
            for _ in range(3):
                name = f"ILSVRC2012_val_{index:08d}.JPEG"
                pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / name, format="PNG")
                if split == "val":
                    names.append(name)
                index += 1
    return names


def _tiny_recipe(tmp_path: Path, root: Path) -> Path:
    recipe = {
        "model": {
            "name": "mixer_s16_224",
            "img_size": 16,
            "overrides": {
                "patch_size": 4,
                "hidden_dim": 16,
                "num_blocks": 1,
                "tokens_mlp_dim": 8,
                "channels_mlp_dim": 32,
            },
        },
        "data": {"kind": "imagefolder", "root": str(root), "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"steps": 3, "batch_size": 3, "eval_batch_size": 4, "precision": "fp32", "threads": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_eval_command_any_weight_format_with_real(tmp_path, capsys):
    root = tmp_path / "images"
    val_names = _val_folder(root)
    recipe = _tiny_recipe(tmp_path, root)
    torch.manual_seed(1)
    model = build_model(load_config(str(recipe)), 3)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-trivial classifier
    allmlp.save_weights(model, tmp_path / "w.safetensors")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")  # a trainer's PyTorch checkpoint

    # ReaL labels: the first validation image's label is "any class", the others the model's own prediction
    with torch.no_grad():
        from allmlp.data import build_eval_loader

        cfg = load_config(str(recipe))
        loader = build_eval_loader(
            cfg.data,
            img_size=16,
            in_chans=3,
            preprocessing=allmlp.get_entry(cfg.model.name).preprocessing,
            batch_size=9,
        )
        images, targets = next(iter(loader))
        predicted = model.eval()(images).argmax(1).tolist()
    real = [[] for _ in range(30)]
    for name, prediction in zip(val_names, predicted, strict=True):
        real[imagenet_val_index(name)] = [prediction]
    real[imagenet_val_index(val_names[0])] = []
    (tmp_path / "real.json").write_text(json.dumps(real))

    results = []
    for weights in ("w.safetensors", "w.pth"):
        out = tmp_path / f"eval-{weights}"
        args = ["eval", "--config", str(recipe), "--weights", str(tmp_path / weights), "--output", str(out)]
        assert main([*args, "--real-json", str(tmp_path / "real.json")]) == 0
        results.append(json.loads((out / "eval.json").read_text()))
    same = [{k: v for k, v in r.items() if k not in ("weights", "config")} for r in results]
    assert same[0] == same[1]  # the results; each records its own weights file
    result = results[0]
    expected_top1 = sum(p == t for p, t in zip(predicted, targets.tolist(), strict=True)) / 9
    assert result["eval_top1"] == pytest.approx(expected_top1) and result["eval_top5"] == 1.0
    assert set(result["per_class_top1"]) == {"a", "b", "c"}  # summary.json's names
    assert result["real_top1"] == 1.0 and result["real_images"] == 8
    out = capsys.readouterr().out
    assert "top-1" in out and "ReaL top-1 1.0000" in out and "per-class" in out


def test_eval_on_the_demo_set(tmp_path, capsys):
    recipe = tmp_path / "demo_tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": TINY_DEMO_MODEL,
                "data": {"kind": "demo"},
                "train": {"eval_batch_size": 500, "precision": "fp32"},
            }
        )
    )
    model = build_model(load_config(str(recipe)), 10)
    allmlp.save_weights(model, tmp_path / "w.safetensors")
    assert main(["eval", "--config", str(recipe), "--weights", str(tmp_path / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "top-1 0.1000" in out and "(1000 images)" in out  # zero head: class 0 everywhere, 100 of each digit


def test_real_json_needs_an_imagefolder(tmp_path):
    (tmp_path / "real.json").write_text("[]")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "mixer_s16_224"}, "data": {"kind": "demo"}}))
    (tmp_path / "w.safetensors").touch()
    args = ["eval", "--config", str(recipe), "--weights", str(tmp_path / "w.safetensors")]
    assert main([*args, "--real-json", str(tmp_path / "real.json")]) == 2


def test_finetune_new_zero_head_on_other_classes(tmp_path):
    root = tmp_path / "images"
    _val_folder(root)
    recipe = _tiny_recipe(tmp_path, root)
    pretrained = build_model(load_config(str(recipe)), 7)  # "pre-trained" on 7 classes
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.01)
    allmlp.save_weights(pretrained, tmp_path / "pre.safetensors")

    cfg = load_config(str(recipe), [f"model.weights={tmp_path / 'pre.safetensors'}"])
    model = build_model(cfg, 3, new_head=True)
    assert model.head.weight.shape == (3, 16) and torch.all(model.head.weight == 0) and torch.all(model.head.bias == 0)
    assert torch.equal(model.stem.proj.weight, pretrained.stem.proj.weight)

    out = tmp_path / "ft"
    args = ["finetune", "--config", str(recipe), "--weights", str(tmp_path / "pre.safetensors"), "--output", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["per_class_top1"]) == {"a", "b", "c"}
    tuned = allmlp.create_model(out / "model.safetensors")
    assert tuned.num_classes == 3
    # the same weights through `train` (no new head) refuse a 7-class checkpoint for 3 classes
    assert (
        main(["train", "--config", str(recipe), "--weights", str(tmp_path / "pre.safetensors"), "--output", str(out)])
        == 2
    )
