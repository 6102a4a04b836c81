"""The training loop: model + data + optimizer from a RunConfig, evaluation, checkpoints, exact resumption.

Exact resumption rests on three facts: the data stream is a pure function of (seed, epoch, rank, position)
(allmlp.data), the learning rate is a pure function of the step (optim.Schedule), and every other random draw
(dropout, stochastic depth, MixUp/CutMix) comes from generators re-seeded from (seed, rank, step) at each step.
A checkpoint therefore needs only the weights, the optimizer state and the position, and a run killed at any
point and resumed from its last checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import write_json_atomic
from ..data import Loaders, build_loaders
from ..data.sampling import mix_seed
from ..evaluate.metrics import Accuracy
from ..models.registry import create_model, get_entry
from ..tools.resolution import load_weights_adapted
from ..weights import save_weights
from . import distributed, rundir
from .checkpoint import (
    Position,
    RunIdentity,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from .config import RunConfig, TrainConfig, dump_yaml, plain_value, same_value
from .optim import EMA, Schedule, build_optimizer
from .outputs import SUMMARY_FILE, RunLog, plot_metrics

# streams of randomness, distinct from the data layer's (allmlp.data.sampling uses 0..4)
_INIT, _STEP, _MIX = 100, 101, 102


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the run stopped without writing a checkpoint."""


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run between two steps; a checkpoint of the last finished step was written."""

    def __init__(self, step: int, checkpoint: Path, run_dir: Path, command: str):
        super().__init__(
            f"interrupted: saved a checkpoint at step {step} ({checkpoint}); "
            f"continue with `allmlp {command} --resume {run_dir}`"
        )
        self.step, self.checkpoint, self.run_dir = step, checkpoint, run_dir


class _StopRequests:
    """The first SIGINT asks the loop to stop after the current step (and save); a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, procs: distributed.Processes) -> bool:
        """Whether any process was asked to stop: all of them must stop at the same step."""
        if not procs.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=procs.device)
        return bool(distributed.all_reduce_sum(flag).item())


def describe_model(cfg: RunConfig, built: dict | None = None) -> str:
    """What the model is: its registry name, or the architecture with every value that differs from that entry
    (the demo's small Mixer is not a mixer_s16_224, it only starts from that entry's config). `built`: the
    model's own config, when it differs from what cfg asked for (token mixing adapted to another size)."""
    entry = get_entry(cfg.model.name)
    if built is not None:
        changed = {k: v for k, v in built.items() if k not in ("num_classes", "drop_rate", "drop_path_rate")}
    else:
        changed = {**cfg.model.overrides}
        if cfg.model.img_size is not None:
            changed["img_size"] = cfg.model.img_size
        if cfg.model.in_chans != 3:
            changed["in_chans"] = cfg.model.in_chans
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(entry.architecture.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    changed = {k: v for k, v in changed.items() if not same_value(entry.config.get(k, defaults.get(k)), v)}
    if not changed:
        return cfg.model.name
    order = list(entry.config)
    keys = sorted(changed, key=lambda k: order.index(k) if k in order else len(order))
    return f"{entry.architecture.__name__}({', '.join(f'{k}={plain_value(changed[k])}' for k in keys)})"


def build_model(cfg: RunConfig, num_classes: int, *, new_head: bool = False) -> nn.Module:
    """The configured model with `num_classes` outputs, and model.weights loaded when given.

    new_head (fine-tuning): the checkpoint's classifier is dropped for a zero-initialised one of num_classes.
    The model is built at model.img_size; Mixer weights of another resolution are adapted (paper App. C).
    """
    m = cfg.model
    options = dict(in_chans=m.in_chans, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, **m.overrides)
    # a family without dropout (sMLPNet) takes no drop_rate: leave it out at 0 (any other value stays, and fails)
    architecture = get_entry(m.name).architecture
    accepted = set(inspect.signature(architecture.__init__).parameters) | set(getattr(architecture, "timm_names", {}))
    options = {k: v for k, v in options.items() if k in accepted or k not in ("drop_rate", "drop_path_rate") or v}
    model = create_model(m.name, num_classes=num_classes, img_size=m.img_size, **options)
    if m.weights is not None:
        model = load_weights_adapted(model, m.weights, reset_head=new_head)
    if cfg.train.head_bias_init is not None and (m.weights is None or new_head):
        with torch.no_grad():
            model.get_classifier().bias.fill_(cfg.train.head_bias_init)
    return model


def model_img_size(cfg: RunConfig) -> int | tuple[int, int]:
    stored = cfg.model.overrides.get("img_size")  # a non-square size adopted from an allmlp weights file
    entry = get_entry(cfg.model.name)
    registered = entry.config.get(getattr(entry.architecture, "timm_names", {}).get("img_size", "img_size"))
    return cfg.model.img_size or (tuple(stored) if stored else None) or registered


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or on 'auto' where the hardware computes it fast; None: full fp32."""
    if train.precision == "bf16" or (train.precision == "auto" and distributed.fast_bf16(device)):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, label_smoothing: float) -> torch.Tensor:
    """Softmax or sigmoid (big_vision: summed over classes, mean over images) cross-entropy.

    targets: class indices (N,) or probabilities (N, classes) from MixUp/CutMix; smoothing mixes in uniform 1/K.
    """
    logits = logits.float()
    if kind == "softmax" and targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    soft = F.one_hot(targets, logits.shape[1]).float() if targets.ndim == 1 else targets.float()
    if label_smoothing:
        soft = soft * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    if kind == "softmax":
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(dim=1).mean()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, num_classes: int, device: torch.device, dtype: torch.dtype | None, channels_last=False
) -> Accuracy:
    """Top-1 / top-5 / per-class counts over every process's share of `loader`, summed over processes."""
    was_training = model.training
    model.eval()
    accuracy = Accuracy(num_classes, device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(images)
        accuracy.update(logits.float(), targets.to(device))
    accuracy.reduce(distributed.all_reduce_sum)
    model.train(was_training)
    return accuracy


def _micro_batches(train_stream, epoch: int, batch: int, usable: int) -> Iterator[tuple[int, int, tuple]]:
    """(epoch, index, batch) from `batch` of `epoch` on, forever; `usable` batches of each epoch are used."""
    while True:
        stream = train_stream.batches(epoch, start=batch)
        try:
            for index in range(batch, usable):
                yield epoch, index, next(stream)
        finally:
            stream.close()
        epoch, batch = epoch + 1, 0


class _LossWindow:
    """Per-step losses since the last check, kept on the device: one sync per check instead of one per step."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def mean(self, world_size: int) -> float | None:
        """Mean loss over the window and all processes; NonFiniteLossError naming the first bad step."""
        if not self.losses:
            return None
        losses = distributed.all_reduce_sum(torch.stack(self.losses).float()) / world_size
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = int(bad[0])
            raise NonFiniteLossError(
                f"training loss is {losses[first].item()} at step {self.steps[first]}; stopped without saving"
            )
        self.steps, self.losses = [], []
        return float(losses.mean())


def fit(
    cfg: RunConfig, run_dir: Path, *, resume: bool = False, new_head: bool = False, progress: bool | None = None
) -> dict:
    """Train as `cfg` says, writing the run directory (rank 0); returns the summary.

    A new run needs a new or empty `run_dir` (ConfigError otherwise). A new run that fails before its first
    checkpoint (unreadable data, ...) removes what it wrote; Ctrl-C saves a checkpoint and raises
    TrainingInterrupted."""
    procs = distributed.start(cfg.train.device)
    threads = torch.get_num_threads()
    # the caller's RNG state and thread count are left as they were (fit re-seeds at every step)
    with torch.random.fork_rng(devices=[procs.device] if procs.device.type == "cuda" else []):
        try:
            return _fit(cfg, Path(run_dir), procs, resume, new_head, progress)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err}. {_nan_advice(cfg, Path(run_dir))}") from None
        finally:
            torch.set_num_threads(threads)
            distributed.stop()


def _nan_advice(cfg: RunConfig, run_dir: Path) -> str:
    found = checkpoints(run_dir)
    kept = f"Checkpoints up to {found[-1].name} are intact, but" if found else "No checkpoint was written, and"
    return (
        f"{kept} --resume repeats the same settings. Start a new run from this one's config with a lower learning "
        f"rate (and clipping, if off): allmlp train --config {run_dir / rundir.CONFIG_FILE} --output NEW_DIR "
        f"optim.lr={cfg.optim.lr / 10:g} optim.clip_grad_norm={cfg.optim.clip_grad_norm or 1.0:g}"
    )


def _warmup_warning(cfg: RunConfig, total_steps: int, steps_per_epoch: int) -> str | None:
    """A warning when the warm-up is longer than the run (e.g. the demo's recipe cut to one epoch)."""
    warmup = cfg.schedule.warmup_steps + cfg.schedule.warmup_epochs * steps_per_epoch
    if warmup <= total_steps:
        return None
    return (
        f"warning: the warm-up ({warmup:g} steps: schedule.warmup_steps {cfg.schedule.warmup_steps} + "
        f"warmup_epochs {cfg.schedule.warmup_epochs:g} x {steps_per_epoch} steps/epoch) is longer than the run "
        f"({total_steps} steps): the learning rate stops at {total_steps / warmup:.0%} of the way to optim.lr and "
        "never decays; shorten schedule.warmup_steps / schedule.warmup_epochs to match"
    )


def _fit(cfg: RunConfig, run_dir: Path, procs: distributed.Processes, resume: bool, new_head: bool, progress) -> dict:
    run_started = time.monotonic()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    per_rank = t.batch_size // procs.world_size
    micro_batch = per_rank // t.grad_accum
    entry = get_entry(cfg.model.name)
    loaders = build_loaders(
        cfg.data,
        img_size=model_img_size(cfg),
        in_chans=cfg.model.in_chans,
        preprocessing=entry.preprocessing,
        batch_size=micro_batch,
        eval_batch_size=t.eval_batch_size,
        seed=t.seed,
        rank=procs.rank,
        world_size=procs.world_size,
    )
    steps_per_epoch = len(loaders.train) // t.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size: {t.batch_size} x grad_accum leaves no full step in one epoch of data")
    total_steps = t.steps or math.ceil(t.epochs * steps_per_epoch)
    identity = RunIdentity.of(dump_yaml(cfg), procs.world_size)
    fresh_dir = procs.is_main and not resume
    if fresh_dir:
        existed = run_dir.is_dir()
        rundir.claim(run_dir, dump_yaml(cfg))
    try:
        plan = _Plan(loaders, steps_per_epoch, total_steps, identity, run_started)
        return _train(cfg, run_dir, procs, plan, resume, new_head, progress)
    except (NonFiniteLossError, TrainingInterrupted):
        raise
    except BaseException:
        if fresh_dir and not checkpoints(run_dir):  # nothing to resume: leave no half-written run behind
            shutil.rmtree(run_dir, ignore_errors=True)
            if existed:
                run_dir.mkdir(exist_ok=True)
        raise


@dataclass(frozen=True)
class _Plan:
    """What `_fit` settled before the run directory was claimed: the data, the run's length and its identity."""

    loaders: Loaders
    steps_per_epoch: int
    total_steps: int
    identity: RunIdentity
    started: float  # time.monotonic() when fit began


def _train(
    cfg: RunConfig,
    run_dir: Path,
    procs: distributed.Processes,
    plan: _Plan,
    resume: bool,
    new_head: bool,
    progress: bool | None,
) -> dict:
    t, device = cfg.train, procs.device
    loaders, identity, run_started = plan.loaders, plan.identity, plan.started
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    torch.manual_seed(mix_seed(t.seed, _INIT))  # the same initial weights on every rank and every run
    model = build_model(cfg, loaders.num_classes, new_head=new_head).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule(cfg.schedule, cfg.optim.lr, total_steps, steps_per_epoch)
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    position = Position()
    if resume:
        if procs.is_main:
            remove_leftovers(run_dir)
        distributed.barrier()
        model_ema = ema.model if ema else None
        position = load_checkpoint(latest_checkpoint(run_dir), model, optimizer, model_ema, identity)
    elapsed_before = position.elapsed_s
    dtype = autocast_dtype(t, device)

    train_model: nn.Module = model
    ddp = None
    if procs.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        train_model = ddp
    if t.compile:
        train_model = torch.compile(train_model)

    log = None
    if procs.is_main:
        log = RunLog(run_dir, total_steps, position.step, progress)
        warning = _warmup_warning(cfg, total_steps, steps_per_epoch)
        if warning is not None:
            log.message(warning, error=True)
        log.message(
            f"{describe_model(cfg, model.config)}: "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {loaders.num_classes} "
            f"classes, {steps_per_epoch} steps/epoch x batch {t.batch_size}, {total_steps} steps, "
            f"{procs.world_size} process(es) on {device}, {'bf16 autocast' if dtype else 'fp32'}"
        )

    def save() -> Path:
        saved = run_dir / "checkpoints" / f"step_{position.step:08d}"
        if procs.is_main:
            model_ema, keep, names = ema.model if ema else None, cfg.checkpoint.keep, loaders.class_names
            saved = save_checkpoint(run_dir, model, optimizer, position, model_ema, keep, identity, names)
        distributed.barrier()
        return saved

    def run_eval(record: bool = True) -> dict:
        result = evaluate(model, loaders.val, loaders.num_classes, device, dtype, t.channels_last).result()
        row = {"eval_top1": result["eval_top1"], "eval_top5": result["eval_top5"]}
        if ema is not None:
            ema_result = evaluate(ema.model, loaders.val, loaders.num_classes, device, dtype, t.channels_last).result()
            row.update(ema_eval_top1=ema_result["eval_top1"], ema_eval_top5=ema_result["eval_top5"])
        if position.best_eval_top1 is None or result["eval_top1"] > position.best_eval_top1:
            position.best_eval_top1 = result["eval_top1"]
        if log is not None and record:
            log.record({"step": position.step, "epoch": position.step / steps_per_epoch, **row})
            extra = f"  EMA top-1 {row['ema_eval_top1']:.4f}" if ema is not None else ""
            log.message(f"step {position.step}: eval top-1 {row['eval_top1']:.4f}  top-5 {row['eval_top5']:.4f}{extra}")
        return {**result, **row}

    window = _LossWindow()
    usable = steps_per_epoch * t.grad_accum
    micro_batches = _micro_batches(loaders.train, position.epoch, position.batch, usable)
    mix_generator = torch.Generator()  # MixUp/CutMix draw their parameters on the CPU
    started, started_step = time.monotonic(), position.step
    window_start, window_images = time.monotonic(), 0
    last_eval: dict | None = None
    model.train()
    stop = _StopRequests()
    interrupted = False
    try:
        with stop:
            try:
                while position.step < total_steps:
                    if stop.agreed(procs):
                        interrupted = True
                        break
                    step = position.step
                    torch.manual_seed(
                        mix_seed(t.seed, _STEP, procs.rank, step)
                    )  # dropout / stochastic depth of this step
                    mix_generator.manual_seed(mix_seed(t.seed, _MIX, procs.rank, step))
                    lr = schedule.apply(optimizer, step)
                    step_loss = torch.zeros((), device=device)
                    for accum in range(t.grad_accum):
                        epoch, index, (images, targets) = next(micro_batches)
                        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                        if t.channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        if loaders.mix is not None:
                            images, targets = loaders.mix(images, targets, mix_generator)
                        last = accum == t.grad_accum - 1
                        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
                        with sync:
                            with _autocast(device, dtype):
                                logits = train_model(images)
                            loss = classification_loss(logits, targets, t.loss, t.label_smoothing) / t.grad_accum
                            loss.backward()
                        step_loss += loss.detach()
                    if cfg.optim.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                    window.add(step, step_loss)
                    position.step = step + 1
                    position.epoch, position.batch = (epoch, index + 1) if index + 1 < usable else (epoch + 1, 0)
                    position.images_seen += t.batch_size
                    window_images += t.batch_size

                    done = position.step == total_steps
                    epoch_end = position.batch == 0
                    evaluating = (
                        done or (t.eval_every and position.step % t.eval_every == 0) or (not t.eval_every and epoch_end)
                    )
                    saving = done or (cfg.checkpoint.every_steps and position.step % cfg.checkpoint.every_steps == 0)
                    if position.step % t.log_every == 0 or evaluating or saving:
                        mean_loss = window.mean(procs.world_size)  # raises on a non-finite loss, before any save
                        if log is not None and mean_loss is not None:
                            now = time.monotonic()
                            images_per_s = window_images / max(now - window_start, 1e-9)
                            steps_done = position.step - started_step
                            eta = (now - started) / steps_done * (total_steps - position.step)
                            log.record(
                                {
                                    "step": position.step,
                                    "epoch": position.step / steps_per_epoch,
                                    "lr": lr,
                                    "loss": mean_loss,
                                    "images_per_s": images_per_s,
                                }
                            )
                            log.progress(position.step, mean_loss, lr, images_per_s, eta)
                        window_start, window_images = time.monotonic(), 0
                    if evaluating:
                        last_eval = run_eval()
                    position.elapsed_s = elapsed_before + time.monotonic() - run_started
                    if saving:
                        save()
            except Exception:
                if not stop.requested:  # e.g. a DataLoader worker that the same Ctrl-C stopped
                    raise
                interrupted = True
        if interrupted:  # the model, optimizer and position are those of the last finished step
            raise TrainingInterrupted(position.step, save(), run_dir, "finetune" if new_head else "train")
        if last_eval is None:  # resumed from the final checkpoint: nothing left to train, evaluate the result
            last_eval = run_eval(record=False)  # its metrics were recorded when the run first ended
        position.elapsed_s = elapsed_before + time.monotonic() - run_started
    finally:
        micro_batches.close()
        if log is not None:
            log.close()

    summary = {
        "eval_top1": last_eval["eval_top1"],
        "eval_top5": last_eval["eval_top5"],
        "best_eval_top1": position.best_eval_top1,
        "per_class_top1": dict(zip(loaders.class_names, last_eval["per_class"], strict=True)),
        "steps": position.step,
        "epochs": position.step / steps_per_epoch,
        "images_seen": position.images_seen,
        "wall_time_s": position.elapsed_s,
        "skipped_images": len(loaders.skipped()),
        "skipped_files": loaders.skipped(),
        "model": describe_model(cfg, model.config),
        "model_entry": cfg.model.name,  # the registry entry it was built from (and preprocessed as)
        "model_config": model.config,
        "world_size": procs.world_size,
        "device": str(device),
        "precision": "bf16" if dtype else "fp32",
    }
    if ema is not None:
        summary.update(ema_eval_top1=last_eval["ema_eval_top1"], ema_eval_top5=last_eval["ema_eval_top5"])
    if procs.is_main:
        save_weights(model, run_dir / "model.safetensors", class_names=loaders.class_names)
        if ema is not None:
            save_weights(ema.model, run_dir / "ema.safetensors", class_names=loaders.class_names)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        plot_metrics(run_dir)
    distributed.barrier()
    return summary
