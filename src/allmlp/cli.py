"""The `allmlp` command line: argument parsing only; each command calls into the library."""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import textwrap

_MODEL_HELP = (
    "registered model name: its entry gives the preprocessing (needed unless --weights is an allmlp safetensors "
    "file, which carries its architecture)"
)


def _run_list(args: argparse.Namespace) -> int:
    from .models.registry import get_entry, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"allmlp list: no registered model matches {args.pattern!r} (`allmlp list` shows all)", file=sys.stderr)
        return 1
    rows = [("name", "params (1000 classes)", "published weights")]
    for name in names:
        entry = get_entry(name)
        params = sum(p.numel() for p in _meta_model(name).parameters())
        rows.append((name, f"{params:,}", ", ".join(r.tag for r in entry.releases) or "none"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


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

    model = convert(args.src, args.dst, args.model, args.gelu, deploy=args.deploy)
    print(f"wrote {args.dst}: {type(model).__name__} {model.config}")


def _run_download(args: argparse.Namespace) -> int:
    from .models.registry import REGISTRY, get_release
    from .weights.hub import DownloadError, fetch_release, sha256_of

    if args.all == bool(args.names):
        raise ValueError("give NAME[.TAG] arguments or --all, one of the two")
    if args.all:
        wanted = [(name, release) for name, entry in REGISTRY.items() for release in entry.releases]
    else:
        wanted = [(name, get_release(name, tag or None)) for name, _, tag in (n.partition(".") for n in args.names)]
    failures = 0
    for name, release in wanted:
        try:
            path = fetch_release(release, f"{name}.{release.tag}", mirror=args.mirror, timeout=args.timeout)
        except DownloadError as err:  # the others still come; the exit status tells
            print(f"allmlp download: {err}", file=sys.stderr)
            failures += 1
            continue
        print(f"{name}.{release.tag}: {path} ({path.stat().st_size:,} bytes, sha256 {sha256_of(path)})")
    return 1 if failures else 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models with parameter counts and published weights")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mixer_*'")
    p.set_defaults(run=_run_list)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's config, preprocessing and the provenance of its weights")
    p.add_argument("model", help="registered model name (see `allmlp list`)")
    p.set_defaults(run=_run_info)


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch published weights into the cache (what create_model(name, pretrained=...) loads)",
        description="Cache: $ALLMLP_HOME, else $XDG_CACHE_HOME/allmlp, else ~/.cache/allmlp. Files are verified "
        "(size and SHA-256 where known, the format always) before they are moved in. Hosts that need a browser "
        "(Google Drive) get the page and the path to save the file as. ALLMLP_OFFLINE=1: the cache only.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME[.TAG]", help="model, optionally with a release tag (default: the first)"
    )
    p.add_argument("--all", action="store_true", help="every release of every model")
    p.add_argument("--mirror", help="base URL that serves the cache layout (default $ALLMLP_WEIGHTS_URL)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a request fails")
    p.set_defaults(run=_run_download)


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
    p.add_argument(
        "--deploy",
        action="store_true",
        help="write the deploy form (allmlp.reparameterize: training-time branches folded, e.g. RepMLPNet's local "
        "convs and BatchNorms into fc3)",
    )
    p.set_defaults(run=_run_convert)


def _run_fewshot(args: argparse.Namespace) -> None:
    from .evaluate.fewshot import default_cache_dir, fewshot, format_results, save_report

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    report = fewshot(
        args.model,
        args.weights,
        args.data,
        args.shots,
        args.seeds,
        args.l2,
        cache_dir,
        args.batch_size,
        args.device,
        args.workers,
        args.preset,
    )
    print(format_results(report))
    if args.out:
        save_report(report, args.out)


def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fewshot",
        help="linear few-shot top-1 of frozen pre-logits (the MLP-Mixer paper's k-shot metric)",
        description="Closed-form l2-regularised least squares to {-1, 1} targets on k images per class, mean +- std "
        "top-1 over seeds. DATA is an ImageFolder tree: shots from train/, scored on val/ (or test/); a tree of "
        "class folders alone is split, every fifth image of each class (sorted) being a test image. Features are "
        "cached, so a rerun computes only new images.",
    )
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--weights", required=True, help="weight file of any supported format")
    p.add_argument("--data", required=True, help="ImageFolder directory")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25], help="images per class (default 1 5 10 25)")
    p.add_argument("--seeds", type=int, default=5, help="draws of the shots, seeds 0..N-1 (default 5)")
    p.add_argument("--l2", type=float, help="regulariser; default: chosen by leave-one-out on the shots")
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/allmlp/fewshot)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--out", help="also write the results as JSON to this file")
    _add_inference_options(p)
    p.set_defaults(run=_run_fewshot)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, help="image-decoding processes (default: min(4, CPUs); 0: in-process)")
    p.add_argument(
        "--preset",
        choices=["resize", "resize_crop", "resmall_crop"],
        help="eval resizing; default: the model entry's (plain resize for the official Mixer weights)",
    )


def _run_visualize(args: argparse.Namespace) -> None:
    from .tools.inference import load_model
    from .tools.visualize import visualize

    for path in visualize(load_model(args.weights, args.model), args.out, args.blocks, args.run_dir):
        print(f"wrote {path}")


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="PNGs of token-mixing units, stem filters and training curves",
        description="Token-mixing units (rows of W1 on the patch grid, as in the paper's Figure 5) of the chosen "
        "blocks, the stem's patch filters as RGB tiles, and with --run the training curves of a run directory.",
    )
    p.add_argument("--weights", required=True, help="weight file of any supported format")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--model", help="registered model name, for weight files that do not carry their config")
    p.add_argument("--blocks", type=int, nargs="+", help="Mixer blocks whose token-mixing units to draw (default 0)")
    p.add_argument("--run", dest="run_dir", help="run directory with metrics.jsonl (written by `allmlp train`)")
    p.set_defaults(run=_run_visualize)


# ---------------------------------------------------------------- studying what models learn (issue 17)


def _run_invariance(args: argparse.Namespace) -> None:
    from .evaluate.invariance import InvarianceSettings, markdown_table, run_invariance

    settings = InvarianceSettings(
        mixer_epochs=args.mixer_epochs,
        resnet_epochs=args.resnet_epochs,
        mixer_lr=args.mixer_lr,
        resnet_lr=args.resnet_lr,
        seed=args.seed,
        permute_seed=args.permute_seed,
        threads=args.threads,
        steps=args.steps,
    )
    rows = run_invariance(args.out, settings, save_models=args.save_models)
    print(markdown_table(rows))
    print(f"wrote {args.out}/results.json, results.csv, results.md, invariance.png")


def _add_invariance(sub: argparse._SubParsersAction) -> None:
    from .evaluate.invariance import InvarianceSettings

    defaults = InvarianceSettings()
    p = sub.add_parser(
        "invariance",
        help="the MLP-Mixer paper's invariance experiment: Mixer and ResNet-18 on permuted MNIST digits",
        description="Trains the demo Mixer and a small-image torchvision ResNet-18 on the bundled MNIST digits, "
        "original, with patches (and the pixels inside them) shuffled by one fixed permutation, and with all "
        "pixels shuffled by one fixed permutation (data.permute); writes the held-out top-1 of the six runs as "
        "results.json/.csv/.md and a bar chart invariance.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--mixer-epochs", type=float, default=defaults.mixer_epochs, help="epochs per Mixer run")
    p.add_argument("--resnet-epochs", type=float, default=defaults.resnet_epochs, help="epochs per ResNet run")
    p.add_argument("--mixer-lr", type=float, default=defaults.mixer_lr, help="peak AdamW learning rate of the Mixer")
    p.add_argument("--resnet-lr", type=float, default=defaults.resnet_lr, help="peak AdamW learning rate of the ResNet")
    p.add_argument("--steps", type=int, help="optimizer steps per run instead of epochs; for a quick check")
    p.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and data order")
    p.add_argument("--permute-seed", type=int, default=defaults.permute_seed, help="seed of the fixed permutations")
    p.add_argument("--threads", type=int, help="torch threads (None: torch's choice)")
    p.add_argument("--save-models", action="store_true", help="also write each trained model as a .safetensors file")
    p.set_defaults(run=_run_invariance)


def _run_compare(args: argparse.Namespace) -> None:
    from .evaluate.compare import compare, default_cache_dir, image_set, load_layered, save_comparison
    from .tools.inference import resolve_device

    device = resolve_device(args.device)
    model_a = load_layered(args.a, args.weights_a, args.layers_a, args.img_size_a, device)
    model_b = load_layered(args.b, args.weights_b, args.layers_b, args.img_size_b, device)
    images = image_set(args.data, args.max_images, args.seed)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    cka_batch = args.cka_batch or None
    report = compare(model_a, model_b, images, cka_batch, not args.biased, args.batch_size, device, cache_dir)
    for path in save_comparison(report, args.out):
        print(f"wrote {path}")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="layer-by-layer linear CKA between two models (allmlp, timm:NAME, torchvision:NAME) on a set of images",
        description="Linear CKA between every chosen layer of model A and of model B on the same images: "
        "Nguyen et al.'s minibatch estimator with unbiased HSIC (default, bounded memory), or the full estimate "
        "(--cka-batch 0). Writes cka.json, cka.csv and the heatmap cka.png to --out; Gram matrices are cached.",
    )
    for side in ("a", "b"):
        p.add_argument(
            f"--{side}", required=True, help=f"model {side.upper()}: allmlp name, timm:NAME, torchvision:NAME"
        )
        p.add_argument(f"--weights-{side}", help="weight file (allmlp: any supported format; others: a state dict)")
        p.add_argument(
            f"--layers-{side}",
            nargs="+",
            help="forward_intermediates indices (allmlp, timm) or graph node names (torchvision); default: all blocks",
        )
        p.add_argument(f"--img-size-{side}", type=int, help="input size (default: the model's; torchvision 224)")
    p.add_argument("--data", required=True, help="image folder (searched recursively) or 'demo' (bundled digits)")
    p.add_argument("--out", required=True, help="folder for cka.json, cka.csv, cka.png")
    p.add_argument("--max-images", type=int, help="use this many images of the shuffled set (default: all)")
    p.add_argument("--cka-batch", type=int, default=256, help="images per CKA minibatch; 0: all at once (full CKA)")
    p.add_argument("--biased", action="store_true", help="plain HSIC (Kornblith et al. 2019) instead of unbiased")
    p.add_argument("--seed", type=int, default=0, help="order of the images, hence the minibatches (default 0)")
    p.add_argument("--cache-dir", help="Gram matrix cache (default ~/.cache/allmlp/compare)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached Gram matrices")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.set_defaults(run=_run_compare)


def _run_spectrum(args: argparse.Namespace) -> None:
    from .tools.spectrum import spectrum_command

    for path in spectrum_command(args.weights, args.out, args.model, args.cutoff):
        print(f"wrote {path}")


def _add_spectrum(sub: argparse._SubParsersAction) -> None:
    from .tools.spectrum import DEFAULT_CUTOFF

    p = sub.add_parser(
        "spectrum",
        help="spatial-frequency spectrum and extent of each Mixer block's token-mixing units, per checkpoint",
        description="For each weight file: the mean radial power spectrum of every block's token-mixing units (rows "
        "of W1 on the patch grid), and per block the share of each unit's energy at low spatial frequencies and "
        "its spatial extent. Writes LABEL_spectrum.png and LABEL_spectrum.json to --out.",
    )
    p.add_argument("weights", nargs="+", help="Mixer weight files (checkpoints) of any supported format")
    p.add_argument("--out", required=True, help="folder for the plots and numbers")
    p.add_argument("--model", help="registered model name, for weight files that do not carry their config")
    p.add_argument(
        "--cutoff",
        type=float,
        default=DEFAULT_CUTOFF,
        help=f"low-frequency limit in cycles per patch (default {DEFAULT_CUTOFF}: periods of 4 patches or more)",
    )
    p.set_defaults(run=_run_spectrum)


def _run_predict(args: argparse.Namespace) -> int:
    from .tools.predict import predict, print_predictions

    records = predict(
        args.inputs,
        args.weights,
        args.model,
        args.topk,
        args.labels,
        args.batch_size,
        args.device,
        args.workers,
        args.preset,
    )
    return print_predictions(records, args.json)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k classes of image files",
        description="Top-k classes with names (--labels, else the names stored in an allmlp file by `allmlp train` "
        "or `allmlp finetune`, ImageNet-1k names for 1000-class heads, numeric ids otherwise) and softmax "
        "probabilities. An unreadable file is reported on stderr and the others go on; "
        "the exit status is then 1.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or folders (recursive)")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--weights", required=True, help="weight file of any supported format")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--labels", help="class names, one per line (or a .json list), for heads other than ImageNet-1k")
    _add_inference_options(p)
    p.set_defaults(run=_run_predict, batch_size=32)


def _run_embed(args: argparse.Namespace) -> int:
    from .tools.predict import embed

    written, failures = embed(
        args.inputs, args.weights, args.model, args.output, args.batch_size, args.device, args.workers, args.preset
    )
    for path, reason in failures.items():
        print(f"allmlp embed: cannot read {path}: {reason}", file=sys.stderr)
    print(f"wrote {args.output}: pre-logits of {written} images")
    return 1 if failures else 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="pre-logits of a set of images to .safetensors or .npy, with the image paths",
        description="Writes the (N, D) pre-logits; .safetensors keeps the paths in its metadata ('paths', a JSON "
        "list), .npy gets a sidecar .json with them. Unreadable files are reported and left out (exit status 1).",
    )
    p.add_argument("inputs", nargs="+", metavar="DATA", help="image files and/or folders (recursive)")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--weights", required=True, help="weight file of any supported format")
    p.add_argument("-o", "--output", required=True, help="OUT.safetensors or OUT.npy")
    _add_inference_options(p)
    p.set_defaults(run=_run_embed)


def _run_export(args: argparse.Namespace) -> None:
    from .tools.export import export_weights

    check = export_weights(args.model, args.weights, args.format, args.output)
    print(
        f"wrote {check.path} ({check.format}, dynamic batch): a batch of {check.check_batch} reproduces PyTorch, "
        f"max abs difference {check.max_abs_diff:.2e}"
    )
    if check.constant_outputs:
        print(
            "allmlp export: warning: every output of the model is the same value (a fresh Mixer's head is zero), so "
            "the check compared constants; export trained weights (--weights FILE) for a check that means something",
            file=sys.stderr,
        )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX, TorchScript or a torch.export program, with a dynamic batch axis",
        description="The written file is loaded back (onnxruntime for ONNX), run on another batch size than the "
        "traced one, and must reproduce PyTorch to 1e-4; only then is it moved to OUT.",
    )
    p.add_argument("--model", help="registered model name (needed unless --weights is an allmlp safetensors file)")
    p.add_argument("--weights", help="weight file of any supported format (default: the fresh initialisation)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    p.add_argument("-o", "--output", required=True, help="destination file (.onnx, .pt, .pt2)")
    p.set_defaults(run=_run_export)


def _run_train(args: argparse.Namespace) -> None:
    from .train.commands import train_command

    overrides = args.overrides
    if getattr(args, "img_size", None) is not None:
        overrides = [*overrides, f"model.img_size={args.img_size}"]
    train_command(args.command, args.config, overrides, args.output, args.resume, args.weights)


def _run_eval(args: argparse.Namespace) -> None:
    from .train.commands import eval_command

    eval_command(args.config, args.overrides, args.weights, args.output, args.real_json, args.split)


def _wrapped(text: str, indent: str = "", hanging: str = "      ") -> str:
    """`text` wrapped to the terminal's width (argparse wraps only the help of options, not a raw epilog)."""
    width = max(shutil.get_terminal_size().columns - 2, 40)
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + hanging)


def _fields_epilog(command: str) -> str:
    from .train.commands import DEFAULT_RECIPES
    from .train.config import describe_fields, list_recipes, load_config

    recipe = DEFAULT_RECIPES[command]
    defaults = load_config(recipe) if recipe else None
    source = f"the {recipe} recipe's values" if recipe else "the defaults"
    lines = [
        _wrapped(f"shipped recipes: {', '.join(list_recipes())}"),
        "",
        _wrapped(f"config fields, with {source} (set any as FIELD=VALUE; YAML values: 0.001, [0.9, 0.95], null):"),
    ]
    lines += [_wrapped(line.strip(), indent="  ") for line in describe_fields(values=defaults)]
    return "\n".join(lines)


def _recipe_parser(sub: argparse._SubParsersAction, command: str, help: str, description: str):
    from .train.commands import DEFAULT_RECIPES

    p = sub.add_parser(
        command,
        help=help,
        description=_wrapped(description, hanging=""),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the field list's layout, wrapped here
        epilog=_fields_epilog(command),
    )
    p.set_defaults(parser=p)
    default = DEFAULT_RECIPES[command]
    p.add_argument(
        "--config",
        help=f"recipe: a YAML file or a shipped recipe name (default: {default or 'none, defaults + overrides'})",
    )
    p.add_argument("--output", help="run directory (default: runs/RECIPE-DATE-TIME)")
    p.add_argument("--weights", help="weight file of any format allmlp.load_weights reads (= model.weights=FILE)")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="override a config field by its dotted path")
    return p


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _recipe_parser(
        sub,
        "train",
        "train a model from a recipe (no arguments: the demo, a small Mixer on bundled MNIST)",
        "Train from a YAML recipe with dotted-path overrides. The run directory gets config.yaml, metrics.jsonl, "
        "TensorBoard events, loss/lr/accuracy PNGs, checkpoints/ and summary.json. Several processes: "
        "`torchrun --nproc_per_node N -m allmlp train ...` (DDP; NCCL on GPUs, gloo on CPUs).",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint")
    p.set_defaults(run=_run_train)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = _recipe_parser(
        sub,
        "finetune",
        "fine-tune any weights on new classes (zero-initialised new head)",
        "Load --weights (any supported format), replace the classifier by a zero-initialised one for the data's "
        "classes and train with the fine-tuning recipe (default: the authors' Mixer recipe on an ImageFolder "
        "tree; set data.root=DIR).",
    )
    p.add_argument(
        "--img-size",
        type=int,
        help="fine-tune at this input size (= model.img_size=N); Mixer weights of another size are adapted with "
        "allmlp.adapt_resolution (block-diagonal token mixing for integer factors, paper App. C)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint")
    p.set_defaults(run=_run_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _recipe_parser(
        sub,
        "eval",
        "top-1 / top-5 / per-class accuracy (and ImageNet ReaL) of weights on a dataset",
        "Evaluate model.name with --weights on the data section's dataset, preprocessed by data.eval_preset. "
        "--output DIR writes eval.json.",
    )
    p.add_argument("--real-json", help="ReaL labels (real.json) for ImageNet validation files: adds ReaL top-1")
    p.add_argument("--split", choices=["val", "train"], default="val", help="which split to evaluate (default val)")
    p.set_defaults(run=_run_eval)


def _run_bench(args: argparse.Namespace) -> None:
    from .tools.bench import Settings, expand_cases, run_command

    compile_modes = [choice == "on" for choice in args.compile]
    optimize_modes = [choice == "on" for choice in args.optimize]
    cases = expand_cases(
        args.models, args.batch_sizes, args.dtypes, args.modes, compile_modes, args.grad_checkpointing, optimize_modes
    )
    settings = Settings(
        compare=args.compare,
        rounds=args.rounds,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        gemm_size=args.gemm_size,
        freezing=args.freezing,
        gelu=args.gelu,
        clock=args.clock,
    )
    run_command(cases, settings, args.out, args.markdown)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .tools.bench import DTYPES, MODES, PEERS

    p = sub.add_parser(
        "bench",
        help="images/s of allmlp models (inference, training), optionally against timm in the same process",
        description="Times every combination of models, batch sizes, dtypes, modes and compile on/off. With "
        "--compare timm, timm's same architecture gets the same weights and inputs, and rounds interleave so that "
        "noise hits both alike. Prints a table and writes results.csv and results.json to --out.",
    )
    p.add_argument(
        "--models", nargs="+", default=["mixer_b16_224"], help="registered model names or patterns ('cyclemlp_*', '*')"
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        default=["fp32", "bf16"],
        help="bf16: bf16 weights for inference, autocast for training; bf16-autocast: autocast inference",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=["inference"], help="train: forward, backward, AdamW")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"], help="torch.compile off and/or on")
    p.add_argument(
        "--optimize",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="allmlp plain and/or as allmlp.optimize_for_inference(model) (inference, eager and/or compiled as "
        "--compile says; the families it takes: Mixer, CycleMLP, ViP, Wave-MLP; row 'allmlp optimized')",
    )
    p.add_argument("--compare", choices=PEERS, help="time this peer's same architecture in the same rounds")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="also run training with grad checkpointing and report the activation memory it saves",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiling happens here)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--gemm-size", type=int, help="side of the reference square GEMM (default 2048 CPU, 8192 CUDA)")
    p.add_argument(
        "--no-freezing", dest="freezing", action="store_false", help="compile inference without inductor freezing"
    )
    p.add_argument("--gelu", choices=["tanh", "erf"], help="allmlp's GELU (default: erf with --compare timm)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time; with --threads 1 it ignores other load on a shared machine",
    )
    p.add_argument("--out", default="bench-results", help="folder for results.csv and results.json")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(run=_run_bench)


COMMANDS = [
    _add_list,
    _add_info,
    _add_download,
    _add_convert,
    _add_fewshot,
    _add_visualize,
    _add_invariance,
    _add_compare,
    _add_spectrum,
    _add_predict,
    _add_embed,
    _add_export,
    _add_train,
    _add_finetune,
    _add_eval,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="allmlp",
        description="All-MLP vision models: MLP-Mixer, CycleMLP, Vision Permutator and twelve more families.",
        epilog="On Linux the command keeps the memory it frees for reuse (glibc's malloc; allmlp.allocator); "
        "ALLMLP_MALLOC=system keeps glibc's defaults.",
    )
    parser.add_argument("--version", action="version", version=f"allmlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class _Stderr(logging.Handler):
    """The library's INFO messages (a weight file adapted on loading, ...) as `allmlp: ...` lines on stderr, looked
    up at each message so that a replaced sys.stderr (tests, notebooks) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"allmlp: {record.getMessage()}", file=sys.stderr)


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; FIELD=VALUE overrides may stand anywhere among a recipe command's options
    (argparse alone takes positionals only in one run, so later ones come back as extras)."""
    args, extras = build_parser().parse_known_args(argv)
    recipe_parser = getattr(args, "parser", None)
    if extras:
        if recipe_parser is None or not all(_OVERRIDE.match(extra) for extra in extras):
            (recipe_parser or build_parser()).error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def _os_error(err: OSError) -> str:
    """One line for a file-system error: what, where, why (no traceback)."""
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    reason = err.strerror or str(err)
    return f"cannot write or read {where}: {reason}" if where else reason


def main(argv: list[str] | None = None) -> int:
    from .allocator import apply_environment
    from .train.engine import TrainingInterrupted

    args = parse_args(argv)
    library_log = logging.getLogger("allmlp")
    if not any(isinstance(handler, _Stderr) for handler in library_log.handlers):
        library_log.addHandler(_Stderr())
        library_log.setLevel(logging.INFO)
    try:
        apply_environment()
        return args.run(args) or 0
    except TrainingInterrupted as err:
        print(f"allmlp {args.command}: {err}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"allmlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output path that is a file, a read-only folder, a full disk, ...
        print(f"allmlp {args.command}: error: {_os_error(err)}", file=sys.stderr)
        return 2
