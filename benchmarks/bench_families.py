"""Inference speed of every family against its authors' formulation, in one process, interleaved rounds.

The authors' formulations are the independent re-implementations the parity tests check allmlp against
(`tests/reference/<family>.py`: each written as the authors' code computes it, with their module names); for
gMLP and gMixer, which have no official code, the peer is timm's model. Both get the same weights, and their
logits must agree in float32 before anything is timed.

Each runs as built and, for a family with a deploy form (RepMLPNet), folded as well: allmlp's by
`allmlp.reparameterize`, the authors' as their `deploy=True` model holding the same folded weights. A family that
`allmlp.optimize_for_inference` takes (Wave-MLP here) is also timed as its inference module (rows "allmlp
optimized", compared with the peer as built). With --compile every implementation also runs under torch.compile
with inductor freezing, so that each allmlp row is compared with the peer in the same form, dtype and mode.

Per row it reports images/s (median over rounds), the ratio to the peer's same form, dtype and mode (median over
rounds of the per-round ratio), and the share of the machine's matrix-product rate the model reaches: its FLOPs
(matrix products and convolutions, counted by torch's FlopCounterMode, for the form it runs in) per second over
the rate of a 2048 x 2048 x 2048 product in the same dtype, timed in the same rounds. A formulation that has no
kernel in a dtype (torchvision's deform_conv2d in bfloat16) is reported as such.

    python benchmarks/bench_families.py --threads 2 --batch 16 --rounds 5            # one model per family
    python benchmarks/bench_families.py --models 'wavemlp_*' --dtypes bfloat16 --compile
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
import torch._inductor.config as inductor_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import allmlp
from allmlp.allocator import apply_environment
from allmlp.models.optimize import FAMILIES as OPTIMIZABLE
from allmlp.models.registry import REGISTRY
from allmlp.models.reparam import can_reparameterize
from allmlp.tools.bench import Gemm, expand_models, machine_line

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


def same_logits(name: str, form: str, model: nn.Module, peer: nn.Module, peer_kind: str, x: torch.Tensor) -> None:
    with torch.no_grad():
        diff = (model(x) - peer(x)).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(
            f"{name}{form}: allmlp and the {peer_kind} formulation disagree (max |logit difference| {diff:.2e})"
        )
    print(f"{name}{form}: logits agree with the {peer_kind} formulation to {diff:.1e}", file=sys.stderr)


def forms(model: nn.Module, peer: nn.Module, constructors: dict):
    """(form, allmlp model, peer model): the model as built, and for families with a deploy form (RepMLPNet) the
    deploy form of both, folded by `allmlp.reparameterize` and loaded into the authors' `deploy=True` model."""
    yield "", model, peer
    if any(can_reparameterize(module) for module in model.modules()):
        deployed = allmlp.reparameterize(model)
        peer_deployed = constructors[type(model).__name__](**deployed.config).eval()
        peer_deployed.load_state_dict(deployed.state_dict())
        yield " deployed", deployed, peer_deployed


def bench_model(name: str, args: argparse.Namespace, constructors: dict) -> list[dict]:
    """Rows for `name`: the peer and allmlp, per form (as built; deployed), dtype and mode (eager; compiled with
    inductor freezing, both of them, with --compile). Each allmlp row's ratio is to the peer's same form and mode."""
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

    runs, flops, peer_of = {}, {}, {}  # per (implementation, dtype)
    for form, net_allmlp, net_peer in forms(model, peer, constructors):
        same_logits(name, form, net_allmlp, net_peer, peer_kind, images[:2])
        impls = [(peer_kind, net_peer), ("allmlp", net_allmlp)]
        if type(net_allmlp) in OPTIMIZABLE:  # also as allmlp.optimize_for_inference's module
            fast = allmlp.optimize_for_inference(net_allmlp)
            same_logits(name, form + " optimized", fast, net_peer, peer_kind, images[:2])
            impls.append(("allmlp optimized", fast))
        form_flops = flops_per_image(net_allmlp, shape) * args.batch
        for dtype_name in args.dtypes:
            x = images.to(DTYPES[dtype_name])
            for impl, net in impls:
                net = copy.deepcopy(net).to(DTYPES[dtype_name])
                try:
                    with torch.no_grad():
                        net(x[:1])
                except (RuntimeError, NotImplementedError) as err:
                    runs[impl + form, dtype_name] = str(err).splitlines()[0][:60]
                    continue
                modes = [("", net)]
                if args.compile:
                    modes.append((" compiled", torch.compile(net)))
                for mode, run in modes:
                    key = impl + form + mode, dtype_name
                    flops[key], peer_of[key] = form_flops, (peer_kind + form + mode, dtype_name)
                    try:
                        with inductor_config.patch(freezing=True), torch.no_grad():
                            run(x)  # warm-up (compiling happens here)
                            run(x)
                    except Exception as err:  # noqa: BLE001 - a peer torch.compile cannot take is a row, not a crash
                        runs[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:40]}"
                        continue
                    runs[key] = run, x

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
        base = seconds.get(peer_of[impl, dtype_name])
        gemm_rate = gemms[dtype_name].flops / statistics.median(gemm[dtype_name])
        rows.append(
            {
                **row,
                "img_per_s": args.batch / statistics.median(t),
                "ratio": None if base is None else statistics.median(b / a for a, b in zip(t, base, strict=True)),
                "of_gemm": flops[impl, dtype_name] / statistics.median(t) / gemm_rate,
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
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile (inductor freezing)")
    args = parser.parse_args()
    apply_environment()  # the allmlp command's malloc setting, for both implementations alike
    torch.set_num_threads(args.threads)
    constructors = authors_constructors()
    names = expand_models(args.models) if args.models else default_models()
    print(machine_line(f"batch {args.batch}"))
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
