"""Inference speed of every family against its authors' formulation, in one process, interleaved rounds.

The authors' formulations are the independent re-implementations the parity tests check allmlp against
(`tests/reference/<family>.py`: each written as the authors' code computes it, with their module names); for
gMLP and gMixer, which have no official code, the peer is timm's model. Both get the same weights, and their
logits must agree in float32 before anything is timed.

Per model and dtype it reports images/s (median over rounds), the ratio to the authors' formulation in the same
dtype (median over rounds of the per-round ratio), and the share of the machine's matrix-product rate the model
reaches: its FLOPs (matrix products and convolutions, counted by torch's FlopCounterMode) per second over the
rate of a 2048 x 2048 x 2048 product in the same dtype, timed in the same rounds. A formulation that has no
kernel in a dtype (torchvision's deform_conv2d in bfloat16) is reported as such.

    python benchmarks/bench_families.py --threads 2 --batch 16 --rounds 5            # one model per family
    python benchmarks/bench_families.py --models 'wavemlp_*' --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pkgutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import allmlp
from allmlp.models.registry import REGISTRY
from allmlp.tools.bench import Gemm, expand_models, machine

TESTS = Path(__file__).resolve().parent.parent / "tests"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GEMM_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # allmlp bench's names for the reference product's dtype
# Covered by their own benchmarks (bench_mixer.py against timm, bench_cyclemlp_vip.py against the authors').
OWN_BENCHMARK = {"MlpMixer", "CycleMLP", "VisionPermutator"}


def authors_constructors() -> dict[str, object]:
    """allmlp class name -> constructor of the authors' formulation, from every module in tests/reference."""
    sys.path.insert(0, str(TESTS))
    import reference

    constructors = {}
    for module in pkgutil.iter_modules(reference.__path__):
        constructors.update(importlib.import_module(f"reference.{module.name}").AUTHORS)
    return constructors


def peer_for(name: str, model: nn.Module, constructors: dict) -> tuple[str, nn.Module]:
    """("authors" or "timm", the peer model with `model`'s weights)."""
    architecture = type(model).__name__
    if architecture in constructors:
        peer = constructors[architecture](**model.config)
        peer.load_state_dict(model.state_dict())
        return "authors", peer
    import timm

    peer = timm.create_model(name, pretrained=False)
    allmlp.load_weights(model, peer.state_dict())  # timm's names, read by allmlp's loader
    return "timm", peer


def default_models() -> list[str]:
    """The smallest registered model (by parameters) of every family without a benchmark of its own."""
    smallest: dict[str, tuple[int, str]] = {}
    for name, entry in sorted(REGISTRY.items()):
        architecture = entry.architecture.__name__
        if architecture in OWN_BENCHMARK:
            continue
        with torch.device("meta"):
            count = sum(p.numel() for p in allmlp.create_model(name).parameters())
        smallest[architecture] = min(smallest.get(architecture, (count, name)), (count, name))
    return [name for _, name in sorted(smallest.values(), key=lambda pair: pair[1])]


def flops_per_image(model: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *shape))
    return counter.get_total_flops()


def timed(run, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        run(images)
    return time.perf_counter() - start


def bench_model(name: str, args: argparse.Namespace, constructors: dict) -> list[dict]:
    torch.manual_seed(0)
    model = allmlp.create_model(name).eval()
    with torch.no_grad():  # a zero-initialised head would make every logit 0 and hide any difference
        model.get_classifier().weight.normal_(0, 0.02)
    for module in model.modules():  # random BatchNorm statistics: an untouched BN would hide a wrong layout
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    peer_kind, peer = peer_for(name, model, constructors)
    peer.eval()
    shape = tuple(model.pretrained_cfg["input_size"])
    images = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(images[:2]) - peer(images[:2])).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"{name}: allmlp and the {peer_kind} formulation disagree (max |logit difference| {diff:.2e})")
    print(f"{name}: logits agree with the {peer_kind} formulation to {diff:.1e}", file=sys.stderr)
    flops = flops_per_image(model, shape) * args.batch

    runs = {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        x = images.to(dtype)
        for impl, net in ((peer_kind, peer), ("allmlp", model)):
            net = copy.deepcopy(net).to(dtype)
            try:
                with torch.no_grad():
                    net(x[:1])
            except (RuntimeError, NotImplementedError) as err:
                runs[impl, dtype_name] = str(err).splitlines()[0][:60]
                continue
            runs[impl, dtype_name] = (net, x)
            if args.compile and impl == "allmlp":
                import torch._inductor.config as inductor_config

                compiled = torch.compile(net)
                with inductor_config.patch(freezing=True), torch.no_grad():
                    compiled(x)
                runs["allmlp compiled", dtype_name] = (compiled, x)
        for key, run in list(runs.items()):
            if key[1] == dtype_name and not isinstance(run, str):
                timed(run[0], run[1])  # warm-up

    seconds = {key: [] for key, run in runs.items() if not isinstance(run, str)}
    gemms = {name: Gemm(2048, GEMM_DTYPES[name], torch.device("cpu"), "wall") for name in args.dtypes}
    gemm = {dtype_name: [] for dtype_name in args.dtypes}
    order = list(seconds)
    for r in range(args.rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            net, x = runs[key]
            seconds[key].append(timed(net, x))
        for dtype_name in args.dtypes:
            gemm[dtype_name].append(gemms[dtype_name]())

    rows = []
    for (impl, dtype_name), run in runs.items():
        row = dict(model=name, dtype=dtype_name, impl=impl, peer=peer_kind)
        if isinstance(run, str):
            rows.append({**row, "note": f"no {dtype_name} run: {run}"})
            continue
        t = seconds[impl, dtype_name]
        base = seconds.get((peer_kind, dtype_name))
        gemm_rate = gemms[dtype_name].flops / statistics.median(gemm[dtype_name])
        rows.append(
            {
                **row,
                "img_per_s": args.batch / statistics.median(t),
                "ratio": None if base is None else statistics.median(b / a for a, b in zip(t, base, strict=True)),
                "of_gemm": flops / statistics.median(t) / gemm_rate,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="names or patterns (default: one model per family)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time allmlp under torch.compile (freezing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    constructors = authors_constructors()
    names = expand_models(args.models) if args.models else default_models()
    info = machine()
    cpu = f"{info['cpu']} ({info['cpu_bf16_unit']})"
    print(f"{cpu}, {info['threads']} threads, torch {info['torch']}, batch {args.batch}")
    print("| model | dtype | implementation | img/s | / peer (same dtype) | of GEMM rate |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for row in bench_model(name, args, constructors):
            if "note" in row:
                print(f"| {row['model']} | {row['dtype']} | {row['impl']} | {row['note']} | | |")
                continue
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            print(
                f"| {row['model']} | {row['dtype']} | {row['impl']} | {row['img_per_s']:.1f} | {ratio} | "
                f"{row['of_gemm']:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
