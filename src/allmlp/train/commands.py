"""`allmlp train | finetune | eval`: recipe + overrides -> checked RunConfig -> engine; prints where results are.

Everything that can be wrong in a config (unknown field, wrong type, missing data path or weights, unknown
model) is found here before a model is built or a batch is read.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from ..data import build_eval_loader
from ..evaluate.metrics import Accuracy, RealAccuracy, imagenet_val_index, load_real_labels
from ..models.registry import get_entry, list_models, timm_named
from ..progress import Progress
from ..weights import read_config
from . import distributed, rundir
from .checkpoint import latest_checkpoint
from .config import (
    ConfigError,
    RunConfig,
    build_dataclass,
    check_run_config,
    load_config,
    plain_value,
    read_yaml,
    same_value,
    to_dict,
)
from .engine import autocast_dtype, build_model, describe_model, fit, model_img_size

DEFAULT_RECIPES = {"train": "demo", "finetune": "mixer_finetune_imagefolder", "eval": None}


def resolve_config(command: str, config: str | None, overrides: list[str], weights: str | None = None) -> RunConfig:
    """The checked RunConfig for a command (ConfigError naming the field when anything is wrong)."""
    explicit = list(overrides)
    if weights is not None:
        overrides = [*overrides, f"model.weights={weights}"]
    cfg = load_config(config if config is not None else DEFAULT_RECIPES[command], overrides)
    check_run_config(cfg, command, distributed.world_size_from_env())
    return adopt_stored_architecture(cfg, explicit)


# stored config entries that are not the architecture: the head follows the data, regularisation the recipe
_NOT_ARCHITECTURE = ("num_classes", "drop_rate", "drop_path_rate", "img_size", "in_chans")


def adopt_stored_architecture(cfg: RunConfig, explicit: list[str]) -> RunConfig:
    """When model.weights is an allmlp safetensors file, its stored config decides the architecture (the recipe's
    model section yields to it); a command-line `model.*` override that contradicts it is an error naming both.
    model.img_size may differ: Mixer weights are then adapted to it (allmlp.adapt_resolution); so may
    model.in_chans: an RGB stem is then adapted to it, as timm does."""
    weights = cfg.model.weights
    stored = read_config(weights) if weights is not None else None
    if stored is None:
        return cfg
    architecture, config = stored
    given = {a.split("=", 1)[0].strip(): a.split("=", 1)[1] for a in explicit if "=" in a}
    m = cfg.model
    entry = get_entry(m.name)
    if entry.architecture.__name__ != architecture:
        if "model.name" in given:
            raise ConfigError(
                f"model.name={m.name} is a {entry.architecture.__name__}, but {weights} holds a {architecture}; "
                "leave model.name out (the file decides) or give weights of that architecture"
            )
        m.name = next(name for name in list_models() if get_entry(name).architecture.__name__ == architecture)
        entry = get_entry(m.name)
    config = timm_named(entry.architecture, config)  # img_size, drop_path_rate whatever the family calls them
    if "model.in_chans" not in given:
        m.in_chans = config["in_chans"]
    elif m.in_chans != config["in_chans"] and config["in_chans"] != 3:  # an RGB stem is adapted on loading
        raise ConfigError(
            f"model.in_chans={m.in_chans} contradicts {weights}, which was trained with in_chans={config['in_chans']} "
            "(only an RGB stem adapts to another in_chans)"
        )
    for key, value in config.items():
        path = f"model.overrides.{key}"
        if key not in _NOT_ARCHITECTURE and path in given and not same_value(m.overrides.get(key), value):
            raise ConfigError(f"{path}={m.overrides[key]} contradicts {weights}, which stores {key}={value}")
    m.overrides = {
        key: plain_value(value)
        for key, value in config.items()
        if key not in _NOT_ARCHITECTURE and not same_value(entry.config.get(key), value)
    }
    if "model.img_size" not in given:
        height, width = config["img_size"] if isinstance(config["img_size"], list) else [config["img_size"]] * 2
        if height == width:
            m.img_size = height
        else:  # model.img_size takes one side; a non-square size travels as a constructor argument
            m.img_size, m.overrides["img_size"] = None, [height, width]
    return cfg


def default_run_dir(config: str | None, command: str) -> Path:
    name = Path(config or DEFAULT_RECIPES[command] or command).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
        if overrides or weights or config or output:
            raise ConfigError(
                "--resume continues a run in its own folder exactly as configured: give no --config, --weights, "
                "--output or overrides"
            )
        check_run_config(cfg, command, distributed.world_size_from_env())
    else:
        cfg = resolve_config(command, config, overrides, weights)
        if output is not None:
            run_dir = Path(output)
            rundir.check_new_output(run_dir, command)  # before any data is read; fit claims it
        else:
            run_dir = default_run_dir(config, command)
            if _is_main_process():  # ranks other than 0 never write the run directory
                run_dir = rundir.new_run_dir(run_dir)
    try:
        summary = fit(cfg, run_dir, resume=resume is not None, new_head=command == "finetune", progress=progress)
    except BaseException:
        if output is None and resume is None and _is_main_process():
            rundir.remove_if_empty(run_dir)  # the name claimed for a run that failed before writing anything
        raise
    if _is_main_process():
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
    progress: bool | None = None,
) -> dict:
    """Top-1 / top-5 / per-class accuracy of a model + weights on a dataset (and ReaL with a real.json).

    Under torchrun every process evaluates its own part of the split and rank 0 alone prints and writes.
    With `output` the result goes to a new file in that folder (eval.json, else eval-2.json, ...): a training
    run's folder can hold it, and nothing of the run is touched."""
    cfg = resolve_config("eval", config, overrides, weights)
    if real_json is not None and not Path(real_json).is_file():
        raise ConfigError(f"--real-json: file not found: {real_json}")
    if real_json is not None and distributed.world_size_from_env() > 1:
        raise ConfigError("--real-json: ReaL needs every prediction in one process; run it without torchrun")
    if output is not None:
        if Path(output).exists() and not Path(output).is_dir():
            raise ConfigError(f"--output {output}: is a file, not a folder; eval writes eval.json into a folder")
        if _is_main_process():
            Path(output).mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails now, not at the end
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    procs = distributed.start(cfg.train.device)
    try:
        result = _evaluate(cfg, procs, split, real_json, progress)
    finally:
        distributed.stop()
    if not procs.is_main:
        return result
    print(
        f"{result['model']} on {cfg.data.kind} {split}: top-1 {result['eval_top1']:.4f}  "
        f"top-5 {result['eval_top5']:.4f}  ({result['eval_images']} images)"
    )
    if "real_top1" in result:
        print(f"ImageNet ReaL top-1 {result['real_top1']:.4f} ({result['real_images']} images with ReaL labels)")
    per_class = result["per_class_top1"].items()
    print("per-class top-1: " + ", ".join(f"{k} {v:.3f}" for k, v in per_class if v is not None))
    if output is not None:
        path = _new_result_file(Path(output), "eval", ".json")
        write_json_atomic(path, {**result, "config": to_dict(cfg)})
        print(f"results: {path.resolve()}")
    return result


def _evaluate(cfg: RunConfig, procs: distributed.Processes, split: str, real_json: str | None, progress) -> dict:
    loader = build_eval_loader(
        cfg.data,
        split=split,
        img_size=model_img_size(cfg),
        in_chans=cfg.model.in_chans,
        preprocessing=get_entry(cfg.model.name).preprocessing,
        batch_size=cfg.train.eval_batch_size,
        rank=procs.rank,
        world_size=procs.world_size,
    )
    model = build_model(cfg, loader.num_classes).to(procs.device).eval()
    dtype = autocast_dtype(cfg.train, procs.device)
    accuracy = Accuracy(loader.num_classes, procs.device)
    predictions = []
    shown = progress if procs.is_main else False
    with torch.no_grad(), Progress(loader.num_samples, f"eval {split}", interactive=shown) as bar:
        for images, targets in loader:
            with torch.autocast(procs.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images.to(procs.device))
            predictions += accuracy.update(logits.float(), targets.to(procs.device)).tolist()
            bar.update(len(targets))
    accuracy.reduce(distributed.all_reduce_sum)
    counts = accuracy.result()
    skipped = loader.skipped()
    result = {
        "eval_top1": counts["eval_top1"],
        "eval_top5": counts["eval_top5"],
        "eval_images": counts["eval_images"],
        "per_class_top1": dict(zip(loader.class_names, counts["per_class"], strict=True)),
        "skipped_images": len(skipped),  # this process's share: each rank reads its own part
        "skipped_files": skipped,
        "split": split,
        "data": {"kind": cfg.data.kind, "root": cfg.data.root, "eval_preset": cfg.data.eval_preset},
        "model": describe_model(cfg),
        "weights": {"path": str(Path(cfg.model.weights).resolve()), "sha256": _sha256(cfg.model.weights)},
        "world_size": procs.world_size,
        "device": str(procs.device),
        "precision": "bf16" if dtype else "fp32",
    }
    if real_json is not None:
        paths = _split_files(cfg, split, loader.class_names, skipped)
        if len(paths) != len(predictions):
            raise ValueError(f"--real-json: {len(predictions)} predictions for {len(paths)} readable files")
        real = RealAccuracy(load_real_labels(real_json))
        real.update(predictions, [imagenet_val_index(p) for p in paths])
        result.update(real.result())
    return result


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _new_result_file(folder: Path, stem: str, suffix: str) -> Path:
    """A path in `folder` that no file holds yet: stem.suffix, else stem-2.suffix, ... (reserved by creating it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        path = folder / (f"{stem}{suffix}" if number == 1 else f"{stem}-{number}{suffix}")
        try:
            path.open("x").close()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"{folder}: no free name for {stem}{suffix}")


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
