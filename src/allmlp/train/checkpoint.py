"""Training checkpoints: `checkpoints/step_NNNNNNNN/` holds model.safetensors (save_weights format, so
`allmlp.create_model(path)` rebuilds the model), ema.safetensors when an EMA is kept, and state.pt with the
optimizer state, the step, the data position and the counters, readable with `torch.load(weights_only=True)`.

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash (or SIGKILL) at any
moment leaves either the complete new checkpoint or none; older ones are removed only after the rename.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import load_weights, save_weights

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done; the next micro-batch is `batch` of `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    images_seen: int = 0
    best_eval_top1: float | None = None
    elapsed_s: float = 0.0


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    ema_model: nn.Module | None,
    keep: int,
) -> Path:
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{position.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_weights(model, tmp / "model.safetensors")
        if ema_model is not None:
            save_weights(ema_model, tmp / "ema.safetensors")
        state = {"optimizer": optimizer.state_dict(), "position": vars(position).copy()}
        torch.save(state, tmp / "state.pt")
        if final.exists():  # the same step saved again (a resumed run that ended where it stopped)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: nn.Module | None
) -> Position:
    """Restore model, optimizer and EMA from checkpoint folder `path`; returns the saved position."""
    load_weights(model, path / "model.safetensors")
    if ema_model is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path}: train.ema_decay is set but this checkpoint has no ema.safetensors")
        load_weights(ema_model, path / "ema.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return Position(**state["position"])


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    return found[-1]
