"""The MLP-Mixer paper's invariance experiment (Section 3.4, Figure 4) on the bundled MNIST digits.

The same Mixer (the demo recipe's) and a small-image torchvision ResNet-18 are each trained three times: on the
original images, on images whose patches (and the pixels inside each patch) are shuffled by one fixed
permutation, and on images whose pixels are shuffled globally by one fixed permutation (`data.permute`, applied
in training and evaluation alike). Held-out top-1 of the six runs goes to a table (JSON, CSV, Markdown) and a
bar chart. The paper's finding: a Mixer is unchanged by the patch permutation (it has no notion of token order:
permuting its token-mixing weights undoes it exactly), a CNN is not.

Every run uses the demo recipe's data (shift augmentation) and optimizer (AdamW, 30% warmup, cosine, label
smoothing 0.1) with the model's own learning rate and number of epochs, and the same seed for initialisation
and data order.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, write_bytes_atomic
from ..data import build_loaders
from ..models.registry import get_entry
from ..tools.foreign import small_image_resnet
from ..train.config import ScheduleConfig, load_config
from ..train.engine import autocast_dtype, build_model, classification_loss, evaluate
from ..train.optim import Schedule, build_optimizer

CONDITIONS = ("original", "patches", "pixels")
PATCH = 4  # the demo Mixer's patch size: the patch permutation moves whole Mixer tokens


@dataclass
class InvarianceSettings:
    """Training length and learning rate per model; `steps` (if set) replaces epochs, for quick checks."""

    mixer_epochs: float = 10.0
    resnet_epochs: float = 1.0
    mixer_lr: float = 1e-2  # the demo recipe's
    resnet_lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0
    permute_seed: int = 0
    threads: int | None = None
    steps: int | None = None


def demo_mixer(num_classes: int = 10) -> nn.Module:
    """The demo recipe's Mixer (patch 4 on 28 x 28 grey digits, 4 blocks, width 128)."""
    return build_model(load_config("demo"), num_classes)


MODELS: dict[str, Callable[[], nn.Module]] = {"mixer": demo_mixer, "resnet18": small_image_resnet}


def run_invariance(
    out_dir: str | os.PathLike,
    settings: InvarianceSettings | None = None,
    models: dict[str, Callable[[], nn.Module]] | None = None,
    save_models: bool = False,
) -> list[dict]:
    """Train every model under every condition; write results.json, results.csv, results.md and invariance.png
    to `out_dir` (each atomically, after every run, so an interrupted experiment keeps what it measured).

    models: name -> builder of a fresh model for 28 x 28 grey digits (default: the demo Mixer and ResNet-18);
    a name starting with "mixer" gets the Mixer's epochs and learning rate, any other the ResNet's.
    save_models: also write each trained model as NAME_CONDITION.safetensors.
    """
    settings = settings or InvarianceSettings()
    models = models or MODELS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    rows = []
    try:
        for name, builder in models.items():
            for condition in CONDITIONS:
                rows.append(_train_one(name, builder, condition, settings, out_dir if save_models else None))
                write_results(rows, out_dir)
    finally:
        torch.set_num_threads(threads)
    return rows


def _train_one(name: str, builder, condition: str, settings: InvarianceSettings, save_dir: Path | None) -> dict:
    cfg = load_config("demo")
    permute = None if condition == "original" else condition
    data = dataclasses.replace(cfg.data, permute=permute, permute_patch=PATCH, permute_seed=settings.permute_seed)
    loaders = build_loaders(
        data,
        img_size=28,
        in_chans=1,
        preprocessing=get_entry(cfg.model.name).preprocessing,
        batch_size=settings.batch_size,
        eval_batch_size=500,
        seed=settings.seed,
    )
    is_mixer = name.startswith("mixer")
    epochs, lr = (
        (settings.mixer_epochs, settings.mixer_lr) if is_mixer else (settings.resnet_epochs, settings.resnet_lr)
    )
    steps_per_epoch = len(loaders.train)
    total = settings.steps or math.ceil(epochs * steps_per_epoch)
    device = torch.device("cpu")
    dtype = autocast_dtype(cfg.train, device)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)  # the same initial weights under every condition
        model = builder()
        # a CNN's convolutions run faster channels-last on CPUs (oneDNN); a Mixer's linear layers do not care
        channels_last = not is_mixer
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, lr=lr))
        schedule = Schedule(ScheduleConfig(warmup_steps=round(0.3 * total)), lr, total, steps_per_epoch)
        started, started_cpu = time.monotonic(), time.process_time()
        step, epoch = 0, 0
        model.train()
        while step < total:
            for images, targets in loaders.train.batches(epoch):
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                schedule.apply(optimizer, step)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(images)
                loss = classification_loss(logits, targets, "softmax", cfg.train.label_smoothing)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == total:
                    break
            epoch += 1
            print(f"allmlp invariance: {name} / {condition}: step {step}/{total}, loss {loss.item():.4f}", flush=True)
        train_s, cpu_s = time.monotonic() - started, time.process_time() - started_cpu
        top1 = evaluate(model, loaders.val, loaders.num_classes, device, dtype, channels_last).result()["eval_top1"]
    print(f"allmlp invariance: {name} / {condition}: held-out top-1 {top1:.4f} ({train_s:.0f} s)", flush=True)
    if save_dir is not None:
        _save_model(model, save_dir / f"{name}_{condition}.safetensors")
    return {
        "model": name,
        "condition": condition,
        "top1": top1,
        "steps": total,
        "epochs": total / steps_per_epoch,
        "lr": lr,
        "train_s": round(train_s, 1),  # wall clock
        "train_cpu_s": round(cpu_s, 1),  # CPU time of all threads: the work itself, on a shared machine
    }


def _save_model(model: nn.Module, path: Path) -> None:
    from ..weights import save_weights
    from ..weights.files import write_safetensors

    if getattr(model, "config", None) is not None:
        save_weights(model, path)
    else:  # a torchvision model: its state dict, which `allmlp compare torchvision:NAME` loads back
        write_safetensors(model.state_dict(), path, {"format": "pt"})


def write_results(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """results.json, results.csv, results.md (model x condition top-1 in %) and invariance.png (bar chart)."""
    out_dir = Path(out_dir)
    write_bytes_atomic(out_dir / "results.json", (json.dumps(rows, indent=1) + "\n").encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out_dir / "results.csv", text.getvalue().encode())
    write_bytes_atomic(out_dir / "results.md", (markdown_table(rows) + "\n").encode())
    draw_bars(rows, out_dir / "invariance.png")
    return [out_dir / f for f in ("results.json", "results.csv", "results.md", "invariance.png")]


def _grid(rows: list[dict]) -> tuple[list[str], dict[tuple[str, str], dict]]:
    names = list(dict.fromkeys(row["model"] for row in rows))
    return names, {(row["model"], row["condition"]): row for row in rows}


def markdown_table(rows: list[dict]) -> str:
    names, by_key = _grid(rows)
    header = "| model | " + " | ".join(CONDITIONS) + " | epochs per run | training wall s / CPU s (3 runs) |"
    lines = [header, "|---" * 6 + "|"]
    for name in names:
        cells = [f"{100 * by_key[name, c]['top1']:.2f}%" if (name, c) in by_key else "" for c in CONDITIONS]
        done = [by_key[name, c] for c in CONDITIONS if (name, c) in by_key]
        wall, cpu = sum(row["train_s"] for row in done), sum(row["train_cpu_s"] for row in done)
        lines.append(f"| {name} | {' | '.join(cells)} | {done[0]['epochs']:g} | {wall:.0f} / {cpu:.0f} |")
    return "\n".join(lines)


def draw_bars(rows: list[dict], out: str | os.PathLike) -> Path:
    """Grouped bars: one group per model, one bar per condition, labelled with the top-1 in %."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names, by_key = _grid(rows)
    figure, ax = plt.subplots(figsize=(1.6 + 2.2 * len(names), 3.2))
    width = 0.8 / len(CONDITIONS)
    colors = {"original": "#4c72b0", "patches": "#55a868", "pixels": "#c44e52"}
    for i, condition in enumerate(CONDITIONS):
        xs = [j for j, name in enumerate(names) if (name, condition) in by_key]
        values = [100 * by_key[names[j], condition]["top1"] for j in xs]
        offsets = [x + (i - 1) * width for x in xs]
        bars = ax.bar(offsets, values, width, label=condition, color=colors[condition])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("fixed input permutations, MNIST (1,000 held-out digits)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)
    return Path(out)
