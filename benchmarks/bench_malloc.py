"""What keeping freed memory in the process (allmlp.allocator) does to eager inference: models run in fresh
processes, in pairs that alternate glibc's defaults (ALLMLP_MALLOC=system) and the allmlp command's setting.

Each process builds one model, runs warm-up batches, then times batches and counts the minor page faults they
take. The speed-up is taken inside each pair (retained over defaults) and its median reported, as the machine's
speed drifts between pairs on a shared host.
    taskset -c 0,1 python benchmarks/bench_malloc.py --threads 2 --batch 16 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import allmlp
from allmlp.allocator import apply_environment
from allmlp.tools.bench import input_size, machine_line

MODELS = ["mixer_b16_224", "activemlp_xt", "asmlp_t", "swinmlp_t_c24", "smlpnet_t", "wavemlp_t_dw"]
SETTINGS = ("system", "retain")


def child(args: argparse.Namespace) -> None:
    """One model in this process, under the malloc setting ALLMLP_MALLOC gives: one JSON line on stdout."""
    apply_environment()
    torch.set_num_threads(args.threads)
    model = allmlp.create_model(args.child).eval().to(torch.bfloat16)
    images = torch.randn(args.batch, *input_size(model), dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(args.warmup):
            model(images)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(args.batches):
            model(images)
        seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"img_per_s": args.batch * args.batches / seconds, "faults": faults / args.batches}))


def run_pair(name: str, args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--child", name]
        for option in ("threads", "batch", "warmup", "batches"):
            command += [f"--{option}", str(getattr(args, option))]
        env = {**os.environ, "ALLMLP_MALLOC": setting}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} ({setting}) failed:\n{done.stderr}")
        results[setting] = json.loads(done.stdout.splitlines()[-1])
    return results


def span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if format(low, fmt) == format(high, fmt) else f"{low:{fmt}}-{high:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)  # as each child runs (for the line below; the parent times nothing)
    print(machine_line(f"batch {args.batch}", malloc=False))  # the table compares both settings
    print(
        "| model | img/s, glibc defaults | img/s, freed memory kept | page faults per batch "
        "| speed-up (median of pairs) |"
    )
    print("|---|---|---|---|---|")
    for name in args.models:
        pairs = [run_pair(name, args) for _ in range(args.pairs)]
        speed = {s: [p[s]["img_per_s"] for p in pairs] for s in SETTINGS}
        faults = {s: [p[s]["faults"] for p in pairs] for s in SETTINGS}
        ratios = [p["retain"]["img_per_s"] / p["system"]["img_per_s"] for p in pairs]
        print(
            f"| {name} | {span(speed['system'], '.1f')} | {span(speed['retain'], '.1f')} | "
            f"{span(faults['system'], ',.0f')} → {span(faults['retain'], ',.0f')} | "
            f"{statistics.median(ratios):.2f}x ({span(ratios, '.2f')}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
