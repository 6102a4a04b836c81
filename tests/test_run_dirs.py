"""Run directories never lose or mix runs: refused non-empty outputs, unique default names, eval beside a run,
resume checks, leftovers of killed checkpoint writes, Ctrl-C, TensorBoard after a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train_engine import tiny

from allmlp.cli import main
from allmlp.train import commands, rundir
from allmlp.train.checkpoint import (
    CheckpointMismatchError,
    RunIdentity,
    check_identity,
    checkpoints,
    remove_leftovers,
)


def train(tmp_path: Path, output: Path, *overrides: str) -> int:
    return main(["train", "--config", str(tiny(tmp_path, *overrides)), "--output", str(output)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_that_holds_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=2") == 0
    before = snapshot(run)
    capsys.readouterr()
    assert train(tmp_path, run, "train.steps=3") == 2
    err = capsys.readouterr().err
    assert f"--resume {run}" in err and "new name" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert train(tmp_path, other, "train.steps=2") == 2
    assert "not empty (notes.txt)" in capsys.readouterr().err and snapshot(other) == {"notes.txt": b"mine"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(tmp_path, empty, "train.steps=2") == 0  # an empty folder is as good as a new one


def test_default_run_directories_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(commands.time, "strftime", lambda fmt: "20261201-144418")
    recipe = str(tiny(tmp_path, "train.steps=2"))
    assert main(["train", "--config", recipe]) == 0
    assert main(["train", "--config", recipe]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny-20261201-144418", "tiny-20261201-144418-2"]
    assert all((tmp_path / "runs" / name / "summary.json").is_file() for name in runs)
    assert rundir.new_run_dir(tmp_path / "runs" / "tiny-20261201-144418").name == "tiny-20261201-144418-3"


def test_eval_writes_its_own_file_and_never_touches_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=2") == 0
    before = snapshot(run)
    weights = str(run / "model.safetensors")
    assert main(["eval", "--weights", weights, "--output", str(run), "train.eval_batch_size=500"]) == 0
    assert main(["eval", "--weights", weights, "--output", str(run), "--split", "train"]) == 0
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == ["eval-2.json", "eval.json"]
    first, second = (json.loads((run / name).read_text()) for name in ("eval.json", "eval-2.json"))
    assert first["split"] == "val" and first["eval_images"] == 1000 and second["split"] == "train"


def test_resume_refuses_a_checkpoint_of_another_run_or_process_count(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=2") == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["steps"] = 4  # as when another run's config.yaml replaced this one's
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(run)]) == 2
    assert "belongs to another run" in capsys.readouterr().err

    state = torch.load(checkpoints(run)[-1] / "state.pt", weights_only=True)
    two = RunIdentity(state["run"]["config_digest"], world_size=2)
    with pytest.raises(CheckpointMismatchError, match=r"written by 1 process\(es\), this run has 2"):
        check_identity(checkpoints(run)[-1], state["run"], two)


def test_resume_needs_no_output_or_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=2") == 0
    assert main(["train", "--resume", str(run), "--output", str(tmp_path / "x")]) == 2
    assert "give no --config, --weights, --output or overrides" in capsys.readouterr().err


def test_leftovers_of_killed_writes_and_removals_are_cleaned(tmp_path):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=1") == 0
    root = run / "checkpoints"
    (root / ".step_00000003.abc123").mkdir()  # SIGKILL while writing a checkpoint
    (root / ".step_00000003.abc123" / "model.safetensors").write_bytes(b"x" * 1000)
    (root / ".step_removing.step_00000001").mkdir()  # SIGKILL while removing an old one
    half = root / "step_00000002"  # an older release's removal killed half-way: state.pt already gone
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in checkpoints(run)] == ["step_00000004"]  # an incomplete folder is never resumed
    removed = sorted(p.name for p in remove_leftovers(run))
    assert removed == [".step_00000003.abc123", ".step_removing.step_00000001", "step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]

    (root / ".step_00000009.dead").mkdir()
    assert main(["train", "--resume", str(run)]) == 0  # the next start cleans them as well
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def test_resuming_a_finished_run_appends_no_metrics(tmp_path):
    run = tmp_path / "run"
    assert train(tmp_path, run, "train.steps=4") == 0
    metrics = (run / "metrics.jsonl").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "metrics.jsonl").read_text() == metrics
    assert json.loads((run / "summary.json").read_text())["eval_top1"] == summary["eval_top1"]


INTERRUPTED_RUN = """
import sys
from allmlp.cli import main
sys.exit(main(["train", "--config", sys.argv[1], "--output", sys.argv[2]]))
"""


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_resume_completes(tmp_path):
    steps = 3000  # long enough never to finish before the signal comes
    recipe = tiny(tmp_path, f"train.steps={steps}", "train.log_every=1", "train.eval_every=0")
    script = tmp_path / "interrupted_run.py"
    script.write_text(INTERRUPTED_RUN)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(recipe), str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and f"allmlp train --resume {run}" in err
    (checkpoint,) = checkpoints(run)
    step = int(checkpoint.name.removeprefix("step_"))
    assert 5 <= step < steps and f"checkpoint at step {step}" in err
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    assert not (run / "summary.json").exists()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step  # every finished step was logged, the checkpoint is the last of them


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(tmp_path):
    import allmlp.train.engine as engine

    run = tmp_path / "run"
    recipe = tiny(tmp_path, "train.steps=6", "train.log_every=1", "checkpoint.every_steps=3")
    real_step, calls = torch.optim.AdamW.step, []

    def interrupt_in_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a second Ctrl-C: stops at once; step 4 was logged, the checkpoint is step 3
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = interrupt_in_step_5
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.fit(commands.load_config(str(recipe)), run)
    finally:
        torch.optim.AdamW.step = real_step
    assert [p.name for p in checkpoints(run)] == ["step_00000003"]
    assert main(["train", "--resume", str(run)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(run, "loss") == [1, 2, 3, 4, 5, 6]  # step 3 survives the purge, 4 is not doubled
