"""MLP-Mixer speed: allmlp against timm's same architecture in one process, with interleaved rounds.

Each suite is a call of allmlp's bench tool (`allmlp bench --help` has every knob); timm gets allmlp's weights
and must give the same float32 features (the final norm's tokens) before anything is timed.

  foundation  Mixer-B/16, batch 16, inference: fp32 and bf16 weights (the foundation issue's table)
  inference   Mixer-B/16, batch 16, inference: fp32 and bf16 weights; allmlp eager, as
              allmlp.optimize_for_inference(model) ("allmlp optimized", against timm eager) and compiled (inductor
              freezing, against timm compiled); then allmlp's best path against timm's best path, head to head
  train       Mixer-S/16, batch 32, training step (bf16 autocast, AdamW), eager and compiled; then best vs best
  memory      Mixer-B/16, batch 32, training with and without grad checkpointing: activation memory

    taskset -c 0,1 python benchmarks/bench_mixer.py --suite foundation --threads 2
    python benchmarks/bench_mixer.py --suite inference train memory --threads 2 --rounds 7

"Best vs best" times the fastest configuration of each implementation (by median) once more in shared rounds,
so that its ratio is as trustworthy as the per-configuration ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from allmlp.allocator import apply_environment
from allmlp.tools.bench import (
    Case,
    Row,
    Settings,
    bench,
    checkpointing_summary,
    expand_cases,
    format_table,
    machine_line,
    run_case,
    write_results,
)

SUITES = {
    "foundation": dict(models=["mixer_b16_224"], batch_sizes=[16], dtypes=["fp32", "bf16"], modes=["inference"],
                       compile_modes=[False]),
    "inference": dict(models=["mixer_b16_224"], batch_sizes=[16], dtypes=["fp32", "bf16"], modes=["inference"],
                      compile_modes=[False, True], optimize_modes=[False, True]),
    "train": dict(models=["mixer_s16_224"], batch_sizes=[32], dtypes=["bf16"], modes=["train"],
                  compile_modes=[False, True]),
    "memory": dict(models=["mixer_b16_224"], batch_sizes=[32], dtypes=["bf16"], modes=["train"],
                   compile_modes=[False], grad_checkpointing=True),
}  # fmt: skip
HEAD_TO_HEAD = ("inference", "train")


def best_vs_best(rows: list[Row], settings: Settings) -> list[Row]:
    """allmlp's fastest configuration against timm's fastest, timed again in shared rounds."""
    ours, peer = (
        Case(r.model, r.batch_size, r.dtype, r.mode, r.compile, r.grad_checkpointing, r.impl == "allmlp optimized")
        for r in (min((r for r in rows if r.impl.startswith(impl)), key=lambda r: r.ms_per_batch)
                  for impl in ("allmlp", settings.compare))
    )  # fmt: skip
    print(f"best vs best: allmlp {ours} against timm {peer}", flush=True)
    return run_case(ours, settings, lambda message: print(message, flush=True), peer_case=peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=["foundation"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue measures 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench-results/mixer", help="one folder of results per suite in here")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for the README)")
    args = parser.parse_args()
    apply_environment()  # the allmlp command's malloc setting, for both implementations alike
    settings = Settings(
        compare="timm", rounds=args.rounds, warmup=args.warmup, threads=args.threads, device=args.device,
        clock=args.clock,
    )  # fmt: skip
    for suite in args.suite:
        rows = bench(expand_cases(**SUITES[suite]), settings)
        head_to_head = best_vs_best(rows, settings) if suite in HEAD_TO_HEAD else []
        print(f"\n## {suite}: {machine_line(f'{args.clock} clock')}")
        print(format_table(rows, args.markdown))
        for line in checkpointing_summary(rows):
            print(line)
        if head_to_head:
            print("best vs best, in shared rounds:")
            print(format_table(head_to_head, args.markdown))
        out = Path(args.out) / suite
        write_results(rows, out, {"suite": suite, **vars(args)})
        if head_to_head:
            write_results(head_to_head, out / "best_vs_best", {"suite": suite, **vars(args)})
        print(f"wrote {out}/", flush=True)


if __name__ == "__main__":
    main()
