"""Linear few-shot evaluation, the MLP-Mixer paper's k-shot metric.

Frozen pre-logits of k images per class are regressed onto {-1, 1} one-vs-rest targets with closed-form
l2-regularised least squares; test images are classified by the argmax of the scores. Features are standardised
with the support set's mean and standard deviation and the bias is not regularised (it is the mean target, as
for ridge regression with an intercept). The regulariser is given, or chosen from `L2_GRID` by closed-form
leave-one-out on the support set (the fewest leave-one-out errors, ties broken by the leave-one-out squared
error); with 1 shot per class, where nothing can be held out, it is `ONE_SHOT_L2`.

Data: an ImageFolder tree. With train/ and val/ (or test/) subfolders, shots are drawn from train/ and the
probe is scored on val/ (test/ where there is no val/). A tree of class folders alone is split: every fifth
image of each class (sorted by path: the 5th, 10th, ...) is a test image, the rest are drawn from.
The shots of a seed are nested (the 5 shots contain the 1 shot): one permutation per class and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torchvision.datasets import ImageFolder

from ..atomic import write_bytes_atomic
from ..tools.inference import entry_name, eval_transform, forward_images, load_model, resolve_device
from ..weights.files import write_safetensors
from ..weights.hub import cache_dir

L2_GRID = tuple(2.0**i for i in range(-10, 20))
# With one shot per class nothing can be held out: a left-out image has no other example of its class, and the
# leave-one-out squared error then just rewards shrinking every score to the mean. A small l2 on standardised
# features (close to the minimum-norm fit) is used instead.
ONE_SHOT_L2 = 1.0
TEST_EVERY = 5  # flat trees: every fifth image of a class is a test image


@dataclass
class LinearProbe:
    """scores = ((x - mean) / scale) @ weight + bias."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(torch.float64) - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features).argmax(dim=1)


class _System:
    """The support set's least-squares system, factored once (SVD) so that every l2 costs a few products."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"features must be (N, D) with N labels, got {tuple(features.shape)} and {len(labels)}")
        if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) with at least 2 classes")
        x = features.to(torch.float64)
        self.mean = x.mean(dim=0)
        # a feature that is constant on the support set carries nothing; scale 1 keeps it finite
        std = x.std(dim=0, correction=0)
        self.scale = torch.where(std > 0, std, torch.ones_like(std))
        self.targets = 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64) - 1.0
        self.target_mean = self.targets.mean(dim=0)
        self.u, self.s, self.vh = torch.linalg.svd((x - self.mean) / self.scale, full_matrices=False)
        self.u_targets = self.u.T @ (self.targets - self.target_mean)  # (rank, C)
        self.labels = labels.long()

    def probe(self, l2: float) -> LinearProbe:
        weight = self.vh.T @ ((self.s / (self.s**2 + l2))[:, None] * self.u_targets)
        return LinearProbe(self.mean, self.scale, weight, self.target_mean.clone())

    def leave_one_out(self, l2: float) -> tuple[int, float]:
        """(errors, squared error) of the leave-one-out predictions, from the hat matrix H (no refits):
        prediction without point i = (fitted_i - H_ii y_i) / (1 - H_ii)."""
        shrink = self.s**2 / (self.s**2 + l2)
        fitted = self.target_mean + self.u @ (shrink[:, None] * self.u_targets)
        leverage = 1.0 / len(self.labels) + (self.u**2) @ shrink
        held_out = (fitted - leverage[:, None] * self.targets) / (1.0 - leverage).clamp_min(1e-12)[:, None]
        errors = int((held_out.argmax(dim=1) != self.labels).sum())
        return errors, float(((held_out - self.targets) ** 2).sum())


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float | None = None
) -> tuple[LinearProbe, float]:
    """(probe, l2 used): least squares to {-1, 1} targets; l2 chosen by leave-one-out on the support set if None
    (`ONE_SHOT_L2` when no class has two examples)."""
    system = _System(features, labels, num_classes)
    if l2 is None and int(torch.bincount(labels.long()).max()) < 2:
        l2 = ONE_SHOT_L2
    elif l2 is None:
        l2 = min(L2_GRID, key=system.leave_one_out)  # tuples compare errors first, then the squared error
    elif not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    return system.probe(l2), l2


@dataclass
class FewShotData:
    classes: list[str]
    pool: list[tuple[str, int]]  # (path relative to root, class) to draw shots from
    test: list[tuple[str, int]]
    root: Path


def scan_fewshot_data(root: str | os.PathLike) -> FewShotData:
    """The shot pool and the test images of an ImageFolder tree (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"few-shot data must be an ImageFolder directory, got {root}")

    def relative(dataset: ImageFolder) -> list[tuple[str, int]]:
        return [(os.path.relpath(path, root), label) for path, label in dataset.samples]

    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = ImageFolder(root / "train"), ImageFolder(test_dir)
        if train.classes != test.classes:
            raise ValueError(
                f"{root}: train/ and {test_dir.name}/ have different class folders: "
                f"{sorted(set(train.classes) ^ set(test.classes))[:10]}"
            )
        return FewShotData(train.classes, relative(train), relative(test), root)
    dataset = ImageFolder(root)
    pool, test, seen = [], [], {}
    for sample in relative(dataset):
        seen[sample[1]] = seen.get(sample[1], 0) + 1
        (test if seen[sample[1]] % TEST_EVERY == 0 else pool).append(sample)
    if not test:
        raise ValueError(f"{root}: no class has {TEST_EVERY} images, so the flat split leaves no test images")
    return FewShotData(dataset.classes, pool, test, root)


def draw_shots(labels: Sequence[int], num_classes: int, shots: int, seed: int) -> np.ndarray:
    """(num_classes, shots) indices into `labels`; [:, :k] are the k-shot draws, nested for a fixed seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} images to draw shots from, fewer than {shots}")
        chosen.append(rng.permutation(members)[:shots])
    return np.stack(chosen)


def default_cache_dir() -> Path:
    """`fewshot/` in allmlp's cache folder (`$ALLMLP_HOME`, else `$XDG_CACHE_HOME/allmlp`, else `~/.cache/allmlp`)."""
    return cache_dir() / "fewshot"


class FeatureCache:
    """Pre-logits per image file, in one safetensors file per (model, weights, data root, preprocessing).

    Rows are keyed by the image's relative path and remember its size and mtime: a changed file is recomputed,
    and a rerun with more seeds or shots computes only images it has not seen.
    """

    def __init__(self, path: Path | None):
        self.path, self.rows = path, {}
        if path is None or not path.is_file():
            return
        try:
            with safe_open(path, framework="pt") as f:
                features, stats = f.get_tensor("features"), f.get_tensor("file_stats")
                paths = json.loads(f.metadata()["paths"])
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            print(f"allmlp fewshot: ignoring unreadable feature cache {path} ({err})", file=sys.stderr)
            return
        self.rows = {p: (tuple(stat.tolist()), feat) for p, stat, feat in zip(paths, stats, features, strict=True)}

    @staticmethod
    def key(model_name: str, weights: str | os.PathLike, config: dict, root: Path, transform: object) -> str:
        stat = Path(weights).stat()
        identity = {
            "model": model_name,
            "config": config,
            "weights": [str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns],
            "data": str(root.resolve()),
            "transform": repr(transform),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def lookup(self, path: str, stat: tuple[int, int]) -> torch.Tensor | None:
        row = self.rows.get(path)
        return row[1] if row is not None and row[0] == stat else None

    def update(self, new: dict[str, tuple[tuple[int, int], torch.Tensor]]) -> None:
        self.rows.update(new)
        if self.path is None or not new:
            return
        paths = sorted(self.rows)
        tensors = {
            "features": torch.stack([self.rows[p][1] for p in paths]),
            "file_stats": torch.tensor([self.rows[p][0] for p in paths], dtype=torch.int64),
        }
        write_safetensors(tensors, self.path, {"paths": json.dumps(paths)})


def fewshot(
    model_name: str | None,
    weights: str | os.PathLike,
    data: str | os.PathLike,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: int = 5,
    l2: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int | None = None,
    preset: str | None = None,
) -> dict:
    """Top-1 (%) of the linear probe for each number of shots: mean, std (ddof=1) and values over seeds 0..seeds-1.

    cache_dir: where features are kept between runs (None: not kept).
    """
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive ints, got {list(shots)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    dataset = scan_fewshot_data(data)
    num_classes = len(dataset.classes)
    pool_labels = [label for _, label in dataset.pool]
    draws = {seed: draw_shots(pool_labels, num_classes, max(shots), seed) for seed in range(seeds)}
    needed = sorted(
        {dataset.pool[i][0] for drawn in draws.values() for i in drawn.ravel()} | {p for p, _ in dataset.test}
    )

    device = resolve_device(device)
    model = load_model(weights, model_name).to(device)
    label = model_name or type(model).__name__  # a file that carries its architecture needs no registry name
    model_name = entry_name(model, model_name)
    transform = eval_transform(model, model_name, preset)
    cache_path = None
    if cache_dir is not None:
        key = FeatureCache.key(model_name, weights, model.config, dataset.root, transform)
        cache_path = Path(cache_dir) / f"{model_name}-{key}.safetensors"
    cache = FeatureCache(cache_path)
    features = _features(model, dataset.root, needed, transform, cache, batch_size, device, num_workers)

    test_features = torch.stack([features[p] for p, _ in dataset.test])
    test_labels = torch.tensor([label for _, label in dataset.test])
    results = []
    for k in sorted(set(shots)):
        top1, chosen = [], []
        for seed in range(seeds):
            support = [dataset.pool[i] for i in draws[seed][:, :k].ravel()]
            probe, used = fit_linear_probe(
                torch.stack([features[p] for p, _ in support]),
                torch.tensor([label for _, label in support]),
                num_classes,
                l2,
            )
            top1.append(100.0 * float((probe.predict(test_features) == test_labels).double().mean()))
            chosen.append(used)
        std = float(np.std(top1, ddof=1)) if seeds > 1 else 0.0
        results.append({"shots": k, "top1_mean": float(np.mean(top1)), "top1_std": std, "top1": top1, "l2": chosen})
    return {
        "model": label,
        "weights": str(weights),
        "data": str(data),
        "classes": num_classes,
        "test_images": len(dataset.test),
        "seeds": seeds,
        "results": results,
    }


def _features(model, root, paths, transform, cache, batch_size, device, num_workers) -> dict[str, torch.Tensor]:
    stats = {}
    for path in paths:
        stat = (root / path).stat()
        stats[path] = (stat.st_size, stat.st_mtime_ns)
    found = {p: cache.lookup(p, stats[p]) for p in paths}
    missing = [p for p, feature in found.items() if feature is None]
    if missing:
        print(f"allmlp fewshot: computing features of {len(missing)} images ({len(paths) - len(missing)} cached)")
        result = forward_images(
            model,
            [root / p for p in missing],
            transform,
            pre_logits=True,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            desc="fewshot features",
        )
        new = {missing[i]: (stats[missing[i]], row) for i, row in zip(result.indices, result.outputs, strict=True)}
        cache.update(new)  # kept even if some files failed, so that a rerun does not recompute them
        if result.failures:
            listed = "; ".join(f"{missing[i]}: {why}" for i, why in list(result.failures.items())[:5])
            raise ValueError(f"{len(result.failures)} images could not be read ({listed})")
        found.update({p: feature for p, (_, feature) in new.items()})
    return found


def format_results(report: dict) -> str:
    lines = [
        f"{report['model']} ({report['weights']}) on {report['data']}: {report['classes']} classes, "
        f"{report['test_images']} test images, {report['seeds']} seeds",
        f"{'shots':>5}  {'top-1 %':>15}  l2 (per seed)",
    ]
    for row in report["results"]:
        l2s = ", ".join(f"{value:g}" for value in row["l2"])
        lines.append(f"{row['shots']:>5}  {row['top1_mean']:7.2f} +- {row['top1_std']:5.2f}  {l2s}")
    return "\n".join(lines)


def save_report(report: dict, path: str | os.PathLike) -> None:
    write_bytes_atomic(path, (json.dumps(report, indent=1) + "\n").encode())
