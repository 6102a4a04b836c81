"""`allmlp train | finetune | eval`: recipe + overrides -> checked RunConfig -> engine; prints where results are.

Everything that can be wrong in a config (unknown field, wrong type, missing data path or weights, unknown
model) is found here before a model is built or a batch is read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from ..data import build_eval_loader
from ..evaluate.metrics import Accuracy, RealAccuracy, imagenet_val_index, load_real_labels
from ..models.registry import get_entry
from . import distributed
from .checkpoint import latest_checkpoint
from .config import ConfigError, RunConfig, build_dataclass, check_run_config, dump_yaml, load_config, read_yaml
from .engine import autocast_dtype, build_model, fit, model_img_size

DEFAULT_RECIPES = {"train": "demo", "finetune": "mixer_finetune_imagefolder", "eval": None}


def resolve_config(command: str, config: str | None, overrides: list[str], weights: str | None = None) -> RunConfig:
    """The checked RunConfig for a command (ConfigError naming the field when anything is wrong)."""
    if weights is not None:
        overrides = [*overrides, f"model.weights={weights}"]
    cfg = load_config(config if config is not None else DEFAULT_RECIPES[command], overrides)
    check_run_config(cfg, command, distributed.world_size_from_env())
    return cfg


def default_run_dir(config: str | None, command: str) -> Path:
    name = Path(config or DEFAULT_RECIPES[command] or command).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_command(
    command: str,
    config: str | None,
    overrides: list[str],
    output: str | None,
    resume: str | None = None,
    weights: str | None = None,
    progress: bool | None = None,
) -> dict:
    """Run `allmlp train` / `allmlp finetune`; with `resume` (a run directory) continue that run exactly."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        latest_checkpoint(run_dir)  # fails now, not after loading data, when there is nothing to resume
        values = read_yaml(run_dir / "config.yaml")
        cfg = build_dataclass(RunConfig, values)
        if overrides or weights or config:
            raise ConfigError(
                "--resume continues a run exactly as configured: give no --config, --weights or overrides"
            )
        check_run_config(cfg, command, distributed.world_size_from_env())
    else:
        cfg = resolve_config(command, config, overrides, weights)
        run_dir = Path(output) if output else default_run_dir(config, command)
    summary = fit(cfg, run_dir, resume=resume is not None, new_head=command == "finetune", progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        top1, top5, seconds = summary["eval_top1"], summary["eval_top5"], summary["wall_time_s"]
        print(f"eval top-1 {top1:.4f}  top-5 {top5:.4f}  in {seconds:.0f} s")
        print(f"run directory: {run_dir.resolve()}")
    return summary


def eval_command(
    config: str | None,
    overrides: list[str],
    weights: str | None,
    output: str | None,
    real_json: str | None = None,
    split: str = "val",
) -> dict:
    """Top-1 / top-5 / per-class accuracy of a model + weights on a dataset (and ReaL with a real.json)."""
    cfg = resolve_config("eval", config, overrides, weights)
    if real_json is not None and not Path(real_json).is_file():
        raise ConfigError(f"--real-json: file not found: {real_json}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.pick_device(cfg.train.device)
    loader = build_eval_loader(
        cfg.data,
        split=split,
        img_size=model_img_size(cfg),
        in_chans=cfg.model.in_chans,
        preprocessing=get_entry(cfg.model.name).preprocessing,
        batch_size=cfg.train.eval_batch_size,
    )
    model = build_model(cfg, loader.num_classes).to(device).eval()
    dtype = autocast_dtype(cfg.train, device)
    accuracy = Accuracy(loader.num_classes, device)
    predictions = []
    with torch.no_grad():
        for images, targets in loader:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images.to(device))
            predictions += accuracy.update(logits.float(), targets.to(device)).tolist()
    result = accuracy.result()
    result["per_class"] = dict(zip(loader.class_names, result["per_class"], strict=True))
    result["skipped_images"] = loader.skipped()
    if real_json is not None:
        paths = _split_files(cfg, split, loader.class_names, loader.skipped())
        if len(paths) != len(predictions):
            raise ValueError(f"--real-json: {len(predictions)} predictions for {len(paths)} readable files")
        real = RealAccuracy(load_real_labels(real_json))
        real.update(predictions, [imagenet_val_index(p) for p in paths])
        result.update(real.result())

    print(
        f"{cfg.model.name} on {cfg.data.kind} {split}: top-1 {result['eval_top1']:.4f}  top-5 {result['eval_top5']:.4f}"
        f"  ({result['eval_images']} images)"
    )
    if "real_top1" in result:
        print(f"ImageNet ReaL top-1 {result['real_top1']:.4f} ({result['real_images']} images with ReaL labels)")
    print("per-class top-1: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class"].items() if v is not None))
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        write_json_atomic(out / "eval.json", result)
        print(f"results: {(out / 'eval.json').resolve()}")
    return result


def _split_files(cfg: RunConfig, split: str, class_names: list[str], skipped: list[str]) -> list[str]:
    """The files behind an ImageFolder eval loader's predictions: it yields the split's files in scan order
    (class by class, sorted), less the unreadable ones."""
    from ..data.datasets import scan_image_folder

    if cfg.data.kind != "imagefolder":
        raise ConfigError(
            f"--real-json: needs data.kind=imagefolder (the ImageNet validation files), got {cfg.data.kind}"
        )
    folder = cfg.data.val_split if split == "val" else cfg.data.train_split
    unreadable = set(skipped)
    paths = scan_image_folder(cfg.data.root, folder, f"{split}_split", class_names, cfg.model.in_chans).paths
    return [p for p in paths if p not in unreadable]
