"""Run configuration: dataclasses read from a YAML recipe, overridden by dotted paths, checked before any work.

A recipe is plain YAML whose sections mirror `RunConfig` (model, data, optim, schedule, train, checkpoint).
Every value is type-checked against its field (`optim.lr=abc` fails naming `optim.lr` and the expected type),
unknown fields fail with the closest names, and `check_run_config` checks what types cannot: registered model,
existing data paths and weight files, and consistent batch sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data import DataConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the field and what it expects."""


def option(default: Any, doc: str) -> Any:
    """A dataclass field with its `--help` text (mutable defaults are copied per instance)."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name: str = option("mixer_s16_224", "registered model name (`allmlp list`)")
    weights: str | None = option(
        None,
        "initial weights, any format allmlp.load_weights reads (finetune/eval); an allmlp safetensors file's stored "
        "config decides the architecture",
    )
    img_size: int | None = option(None, "input resolution; null: the registry entry's")
    in_chans: int = option(3, "input channels: 3 (RGB) or 1 (grey)")
    drop_rate: float = option(0.0, "dropout before the head")
    drop_path_rate: float = option(0.0, "stochastic depth at the last block (linear from 0)")
    overrides: dict = option({}, "other constructor arguments, e.g. {hidden_dim: 128, num_blocks: 6}")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd", "lamb"] = option(
        "adamw", "adam (L2 in the gradient), adamw (decoupled), sgd, lamb (layer-wise trust ratio, as ResMLP)"
    )
    lr: float = option(1e-3, "peak learning rate for the global batch")
    weight_decay: float = option(
        0.0, "decay of >= 2-D weights; never of 1-D params (biases, norms) nor of the model's no_weight_decay()"
    )
    betas: tuple[float, float] = option((0.9, 0.999), "adam/adamw/lamb betas")
    eps: float = option(1e-8, "adam/adamw/lamb epsilon (LAMB's usual value: 1e-6)")
    momentum: float = option(0.9, "sgd momentum")
    nesterov: bool = option(False, "sgd Nesterov momentum")
    clip_grad_norm: float | None = option(1.0, "global-norm gradient clipping; null: off")
    layer_decay: float | None = option(
        None, "layer-wise lr decay in (0, 1]: layer i of L trains at lr x layer_decay^(L - i), head 1; null: off"
    )


@dataclass
class ScheduleConfig:
    warmup_steps: int = option(0, "linear warmup steps (from warmup_start_lr to optim.lr)")
    warmup_epochs: float = option(0.0, "warmup in epochs, added to warmup_steps")
    warmup_start_lr: float = option(0.0, "learning rate at step 0")
    decay: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warmup, to end_lr")
    end_lr: float = option(0.0, "learning rate at the last step")


@dataclass
class TrainConfig:
    epochs: float | None = option(None, "training length in epochs (fractions allowed); or give steps")
    steps: int | None = option(None, "training length in optimizer steps; wins over epochs")
    batch_size: int = option(128, "global batch per optimizer step (all ranks, all accumulation micro-batches)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(256, "batch per rank for evaluation")
    loss: Literal["softmax", "sigmoid"] = option("softmax", "softmax or sigmoid (big_vision) cross-entropy")
    label_smoothing: float = option(0.0, "label smoothing of the targets")
    head_bias_init: float | None = option(None, "constant head bias at init, e.g. -6.9 with sigmoid loss")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", "auto: bf16 autocast where fast (CUDA, AMX/AVX-512 bf16)"
    )
    channels_last: bool = option(False, "channels-last memory format for model and inputs")
    compile: bool = option(False, "torch.compile the model")
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights; null: off")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when available")
    seed: int = option(0, "seed of initialisation, data order, augmentation and dropout")
    threads: int | None = option(None, "CPU threads per process; null: PyTorch's default")
    eval_every: int = option(0, "evaluate every N steps; 0: at the end of every epoch (and always at the end)")
    log_every: int = option(10, "log training metrics every N steps")


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, "checkpoint every N steps; 0: only at the end")
    keep: int = option(2, "keep the last K checkpoints")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------- typed conversion of plain data to dataclasses


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "a list [" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + tp.__name__ + " fields"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp`, or ConfigError naming `path`, the expected type and what came."""
    origin = typing.get_origin(tp)
    fail = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise fail
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail
        return build_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail
        return value
    if tp is float:
        # YAML reads 1e-3 (no dot) as a string; accept what Python reads as a finite number
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise fail from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise fail
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise fail
        return dict(value)
    raise TypeError(f"{path}: unsupported field type {tp!r}")


def _unknown_field(cls: type, name: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    where = f"{path}." if path else ""
    return ConfigError(f"unknown field {where}{name}; {hint}fields{' of ' + path if path else ''}: {', '.join(names)}")


def build_dataclass(cls: type, values: dict, path: str = "") -> Any:
    """An instance of dataclass `cls` from a plain mapping, every value converted to its field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise _unknown_field(cls, name, path)
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own checks (DataConfig validates itself on construction)
        raise ConfigError(str(err)) from err


def plain_value(value: object) -> object:
    """A config value as a recipe writes it: lists for tuples, and a square pair (a weights file's (28, 28)) as
    one int."""
    if isinstance(value, tuple | list):
        items = [plain_value(v) for v in value]
        return items[0] if len(items) == 2 and items[0] == items[1] and not isinstance(items[0], list) else items
    return value


def same_value(a: object, b: object) -> bool:
    return plain_value(a) == plain_value(b)


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ---------------------------------------------------------------- recipes and overrides


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_file: str | os.PathLike) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (`demo`, `mixer_b16_i1k`, ...)."""
    path = Path(name_or_file)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if shipped.is_file() and len(path.parts) == 1:
        return shipped
    raise ConfigError(f"--config: {name_or_file} is neither a file nor a shipped recipe ({', '.join(list_recipes())})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first on line {seen[key]}): "
                    "YAML would silently keep only the last value; remove one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, ...), got {type(values).__name__}")
    return values


def _field_type(path: str) -> Any:
    """The declared type of the field at a dotted path (ConfigError for unknown fields)."""
    cls: Any = RunConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            if cls is dict:  # free-form mapping (model.overrides): any key below it
                return Any
            raise ConfigError(f"{'.'.join(parts[:depth])} is not a section; cannot set {path}")
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_field(cls, part, ".".join(parts[:depth]))
        cls = typing.get_type_hints(cls)[part]
    return cls


def _is_text_field(tp: Any) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return str in args


def apply_override(values: dict, assignment: str) -> None:
    """Set `a.b.c=value` in the nested mapping `values`; the value is YAML (`[0.9, 0.95]`, `null`, `true`)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected FIELD=VALUE with a dotted field, e.g. optim.lr=0.001")
    path, text = assignment.split("=", 1)
    path = path.strip()
    tp = _field_type(path)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{path} is a section; set its fields, e.g. {path}.{dataclasses.fields(tp)[0].name}=...")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: cannot read {text!r} as a value: {err}") from err
    if _is_text_field(tp) and text.strip() not in ("null", "~") and not isinstance(value, str):
        value = text  # paths and names stay as typed: `data.root=2024` is the folder "2024"
    node = values
    for part in path.split(".")[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {part} holds {child!r}, not a mapping")
        node = child
    node[path.split(".")[-1]] = value


def load_config(config: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """The RunConfig of a recipe (file or shipped name; None: defaults) with dotted overrides applied."""
    values = read_yaml(recipe_path(config)) if config is not None else {}
    for assignment in overrides:
        apply_override(values, assignment)
    return build_dataclass(RunConfig, values)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_fields(cls: type = RunConfig, prefix: str = "", values: Any = None) -> list[str]:
    """One `--help` line per field: dotted path, type, value and its doc. The value is taken from `values` (an
    instance of `cls`, e.g. a command's default recipe) when given, else the field's default."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_fields(tp, f"{path}.", None if values is None else getattr(values, f.name)))
            continue
        if values is not None:
            default = getattr(values, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        shown = yaml.safe_dump(to_dict(default), default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {path} = {shown}  ({_type_name(tp)}){'  ' + doc if doc else ''}")
    return lines


# ---------------------------------------------------------------- checks that need more than types


def _positive(value: float | None, path: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{path}: expected a number {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_run_config(cfg: RunConfig, command: str = "train", world_size: int = 1) -> None:
    """Everything that can be checked before work starts: names, paths, ranges, batch arithmetic."""
    from ..models.registry import get_entry

    try:
        get_entry(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from err
    if cfg.model.in_chans not in (1, 3):
        raise ConfigError(f"model.in_chans: expected 1 (grey) or 3 (RGB), got {cfg.model.in_chans}")
    _positive(cfg.model.img_size, "model.img_size")
    for name in ("drop_rate", "drop_path_rate"):
        value = getattr(cfg.model, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{name}: expected a number in [0, 1), got {value}")
    if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: file not found: {cfg.model.weights}")
    if command in ("finetune", "eval") and cfg.model.weights is None:
        raise ConfigError(f"model.weights: `allmlp {command}` needs weights (--weights FILE or model.weights=FILE)")
    _check_data_paths(cfg.data)
    if command == "eval":
        return

    t = cfg.train
    if t.steps is None and t.epochs is None:
        raise ConfigError("train.epochs / train.steps: give the training length (one of them)")
    _positive(t.steps, "train.steps")
    _positive(t.epochs, "train.epochs")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
        _positive(getattr(t, name), f"train.{name}")
    _positive(t.eval_every, "train.eval_every", allow_zero=True)
    _positive(t.threads, "train.threads")
    if t.batch_size % (t.grad_accum * world_size):
        raise ConfigError(
            f"train.batch_size: {t.batch_size} must divide by grad_accum x processes = {t.grad_accum} x {world_size}"
        )
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing: expected a number in [0, 1), got {t.label_smoothing}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: expected a number in (0, 1) or null, got {t.ema_decay}")
    _positive(cfg.optim.lr, "optim.lr")
    _positive(cfg.optim.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(cfg.optim.clip_grad_norm, "optim.clip_grad_norm")
    if cfg.optim.layer_decay is not None and not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay: expected a number in (0, 1] or null, got {cfg.optim.layer_decay}")
    for i, beta in enumerate(cfg.optim.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}]: expected a number in [0, 1), got {beta}")
    s = cfg.schedule
    _positive(s.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    _positive(s.warmup_epochs, "schedule.warmup_epochs", allow_zero=True)
    _positive(s.warmup_start_lr, "schedule.warmup_start_lr", allow_zero=True)
    _positive(s.end_lr, "schedule.end_lr", allow_zero=True)
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps", allow_zero=True)
    _positive(cfg.checkpoint.keep, "checkpoint.keep")


def _check_data_paths(data: DataConfig) -> None:
    if data.kind == "demo":
        return
    if data.kind == "webdataset":
        if not data.train_shards and not data.val_shards:
            raise ConfigError("data.train_shards: webdataset needs shard patterns (data.train_shards, data.val_shards)")
        return
    if data.root is None:
        raise ConfigError(f"data.root: data.kind={data.kind} needs the dataset folder (data.root=PATH)")
    if not Path(data.root).is_dir():
        raise ConfigError(f"data.root: folder not found: {data.root}")
