"""The `allmlp` command line: argument parsing only; each command calls into the library."""

from __future__ import annotations

import argparse
import sys


def _run_list(args: argparse.Namespace) -> None:
    from .models.registry import get_entry, list_models

    rows = [("name", "params (1000 classes)", "published weights")]
    for name in list_models(args.pattern):
        entry = get_entry(name)
        params = sum(p.numel() for p in _meta_model(name).parameters())
        rows.append((name, f"{params:,}", ", ".join(r.tag for r in entry.releases) or "none"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _meta_model(name: str):
    import torch

    from .models.registry import create_model

    with torch.device("meta"):
        return create_model(name)


def _run_info(args: argparse.Namespace) -> None:
    from .models.registry import get_entry

    entry = get_entry(args.model)
    params = sum(p.numel() for p in _meta_model(args.model).parameters())
    print(f"{entry.name}: {entry.architecture.__name__}, {params:,} parameters with a 1000-class head")
    print(f"  paper: {entry.paper}")
    print(f"  config: {dict(entry.config)}")
    p = entry.preprocessing
    print(f"  preprocessing: mean {p.mean}, std {p.std}, {p.interpolation}, crop_pct {p.crop_pct}. {p.note}")
    if not entry.releases:
        print("  published weights: none")
    for release in entry.releases:
        top1 = f", ImageNet top-1 {release.top1}" if release.top1 else ""
        print(f"  weights {release.tag}: {release.trained_on}, {release.num_classes} classes{top1}")
        print(f"      {release.source}")


def _run_convert(args: argparse.Namespace) -> None:
    from .tools.convert import convert

    model = convert(args.src, args.dst, args.model, args.gelu)
    print(f"wrote {args.dst}: {type(model).__name__} {model.config}")


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models with parameter counts and published weights")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mixer_*'")
    p.set_defaults(run=_run_list)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's config, preprocessing and the provenance of its weights")
    p.add_argument("model", help="registered model name (see `allmlp list`)")
    p.set_defaults(run=_run_info)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert weights of any supported format to allmlp safetensors",
        description="Convert official JAX .npz, timm .pth/.bin/.safetensors or authors' checkpoints to an allmlp "
        "safetensors file that `allmlp.create_model(path)` rebuilds on its own.",
    )
    p.add_argument("src", help="source weight file")
    p.add_argument("dst", help="destination .safetensors file (written atomically)")
    p.add_argument("--model", help="registered model name; default: inferred from the weights")
    p.add_argument(
        "--gelu",
        choices=["tanh", "erf"],
        help="GELU of the stored config; default: tanh for official .npz files, erf (timm's) otherwise",
    )
    p.set_defaults(run=_run_convert)


COMMANDS = [_add_list, _add_info, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allmlp",
        description="All-MLP vision models: MLP-Mixer, CycleMLP, Vision Permutator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"allmlp {args.command}: error: {err}", file=sys.stderr)
        return 2
