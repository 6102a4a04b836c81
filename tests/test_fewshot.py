"""Linear few-shot: the closed-form solver against numpy's lstsq, leave-one-out against refits, the command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.evaluate import fewshot as fs


def clusters(num_classes: int, per_class: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 2.0
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim)) + 5.0  # offset: the bias matters
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def lstsq_reference(features, labels, num_classes, l2, test):
    """Ridge with an unregularised bias, solved by numpy's lstsq on the augmented system
    [[Xs, 1], [sqrt(l2) I, 0]] [W; b] = [[Y], [0]], on the support set's standardised features Xs."""
    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std
    n, d = xs.shape
    y = 2.0 * np.eye(num_classes)[labels.numpy()] - 1.0
    a = np.block([[xs, np.ones((n, 1))], [np.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
    b = np.vstack([y, np.zeros((d, num_classes))])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    return ((test.double().numpy() - mean) / std) @ solution[:-1] + solution[-1]


@pytest.mark.parametrize("dim", [6, 40], ids=["more-points-than-dims", "more-dims-than-points"])
@pytest.mark.parametrize("l2", [1e-2, 1.0, 300.0])
def test_probe_matches_lstsq_on_the_augmented_system(dim, l2):
    features, labels = clusters(num_classes=4, per_class=5, dim=dim, spread=1.0, seed=0)
    test, _ = clusters(num_classes=4, per_class=3, dim=dim, spread=1.5, seed=1)
    probe, used = fs.fit_linear_probe(features, labels, 4, l2)
    assert used == l2
    expected = lstsq_reference(features, labels, 4, l2, test)
    np.testing.assert_allclose(probe.scores(test).numpy(), expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dim", [6, 40])
def test_leave_one_out_matches_refits(dim):
    features, labels = clusters(num_classes=3, per_class=4, dim=dim, spread=2.0, seed=2)
    system = fs._System(features, labels, 3)
    # refits without each point, on the same standardisation (as the closed form assumes)
    x = ((features.double() - system.mean) / system.scale).numpy()
    y = system.targets.numpy()
    for l2 in (0.1, 10.0):
        held_out = []
        for i in range(len(labels)):
            keep = np.arange(len(labels)) != i
            xk, yk = x[keep], y[keep]
            xm, ym = xk.mean(0), yk.mean(0)
            w = np.linalg.solve((xk - xm).T @ (xk - xm) + l2 * np.eye(dim), (xk - xm).T @ (yk - ym))
            held_out.append((x[i] - xm) @ w + ym)
        held_out = np.array(held_out)
        errors, squared = system.leave_one_out(l2)
        assert errors == int((held_out.argmax(1) != labels.numpy()).sum())
        assert squared == pytest.approx(float(((held_out - y) ** 2).sum()), rel=1e-8)


def test_chosen_l2_regularises_noisy_features_more():
    clean = clusters(num_classes=5, per_class=4, dim=30, spread=0.3, seed=3)
    noisy = clusters(num_classes=5, per_class=4, dim=30, spread=6.0, seed=3)
    _, l2_clean = fs.fit_linear_probe(*clean, 5)
    _, l2_noisy = fs.fit_linear_probe(*noisy, 5)
    assert l2_clean in fs.L2_GRID and l2_noisy in fs.L2_GRID
    assert l2_noisy > l2_clean


def test_one_shot_uses_the_fixed_l2():
    features, labels = clusters(num_classes=5, per_class=1, dim=30, spread=1.0, seed=5)
    assert fs.fit_linear_probe(features, labels, 5)[1] == fs.ONE_SHOT_L2


def test_probe_classifies_separable_clusters():
    features, labels = clusters(num_classes=6, per_class=5, dim=20, spread=0.5, seed=4)
    test, test_labels = clusters(num_classes=6, per_class=10, dim=20, spread=0.5, seed=4)
    probe, _ = fs.fit_linear_probe(features, labels, 6)
    assert (probe.predict(test) == test_labels).float().mean() == 1.0


def test_solver_rejects_bad_input():
    features, labels = clusters(num_classes=3, per_class=2, dim=4, spread=1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fs.fit_linear_probe(features, labels, 2)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fs.fit_linear_probe(features, labels, 3, l2=0.0)
    with pytest.raises(ValueError, match=r"\(N, D\) with N labels"):
        fs.fit_linear_probe(features[:-1], labels, 3)


def test_draw_shots_nested_deterministic_and_checked():
    labels = [0] * 6 + [1] * 8 + [2] * 5
    drawn = fs.draw_shots(labels, 3, 5, seed=7)
    assert drawn.shape == (3, 5)
    assert np.array_equal(drawn, fs.draw_shots(labels, 3, 5, seed=7))
    assert not np.array_equal(drawn, fs.draw_shots(labels, 3, 5, seed=8))
    assert all(labels[i] == cls for cls in range(3) for i in drawn[cls])
    assert len(set(drawn.ravel())) == 15
    with pytest.raises(ValueError, match="class 2 has 5 images to draw shots from, fewer than 6"):
        fs.draw_shots(labels, 3, 6, seed=0)


COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]


def image_tree(root, per_class: dict[str, int], seed: int = 0) -> None:
    """Classes told apart by colour, with noise: a frozen random Mixer separates them linearly."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for cls, colour in enumerate(COLOURS):
            folder = root / split / f"class_{cls}" if split else root / f"class_{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, size=(24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    model = allmlp.create_model(
        "mixer_s32_224",
        num_classes=10,
        img_size=16,
        patch_size=4,
        hidden_dim=16,
        num_blocks=1,
        tokens_mlp_dim=8,
        channels_mlp_dim=16,
    )
    return allmlp.save_weights(model, tmp_path / "tiny.safetensors")


def test_scan_layouts(tmp_path):
    image_tree(tmp_path / "split", {"train": 4, "val": 2})
    data = fs.scan_fewshot_data(tmp_path / "split")
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert len(data.pool) == 12 and len(data.test) == 6
    assert all(path.startswith("val/") for path, _ in data.test)

    image_tree(tmp_path / "flat", {"": 11})
    data = fs.scan_fewshot_data(tmp_path / "flat")
    assert len(data.test) == 3 * 2 and len(data.pool) == 3 * 9  # the 5th and 10th image of each class
    assert {path.split("/")[-1] for path, _ in data.test} == {"004.png", "009.png"}

    (tmp_path / "bad" / "train" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "test" / "b").mkdir(parents=True)
    for folder in ("train/a", "test/b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "bad" / folder / "x.png")
    with pytest.raises(ValueError, match="different class folders"):
        fs.scan_fewshot_data(tmp_path / "bad")


def test_fewshot_end_to_end_with_cache(tmp_path, tiny_weights, monkeypatch):
    image_tree(tmp_path / "data", {"train": 8, "val": 4})
    calls = []
    original = fs.forward_images
    monkeypatch.setattr(
        fs, "forward_images", lambda model, paths, *a, **k: calls.append(len(paths)) or original(model, paths, *a, **k)
    )
    args = dict(shots=[1, 3], seeds=3, cache_dir=tmp_path / "cache", batch_size=8, device="cpu")
    report = fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", **args)
    assert report["classes"] == 3 and report["test_images"] == 12
    rows = {row["shots"]: row for row in report["results"]}
    assert len(rows[3]["top1"]) == 3 and len(rows[3]["l2"]) == 3
    assert rows[3]["top1_mean"] >= 90.0  # colours are linearly separable in random-feature space
    assert rows[3]["top1_std"] == pytest.approx(float(np.std(rows[3]["top1"], ddof=1)))
    assert calls and sum(calls) <= 3 * 8 + 12

    again = fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", **args)
    assert again["results"] == report["results"]
    assert len(calls) == 1  # everything came from the cache

    bigger = fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", **{**args, "seeds": 4})
    assert bigger["results"][0]["top1"][:3] == report["results"][0]["top1"]
    pool_labels = [label for _, label in fs.scan_fewshot_data(tmp_path / "data").pool]
    seen = {int(i) for seed in range(3) for i in fs.draw_shots(pool_labels, 3, 3, seed).ravel()}
    unseen = {int(i) for i in fs.draw_shots(pool_labels, 3, 3, 3).ravel()} - seen
    assert unseen and calls[1:] == [len(unseen)]  # only the new seed's unseen images were computed


def test_fewshot_given_l2_and_unreadable_image(tmp_path, tiny_weights):
    image_tree(tmp_path / "data", {"train": 3, "val": 2})
    report = fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", shots=[2], seeds=1, l2=4.0, device="cpu")
    assert report["results"][0]["l2"] == [4.0] and report["results"][0]["top1_std"] == 0.0
    (tmp_path / "data" / "val" / "class_1" / "001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1 images could not be read \(val/class_1/001.png"):
        fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", shots=[2], seeds=1, device="cpu")
    with pytest.raises(ValueError, match="fewer than 4"):
        fs.fewshot("mixer_s32_224", tiny_weights, tmp_path / "data", shots=[4], seeds=1, device="cpu")


def test_fewshot_command(tmp_path, tiny_weights, capsys):
    image_tree(tmp_path / "data", {"": 10})
    out = tmp_path / "report.json"
    argv = ["fewshot", "--model", "mixer_s32_224", "--weights", str(tiny_weights), "--data", str(tmp_path / "data")]
    argv += ["--shots", "1", "2", "--seeds", "2", "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "shots" in printed and "+-" in printed
    report = json.loads(out.read_text())
    assert [row["shots"] for row in report["results"]] == [1, 2]
    assert list((tmp_path / "cache").glob("mixer_s32_224-*.safetensors"))
    assert main([*argv[:-2], "--data", str(tmp_path / "nowhere")]) == 2
    assert "ImageFolder directory" in capsys.readouterr().err
