"""Run directories that never mix two runs: a new run gets an empty folder of its own, claimed atomically.

A default name (`runs/RECIPE-DATE-TIME`) is created with `mkdir`, which fails when another run took the name in
the same second; the next free suffix (`-2`, `-3`, ...) is taken instead. An `--output` that already holds files
is refused: it may be another run, whose checkpoints and results would be overwritten or, worse, resumed.
`config.yaml` is created exclusively, so two runs given the same empty folder cannot both start in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

CONFIG_FILE = "config.yaml"


def new_run_dir(base: Path) -> Path:
    """Create and return `base`, or `base-2`, `base-3`, ... when it is taken (by a run started the same second)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 10_000):
        candidate = base if suffix == 1 else base.with_name(f"{base.name}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"{base}: no free run directory name (tried 9,999 suffixes)")


def check_new_output(path: Path, command: str = "train") -> None:
    """A new run's folder must not exist yet or be empty; otherwise say how to continue it or what to do instead."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"--output {path}: is a file, not a folder; give a new folder name")
    entries = sorted(entry.name for entry in os.scandir(path))
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = (
            f"continue that run with `allmlp {command} --resume {path}`, or give a new name"
            if (path / CONFIG_FILE).is_file()
            else "give a new or empty folder"
        )
        raise ConfigError(f"--output {path}: not empty ({shown}); {hint}")


def claim(path: Path, config_yaml: str, command: str = "train") -> None:
    """Make `path` this run's folder: it must be new or empty; config.yaml is created exclusively."""
    check_new_output(path, command)
    path.mkdir(parents=True, exist_ok=True)
    try:
        with open(path / CONFIG_FILE, "x") as f:
            f.write(config_yaml)
    except FileExistsError:
        raise ConfigError(f"--output {path}: another run started in this folder at the same moment") from None


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (something worth keeping) or already gone
        pass
