"""`allmlp compare`: layer-by-layer linear CKA between two models on the same images.

A model is a registered allmlp name (with its weights), `timm:NAME` or `torchvision:NAME` (weights: a state-dict
file; none: the random initialisation). Layers are chosen as the model interface gives them: allmlp and timm
models by `forward_intermediates` indices (default: all of them, i.e. every block or stage), torchvision models
by node name through `create_feature_extractor` (default: every block of each stack of blocks, e.g. ResNet's
`layer1.0`, `layer1.1`, ...). Each layer's output is flattened per image (positions x channels), as in Kornblith
et al. 2019 and Raghu et al. 2021.

The images (an ImageFolder tree, searched recursively, or the bundled demo digits) are put in one fixed random
order and split into CKA batches; each model's per-layer Gram matrices of every batch are what is computed and
cached (`~/.cache/allmlp/compare`, a folder per model, weights, data, preprocessing, layers and batching, a
file per batch), so comparing one model with several others runs it once. See `cka.py` for the estimators.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import atomic_path, write_bytes_atomic
from ..data.datasets import UNREADABLE_ERRORS, read_image
from ..data.transforms import build_eval_transform
from ..models.registry import Preprocessing
from ..tools.foreign import load_foreign, split_spec
from ..weights.files import write_safetensors
from ..weights.hub import cache_dir
from .cka import CKAAccumulator, batch_slices, gram

DEMO = "demo"  # --data demo: the bundled MNIST digits' 1,000 held-out images
IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 1.0)


def default_cache_dir() -> Path:
    """`compare/` in allmlp's cache folder (`$ALLMLP_HOME`, else `$XDG_CACHE_HOME/allmlp`, else `~/.cache/allmlp`)."""
    return cache_dir() / "compare"


@dataclass
class LayeredModel:
    """A model that maps a batch of prepared images to the outputs of its chosen layers."""

    spec: str
    weights: str | None
    layers: list[str]  # names, in the order `forward` returns them
    forward: Callable[[torch.Tensor], list[torch.Tensor]]
    transform: Callable
    in_chans: int
    identity: dict  # what the cached Gram matrices depend on (besides the data)


def _parse_indices(layers: Sequence[str] | None, spec: str) -> list[int] | None:
    if not layers:
        return None
    try:
        return [int(layer) for layer in layers]
    except ValueError:
        raise ValueError(
            f"layers of {spec} are forward_intermediates indices (integers, negative from the end), got {list(layers)}"
        ) from None


def _weights_identity(weights: str | os.PathLike | None) -> list | None:
    if weights is None:
        return None
    stat = Path(weights).stat()
    return [str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns]


def load_layered(
    spec: str,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    img_size: int | None = None,
    device: str = "cpu",
) -> LayeredModel:
    """The model named by `spec` with its chosen layers and its input transform: the whole image resized to the
    input size (no crop, so that both models of a comparison see the same content), normalised as its weights
    expect (allmlp: the registry entry's; timm: its pretrained_cfg; torchvision: ImageNet mean and std).

    img_size: the input size (default: the allmlp or timm model's own; 224 for torchvision models).
    """
    source, name = split_spec(spec)
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"weights of {spec}: file not found: {weights}")
    if source == "torchvision":
        return _torchvision_layers(spec, weights, layers, img_size, device)
    if source == "timm":
        model = load_foreign(spec, weights, img_size)
        config = model.pretrained_cfg
        preprocessing = Preprocessing(
            tuple(config["mean"]), tuple(config["std"]), config.get("interpolation", "bicubic"), 1.0
        )
        size = img_size or config["input_size"][-1]
        in_chans = config["input_size"][0]
        info = getattr(model, "feature_info", None)
        names = [entry["module"] for entry in info] if info else None
    else:
        from ..models.registry import create_model, get_entry
        from ..tools.inference import input_size, load_model

        model = load_model(weights, name) if weights is not None else create_model(name).eval()
        preprocessing = get_entry(name).preprocessing
        size = img_size or input_size(model)
        in_chans = model.config.get("in_chans", 3)
        names = [info["module"] for info in model.feature_info]
    model = model.to(device).eval()
    indices = _parse_indices(layers, spec)
    if names is None or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{spec} has no forward_intermediates / feature_info to choose layers from")
    chosen = list(range(len(names))) if indices is None else indices
    for index in chosen:
        if not -len(names) <= index < len(names):
            raise ValueError(f"layer {index} of {spec} is out of range: it has {len(names)} (0..{len(names) - 1})")
    chosen = [index % len(names) for index in chosen]

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return model.forward_intermediates(x, indices=chosen, intermediates_only=True)

    transform = build_eval_transform(preprocessing, size, "resize", in_chans=in_chans)
    identity = {"spec": spec, "weights": _weights_identity(weights), "layers": chosen, "transform": repr(transform)}
    return LayeredModel(
        spec, weights and str(weights), [names[i] for i in chosen], forward, transform, in_chans, identity
    )


def block_stacks(model: nn.Module) -> list[str]:
    """The blocks of every stack of blocks: children of an nn.Sequential whose children are all of one type
    (ResNet's layer1..layer4, a ViT's encoder layers), in order."""
    names = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        if isinstance(module, nn.Sequential) and len(children) > 1:
            kinds = {type(child) for _, child in children}
            if len(kinds) == 1 and any(p.numel() for p in module.parameters()):
                names.extend(f"{name}.{child}" for child, _ in children)
    return names


def _torchvision_layers(spec, weights, layers, img_size, device) -> LayeredModel:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = load_foreign(spec, weights).to(device)
    nodes = list(layers) if layers else block_stacks(model)
    if not nodes:
        raise ValueError(f"{spec}: no stack of blocks found; name the layers (graph nodes) to compare")
    _, known = get_graph_node_names(model)
    # a module's name stands for its output, the last of the nodes listed under it
    unknown = [node for node in nodes if node not in known and not any(k.startswith(node + ".") for k in known)]
    if unknown:
        raise ValueError(f"{spec} has no nodes {unknown}; some of its nodes: {known[:40]}")
    extractor = create_feature_extractor(model, return_nodes=nodes).eval()
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)).weight.shape[1]

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return list(extractor(x).values())

    transform = build_eval_transform(IMAGENET, img_size or 224, "resize", in_chans=in_chans)
    identity = {"spec": spec, "weights": _weights_identity(weights), "layers": nodes, "transform": repr(transform)}
    return LayeredModel(spec, weights and str(weights), nodes, forward, transform, in_chans, identity)


@dataclass
class ImageSet:
    """The images to compare on, in the fixed random order: paths, or uint8 tensors (the demo set)."""

    name: str  # the data identity in cache keys
    items: list  # str paths or (C, H, W) uint8 tensors
    ids: list[str]  # what each item is (for cache keys): path, size and mtime, or its position in the demo split

    def load(self, index: int, in_chans: int):
        item = self.items[index]
        return read_image(item, in_chans) if isinstance(item, str) else item


def image_set(data: str | os.PathLike, max_images: int | None = None, seed: int = 0) -> ImageSet:
    """`demo` or an ImageFolder tree (every image file under it), shuffled by `seed`, the first max_images kept."""
    if str(data) == DEMO:
        from ..data.datasets import load_demo

        images = load_demo(train=False).images
        items, name = list(images), "demo/val"
        ids = [f"demo/val[{i}]" for i in range(len(items))]
    else:
        from ..tools.inference import find_images

        if not Path(data).is_dir():
            raise ValueError(f"--data must be an image folder or 'demo', got {data}")
        items = [str(p) for p in find_images([data])]
        stats = [Path(p).stat() for p in items]
        ids = [f"{p}|{st.st_size}|{st.st_mtime_ns}" for p, st in zip(items, stats, strict=True)]
        name = str(Path(data).resolve())
    order = np.random.default_rng(seed).permutation(len(items))
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        order = order[:max_images]
    return ImageSet(name, [items[i] for i in order], [ids[i] for i in order])


class GramCache:
    """One model's per-layer Gram matrices, one safetensors file per CKA batch in a folder (None: not kept), so
    that memory stays bounded by one batch and an interrupted run keeps the batches it finished."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def get(self, batch: int, count: int) -> list[torch.Tensor] | None:
        path = self.folder / f"batch{batch}.safetensors" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                return [f.get_tensor(f"layer{i}") for i in range(count)]
        except (SafetensorError, OSError) as err:
            print(f"allmlp compare: ignoring unreadable cache file {path} ({err})", file=sys.stderr)
            return None

    def put(self, batch: int, grams: list[torch.Tensor]) -> None:
        if self.folder is not None:
            tensors = {f"layer{i}": k for i, k in enumerate(grams)}
            write_safetensors(tensors, self.folder / f"batch{batch}.safetensors", {"format": "pt"})


def _cache_for(model: LayeredModel, images: ImageSet, slices: list[slice], cache_dir) -> GramCache:
    if cache_dir is None:
        return GramCache(None)
    identity = {
        **model.identity,
        "data": images.name,
        "items": images.ids,
        "batches": [[s.start, s.stop] for s in slices],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    safe_spec = "".join(c if c.isalnum() or c in "-_" else "_" for c in model.spec)
    return GramCache(Path(cache_dir) / f"{safe_spec}-{key}")


@torch.no_grad()
def _batch_grams(
    model: LayeredModel, images: ImageSet, rows: slice, batch_size: int, device: str
) -> list[torch.Tensor]:
    """Gram matrices of every chosen layer over the images in `rows`, forwarded batch_size at a time."""
    features: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for start in range(rows.start, rows.stop, batch_size):
        pixels = []
        for index in range(start, min(start + batch_size, rows.stop)):
            item = images.items[index]
            try:
                pixels.append(model.transform(images.load(index, model.in_chans)))
            except UNREADABLE_ERRORS as err:
                raise ValueError(f"cannot read {item}: {err}") from err
        outputs = model.forward(torch.stack(pixels).to(device))
        for kept, out in zip(features, outputs, strict=True):
            kept.append(out.float().flatten(1).cpu())
    return [gram(torch.cat(kept)) for kept in features]


def compare(
    model_a: LayeredModel,
    model_b: LayeredModel,
    images: ImageSet,
    cka_batch: int | None = 256,
    unbiased: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict:
    """The CKA matrix between every chosen layer of A (rows) and of B (columns).

    cka_batch: images per CKA batch (Nguyen et al.'s minibatch estimator); None: all images in one batch (the
    full estimate; memory grows with the number of images squared). unbiased: the debiased HSIC estimator, else
    Kornblith et al.'s plain one (exact only for a single batch). progress: a bar on stderr (None: if a terminal).
    """
    from tqdm import tqdm

    n = len(images.items)
    slices = batch_slices(n, cka_batch or n)
    accumulator = CKAAccumulator(unbiased)
    caches = [_cache_for(m, images, slices, cache_dir) for m in (model_a, model_b)]
    disable = None if progress is None else not progress
    with tqdm(total=2 * n, desc="allmlp compare", unit="img", disable=disable, file=sys.stderr) as bar:
        for j, rows in enumerate(slices):
            grams = []
            for model, cache in zip((model_a, model_b), caches, strict=True):
                found = cache.get(j, len(model.layers))
                if found is None:
                    found = _batch_grams(model, images, rows, batch_size, device)
                    cache.put(j, found)
                grams.append(found)
                bar.update(rows.stop - rows.start)
            accumulator.update(*grams)
    matrix = accumulator.result()
    return {
        "a": {"model": model_a.spec, "weights": model_a.weights, "layers": model_a.layers},
        "b": {"model": model_b.spec, "weights": model_b.weights, "layers": model_b.layers},
        "data": images.name,
        "images": n,
        "cka_batches": len(slices),
        "estimator": ("minibatch" if len(slices) > 1 else "full") + (", unbiased HSIC" if unbiased else ""),
        "cka": matrix.tolist(),
    }


def save_comparison(report: dict, out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """cka.json, cka.csv (rows: layers of A, columns: layers of B) and cka.png (the heatmap) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "cka.json", (json.dumps(report, indent=1) + "\n").encode())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f"{report['a']['model']} \\ {report['b']['model']}", *report["b"]["layers"]])
    for layer, row in zip(report["a"]["layers"], report["cka"], strict=True):
        writer.writerow([layer, *(f"{value:.6f}" for value in row)])
    write_bytes_atomic(out_dir / "cka.csv", text.getvalue().encode())
    draw_heatmap(report, out_dir / "cka.png", title)
    return [out_dir / "cka.json", out_dir / "cka.csv", out_dir / "cka.png"]


def draw_heatmap(report: dict, out: str | os.PathLike, title: str | None = None) -> Path:
    """CKA as colour, layers of A up the y axis and of B along the x axis (first layers at the origin)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    matrix = np.array(report["cka"], dtype=float)
    rows, cols = matrix.shape
    figure, ax = plt.subplots(figsize=(2.2 + 0.32 * cols, 1.6 + 0.3 * rows))
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), report["b"]["layers"], rotation=90, fontsize=7)
    ax.set_yticks(range(rows), report["a"]["layers"], fontsize=7)
    ax.set_xlabel(report["b"]["model"], fontsize=8)
    ax.set_ylabel(report["a"]["model"], fontsize=8)
    ax.set_title(title or f"linear CKA ({report['estimator']}), {report['images']} images", fontsize=8)
    figure.colorbar(image, ax=ax, fraction=0.05)
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)
    return Path(out)
