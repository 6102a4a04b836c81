"""Training checkpoints: `checkpoints/step_NNNNNNNN/` holds model.safetensors (save_weights format, so
`allmlp.create_model(path)` rebuilds the model), ema.safetensors when an EMA is kept, and state.pt with the
optimizer state, the step, the data position and the counters, readable with `torch.load(weights_only=True)`.

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash (or SIGKILL) at any
moment leaves either the complete new checkpoint or none; older ones are removed only after the rename, by first
renaming them to a hidden name. Hidden leftovers of a killed write or removal are deleted on the next save or start.
state.pt also records which run wrote it (a digest of the run's config and the number of processes), so a resume
refuses a checkpoint of another run or another process count.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import load_weights, save_weights
from ..weights.files import torch_reason

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_HIDDEN = ".step_"  # temporary folders being written, and old checkpoints being removed
_FILES = ("model.safetensors", "state.pt")  # what every complete checkpoint holds


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another run (other config) or another number of processes."""


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed: the run's config (as YAML text) and its process count."""

    config_digest: str
    world_size: int

    @classmethod
    def of(cls, config_yaml: str, world_size: int) -> RunIdentity:
        return cls(hashlib.sha256(config_yaml.encode()).hexdigest(), world_size)


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
    """Complete checkpoints of a run, oldest first (a folder that lost files to a killed removal is not one)."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and _complete(p))


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _FILES)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a kill can leave in checkpoints/: hidden folders of an interrupted write or removal, and step
    folders that lost files to an interrupted removal. Returns what was deleted."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    leftovers = [
        p
        for p in root.iterdir()
        if p.is_dir() and (p.name.startswith(_HIDDEN) or (_STEP_DIR.match(p.name) and not _complete(p)))
    ]
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    return leftovers


def _remove(checkpoint: Path) -> None:
    """Hide the folder first (one rename), so a kill during the removal leaves no half checkpoint under its name."""
    hidden = checkpoint.with_name(f"{_HIDDEN}removing.{checkpoint.name}")
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    ema_model: nn.Module | None,
    keep: int,
    identity: RunIdentity,
    class_names: list[str] | None = None,
) -> Path:
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir)
    final = root / f"step_{position.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_HIDDEN}{position.step:08d}.", dir=root))
    try:
        save_weights(model, tmp / "model.safetensors", class_names=class_names)
        if ema_model is not None:
            save_weights(ema_model, tmp / "ema.safetensors", class_names=class_names)
        state = {"optimizer": optimizer.state_dict(), "position": vars(position).copy(), "run": vars(identity).copy()}
        torch.save(state, tmp / "state.pt")
        if final.exists():  # the same step saved again (a resumed run that ended where it stopped)
            _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_model: nn.Module | None,
    identity: RunIdentity,
) -> Position:
    """Restore model, optimizer and EMA from checkpoint folder `path`; returns the saved position.

    CheckpointMismatchError when the checkpoint was written by another run or another number of processes."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, or not written by allmlp: never unpickled beyond tensors
        raise ValueError(f"{path / 'state.pt'}: cannot read the training state: {torch_reason(err)}") from err
    check_identity(path, state.get("run"), identity)
    load_weights(model, path / "model.safetensors")
    if ema_model is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path}: train.ema_decay is set but this checkpoint has no ema.safetensors")
        load_weights(ema_model, path / "ema.safetensors")
    optimizer.load_state_dict(state["optimizer"])
    return Position(**state["position"])


def check_identity(path: Path, saved: dict | None, identity: RunIdentity) -> None:
    if saved is None:  # written before checkpoints recorded their run: nothing to compare
        return
    if saved["world_size"] != identity.world_size:
        raise CheckpointMismatchError(
            f"--resume: {path} was written by {saved['world_size']} process(es), this run has "
            f"{identity.world_size}; resume with the same number (torchrun --nproc_per_node {saved['world_size']})"
        )
    if saved["config_digest"] != identity.config_digest:
        raise CheckpointMismatchError(
            f"--resume: {path} belongs to another run: its config differs from {path.parent.parent / 'config.yaml'}; "
            "start a new run with --output NEW_DIR instead"
        )


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    return found[-1]
