"""`allmlp predict` (top-k classes of image files) and `allmlp embed` (pre-logits of a dataset, with the paths).

Both go on past a file that cannot be read: it is reported on stderr (and in the JSON output of predict), the
others are processed, and the command exits with status 1 so that scripts notice.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_bytes_atomic
from ..weights import read_class_names
from ..weights.files import write_safetensors
from .inference import eval_transform, find_images, forward_images, load_model, resolve_device


def class_names(
    num_classes: int, labels_file: str | os.PathLike | None = None, weights: str | os.PathLike | None = None
) -> list[str] | None:
    """Names of the classes: from `labels_file` (one per line, or a JSON list), else those stored in the weights
    file (`allmlp finetune` and `allmlp train` store the data's class names), ImageNet-1k's for a 1000-class head
    (shipped with torchvision, no download), else None (numeric ids are shown)."""
    if labels_file is not None:
        text = Path(labels_file).read_text(encoding="utf-8")
        if Path(labels_file).suffix == ".json":
            names = json.loads(text)
            if not isinstance(names, list):
                raise ValueError(f"{labels_file}: expected a JSON list of class names, got {type(names).__name__}")
            names = [str(name) for name in names]
        else:
            names = [line.strip() for line in text.rstrip("\n").split("\n")]
        if len(names) != num_classes:
            raise ValueError(f"{labels_file}: {len(names)} class names for a model with {num_classes} classes")
        return names
    stored = read_class_names(weights) if weights is not None else None
    if stored is not None and len(stored) == num_classes:
        return stored
    if num_classes == 1000:
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    return None


def predict(
    inputs: Sequence[str | os.PathLike],
    weights: str | os.PathLike,
    model_name: str | None,
    topk: int = 5,
    labels_file: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int | None = None,
    preset: str | None = None,
) -> list[dict]:
    """One record per image file, in input order: {"path", "top": [{"class", "name", "prob"}, ...]} or
    {"path", "error"} for a file that could not be read. Probabilities are the softmax of the logits."""
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    device = resolve_device(device)
    model = load_model(weights, model_name).to(device)
    num_classes = model.num_classes
    if num_classes == 0:
        raise ValueError(f"{weights}: the model has no classifier head; use `allmlp embed` for its features")
    names = class_names(num_classes, labels_file, weights)
    paths = find_images(inputs)
    result = forward_images(
        model,
        paths,
        eval_transform(model, model_name, preset),
        pre_logits=False,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        desc="predict",
    )
    if result.indices:
        probs, classes = result.outputs.softmax(dim=1).topk(min(topk, num_classes), dim=1)
    row_of = {index: row for row, index in enumerate(result.indices)}
    records = []
    for index, path in enumerate(paths):
        if index in result.failures:
            records.append({"path": str(path), "error": result.failures[index]})
            continue
        guesses = zip(probs[row_of[index]].tolist(), classes[row_of[index]].tolist(), strict=True)
        top = [{"class": c, "name": names[c] if names else str(c), "prob": p} for p, c in guesses]
        records.append({"path": str(path), "top": top})
    return records


def print_predictions(records: list[dict], as_json: bool) -> int:
    """Print the records (text or JSON on stdout, unreadable files on stderr); exit status 1 if any failed."""
    failed = [r for r in records if "error" in r]
    for record in failed:
        print(f"allmlp predict: cannot read {record['path']}: {record['error']}", file=sys.stderr)
    if as_json:
        print(json.dumps(records, indent=1))
    else:
        for record in records:
            if "top" in record:
                print(record["path"])
                for rank, guess in enumerate(record["top"], 1):
                    print(f"  {rank}. {guess['prob']:.4f}  {guess['class']:>5}  {guess['name']}")
    return 1 if failed else 0


def embed(
    inputs: Sequence[str | os.PathLike],
    weights: str | os.PathLike,
    model_name: str | None,
    out: str | os.PathLike,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int | None = None,
    preset: str | None = None,
) -> tuple[int, dict[str, str]]:
    """Write the pre-logits of every readable image under `inputs` to `out`; (rows written, {path: error}).

    .safetensors: tensor "embeddings" (N, D), the paths as a JSON list in the metadata key "paths".
    .npy: the (N, D) float32 array, and the paths as a JSON list in a sidecar file with the suffix .json.
    """
    out = Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"output must end in .safetensors or .npy, got {out}")
    device = resolve_device(device)
    model = load_model(weights, model_name).to(device)
    paths = find_images(inputs)
    result = forward_images(
        model,
        paths,
        eval_transform(model, model_name, preset),
        pre_logits=True,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        desc="embed",
    )
    kept = [str(paths[i]) for i in result.indices]
    info = {"model": model_name or type(model).__name__, "weights": str(weights)}
    if out.suffix == ".safetensors":
        metadata = {"paths": json.dumps(kept), **info}
        write_safetensors({"embeddings": result.outputs}, out, metadata)
    else:
        array = io.BytesIO()
        np.save(array, result.outputs.numpy(), allow_pickle=False)
        write_bytes_atomic(out, array.getvalue())
        write_bytes_atomic(out.with_suffix(".json"), json.dumps({"paths": kept, **info}, indent=1).encode())
    return len(kept), {str(paths[i]): reason for i, reason in result.failures.items()}


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """(embeddings, paths) from a file written by `embed`."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return torch.from_numpy(array), json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["paths"]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("embeddings"), json.loads(f.metadata()["paths"])
