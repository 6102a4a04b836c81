"""What a run leaves behind and shows: metrics.jsonl, TensorBoard events, PNG plots, summary.json, progress.

Only rank 0 creates a `RunLog`. On a terminal the progress is a live bar (loss, lr, images/s, ETA); otherwise
(logs, CI, a terminal too narrow for a bar, such as one of width 0) it is a plain line every `log_every` steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..progress import is_interactive

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return rows


class RunLog:
    """Rank 0's writer for one run directory. `start_step` > 0 when resuming: later records are dropped."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.total_steps = run_dir, total_steps
        kept = [row for row in read_metrics(run_dir) if row["step"] <= start_step]
        with open(run_dir / METRICS_FILE, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        self.metrics = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 - open for the whole run
        # purge_step drops events at steps >= it: the checkpoint's own step was logged before it was saved, and stays
        purge_step = start_step + 1 if start_step else None
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        self.interactive = is_interactive() if progress is None else progress
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last_line = time.monotonic()

    def record(self, row: dict) -> None:
        """One metrics.jsonl line (and TensorBoard scalars) for step row['step']."""
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, int | float):
                self.tensorboard.add_scalar(key, value, row["step"])

    def progress(self, step: int, loss: float, lr: float, images_per_s: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.refresh()
        else:
            print(
                f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3g}  {images_per_s:.0f} img/s  "
                f"ETA {_duration(eta_s)}",
                flush=True,
            )

    def message(self, text: str, error: bool = False) -> None:
        """A line above the bar on a terminal; otherwise on stdout (stderr for warnings and errors)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.tensorboard.close()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def plot_metrics(run_dir: Path) -> list[Path]:
    """loss.png, lr.png and accuracy.png from metrics.jsonl (accuracy only once an evaluation ran)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_metrics(run_dir)
    plots = {
        "loss": [("loss", "train loss")],
        "lr": [("lr", "learning rate")],
        "accuracy": [("eval_top1", "eval top-1"), ("eval_top5", "eval top-5"), ("ema_eval_top1", "EMA eval top-1")],
    }
    written = []
    for name, series in plots.items():
        curves = [(label, [(r["step"], r[key]) for r in rows if key in r]) for key, label in series]
        curves = [(label, points) for label, points in curves if points]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in curves:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
