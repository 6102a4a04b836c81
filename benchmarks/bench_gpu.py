"""One CUDA GPU: Mixer-B/16 and one model of every family, bf16 inference and a bf16-autocast training step
(AdamW), allmlp against timm where timm has the model, both under torch.compile. Prints images/s, the share of
a large bf16 matrix product's rate measured in the same rounds ("of GEMM") and MFU against the GPU's dense bf16
peak. Stops starting new cases when the time budget is spent (the cases left are listed), so it fits a 10-minute
slot; `benchmarks/gpu.sh` runs it.

    python benchmarks/bench_gpu.py --budget 540                     # everything that fits in 9 minutes
    python benchmarks/bench_gpu.py --models mixer_b16_224 --modes inference
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from allmlp.tools.bench import Settings, bench, expand_cases, expand_models, format_table, machine, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_families import default_models  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.2}  # fmt: skip


def peak_tflops(name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="names or patterns (default: Mixer-B/16 and one per family)")
    parser.add_argument("--modes", nargs="+", choices=["inference", "train"], default=["inference", "train"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=540, help="seconds; no new case starts after this")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--out", default="bench-results/gpu")
    args = parser.parse_args()

    names = expand_models(args.models) if args.models else ["mixer_b16_224", *default_models()]
    cases = expand_cases(names, [args.batch], ["bf16"], args.modes, [args.compile == "on"])
    settings = Settings(compare="timm", rounds=args.rounds, warmup=3, device=args.device, gemm_size=8192)
    info = machine()
    device_name = info.get("gpu", info["cpu"])
    peak = peak_tflops(device_name, args.peak_tflops)
    start, rows, skipped = time.perf_counter(), [], []
    for case in cases:
        if time.perf_counter() - start > args.budget:
            skipped.append(case)
            continue
        rows += bench([case], settings)
    print(f"\n{device_name}, torch {info['torch']}, batch {args.batch}, compile {args.compile}")
    print(format_table(rows, markdown=True))
    if peak is not None:
        print(f"\nMFU against {peak:.0f} TFLOP/s dense bf16:")
        for row in rows:
            print(f"  {row.model} {row.mode} {row.impl}: {row.model_gflop_per_s / 1e3 / peak:.1%}")
    for case in skipped:
        print(f"not run (budget spent): {case.model} {case.mode}")
    write_results(rows, Path(args.out), {"device": device_name, **vars(args)})
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
