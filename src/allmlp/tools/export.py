"""`allmlp export`: a model as ONNX, TorchScript or a torch.export ExportedProgram, with a dynamic batch axis.

Every export is checked before it is kept: the written file is loaded back (onnxruntime for ONNX) and run on a
batch of another size than the one traced, and its outputs must match PyTorch's to 1e-4 (absolute and relative).
The file is written next to its destination and only renamed into place once the check passes.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..models.registry import create_model
from ..progress import Progress
from .inference import input_size, load_model

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}  # what each format is loaded by
TOLERANCE = 1e-4
TRACE_BATCH, CHECK_BATCH = 2, 3  # traced with one batch size, checked with another: the batch axis must be dynamic


@dataclass
class ExportCheck:
    path: Path
    format: str
    max_abs_diff: float
    check_batch: int
    constant_outputs: bool = False  # every output the same (a fresh Mixer's zero head): the check proved little


def export(model: nn.Module, out: str | os.PathLike, fmt: str, seed: int = 0) -> ExportCheck:
    """Export a float32, eval-mode copy of `model` to `out` in format `fmt`, check it, and return the check's result."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if out.suffix != SUFFIXES[fmt]:
        raise ValueError(
            f"{fmt} files end in {SUFFIXES[fmt]} (the loaders go by it), got {out.name}; "
            f"formats and suffixes: {', '.join(f'{f} {x}' for f, x in SUFFIXES.items())}"
        )
    if out.is_dir():
        raise ValueError(f"-o {out}: is a folder; give the file to write")
    model = copy.deepcopy(model).float().eval()  # the caller's model keeps its dtype and mode
    in_chans = model.config.get("in_chans", 3)
    generator = torch.Generator().manual_seed(seed)
    trace_input = torch.randn(TRACE_BATCH, in_chans, *input_size(model), generator=generator)
    check_input = torch.randn(CHECK_BATCH, in_chans, *input_size(model), generator=generator)
    with torch.no_grad():
        expected = model(check_input)

    with Progress(3, f"export {fmt}", unit="stages") as progress, atomic_path(out) as tmp:
        # the file appears only once it has reproduced PyTorch
        run = _WRITERS[fmt](model, trace_input, tmp)  # trace and write
        progress.update()
        got = run(check_input)  # load back and run
        progress.update()
        if got.shape != expected.shape:
            raise ValueError(
                f"{fmt} export gives outputs of shape {tuple(got.shape)} for a batch of {CHECK_BATCH}, "
                f"PyTorch {tuple(expected.shape)}: the batch axis is not dynamic"
            )
        diff = (got - expected).abs()
        if not bool((diff <= TOLERANCE + TOLERANCE * expected.abs()).all()):
            raise ValueError(
                f"{fmt} export does not reproduce PyTorch: max abs difference {diff.max().item():.3g} "
                f"(tolerance {TOLERANCE} absolute + {TOLERANCE} relative)"
            )
        progress.update()  # compared
    constant = bool((expected == expected.flatten()[0]).all())
    return ExportCheck(out, fmt, diff.max().item(), CHECK_BATCH, constant)


def export_weights(
    model_name: str | None, weights: str | os.PathLike | None, fmt: str, out: str | os.PathLike
) -> ExportCheck:
    """Export the model of `weights` (built by registry name, or from an allmlp file alone), or a freshly
    initialised `model_name` when no weights are given."""
    if weights is not None:
        model = load_model(weights, model_name)
    elif model_name is not None:
        model = create_model(model_name)
    else:
        raise ValueError("give --model NAME, --weights FILE, or both")
    return export(model, out, fmt)


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime
    except ImportError as err:
        raise ValueError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'allmlp[export]'") from err
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0])


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    # tracing records the ops of one forward; nothing in these models depends on the batch size, so the trace
    # runs any batch (the check below proves it on another batch size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # deprecated upstream; the README says so
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x).detach()


def _exported_program(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x).detach()


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}
