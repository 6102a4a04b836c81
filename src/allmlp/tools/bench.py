"""`allmlp bench`: images per second of allmlp models, against timm's same architecture in the same process.

How it measures, and why:
- A shared machine is noisy, so every round times allmlp, the peer and a square matrix product back to back, in
  alternating order; a ratio is taken inside each round and the median over rounds is reported. Speeds are the
  median step time of the rounds.
- Both implementations get the same weights (the peer loads allmlp's state dict) and must give the same
  features in float32 before anything is timed: the comparison is between two ways of computing one function.
- "of GEMM" divides the model's FLOP rate by the rate of a square matrix product in the same dtype, timed in the
  same rounds: how close the model runs to what the hardware reaches on its best operation.
- `clock="cpu"` times with the process's CPU time instead of the wall clock. With one thread that is the work
  itself, untouched by other processes on a shared machine (with more threads it also counts spin-waiting).
- Memory comes from one extra, untimed step: the peak of the bytes PyTorch allocates during the step, and in
  training the activation memory, the bytes still held when the forward pass ends (what backward needs).
  CUDA reads the allocator's statistics; the CPU replays the profiler's allocation events.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import allocator
from ..atomic import write_bytes_atomic
from ..models.mixer import MlpMixer
from ..models.optimize import FAMILIES as OPTIMIZABLE
from ..models.optimize import optimize_for_inference
from ..models.registry import create_model, get_entry, list_models
from ..weights import load_weights

DTYPES = ("fp32", "bf16", "bf16-autocast")
MODES = ("inference", "train")
PEERS = ("timm",)
IMPL = "allmlp"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Case:
    """One configuration to time. In training, bf16 always means autocast with float32 master weights.
    `optimize`: allmlp runs as `optimize_for_inference(model)` (inference only, eager or compiled; the peer runs
    its plain model in the same mode)."""

    model: str
    batch_size: int
    dtype: str
    mode: str
    compile: bool
    grad_checkpointing: bool = False
    optimize: bool = False

    @property
    def compute_dtype(self) -> str:
        """The dtype the matrix products run in (what the reference GEMM is timed in)."""
        return "fp32" if self.dtype == "fp32" else "bf16"

    def __str__(self) -> str:
        ckpt = " grad-ckpt" if self.grad_checkpointing else ""
        compiled = " compiled" if self.compile else ""
        optimized = " optimized" if self.optimize else ""
        return f"{self.model} batch {self.batch_size} {self.dtype} {self.mode}{compiled}{optimized}{ckpt}"


@dataclass
class Row:
    """One implementation's measurement of one case (a line of the table, the CSV and the JSON)."""

    impl: str
    model: str
    batch_size: int
    dtype: str
    mode: str
    compile: bool
    grad_checkpointing: bool
    img_per_s: float
    ms_per_batch: float
    best_ms: float
    ratio_to_peer: float | None  # peer time / allmlp time, median over rounds; > 1: allmlp is faster
    model_gflop_per_s: float
    gemm_gflop_per_s: float
    gemm_fraction: float
    peak_memory_mb: float
    activation_memory_mb: float | None
    rounds_ms: list[float]


def expand_models(patterns: Iterable[str]) -> list[str]:
    """Registered names from names or shell-style patterns ('cyclemlp_*', '*'), in the order given."""
    names: list[str] = []
    for pattern in patterns:
        matched = list_models(pattern)
        if not matched:
            get_entry(pattern)  # raises: an unknown model, with the closest registered names
        names += [name for name in matched if name not in names]
    return names


def expand_cases(
    models: Iterable[str],
    batch_sizes: Iterable[int],
    dtypes: Iterable[str],
    modes: Iterable[str],
    compile_modes: Iterable[bool],
    grad_checkpointing: bool = False,
    optimize_modes: Iterable[bool] = (False,),
) -> list[Case]:
    """Every combination, validated; training runs with and without grad checkpointing when asked to compare;
    `optimize_for_inference` only where it applies (the families it takes, inference in the model's dtype: it
    ignores autocast), eager and compiled as `compile_modes` say."""
    models, dtypes, modes = expand_models(models), list(dtypes), list(modes)
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive ints, got {batch_sizes}")
    cases: list[Case] = []
    for name in models:
        for batch in batch_sizes:
            for mode in modes:
                for dtype in dtypes:
                    dtype = "bf16" if mode == "train" and dtype == "bf16-autocast" else dtype
                    for compiled in compile_modes:
                        for ckpt in (False, True) if grad_checkpointing and mode == "train" else (False,):
                            for optimized in optimize_modes:
                                if optimized and (
                                    mode == "train"
                                    or dtype == "bf16-autocast"
                                    or get_entry(name).architecture not in OPTIMIZABLE
                                ):
                                    continue
                                case = Case(name, batch, dtype, mode, compiled, ckpt, optimized)
                                if case not in cases:
                                    cases.append(case)
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timm():
    """timm is optional (a test dependency): imported only when asked to compare with it."""
    try:
        import timm
    except ImportError as err:
        raise ValueError("--compare timm needs timm: pip install timm") from err
    return timm


def peer_has(models: Iterable[str]) -> set[str]:
    """The models the peer (timm) has under the same name; the others run without a peer."""
    available = set(_timm().list_models())
    return {name for name in models if name in available}


def _build(name: str, gelu: str | None, peer: str | None) -> tuple[nn.Module, nn.Module | None]:
    """allmlp's model and the peer's with the same weights: the peer's random ones, loaded into allmlp's model
    through `load_weights` (which reads the peer's names). GELU is a choice for MLP-Mixer only."""
    overrides = {"gelu": gelu} if gelu is not None and get_entry(name).architecture is MlpMixer else {}
    ours = create_model(name, **overrides)
    if peer is None:
        return ours, None
    theirs = _timm().create_model(name, pretrained=False)
    load_weights(ours, theirs.state_dict())
    return ours, theirs


class Step:
    """One inference batch or one training step (forward, backward, AdamW) of a model on fixed inputs."""

    def __init__(
        self, model: nn.Module, case: Case, device: torch.device, freezing: bool, reference: nn.Module, clock: str
    ):
        self.case, self.device, self.freezing, self.clock = case, device, freezing, CLOCKS[clock]
        if case.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model = model.to(device)
        generator = torch.Generator().manual_seed(0)  # the same inputs for allmlp and the peer
        self.images = torch.randn(case.batch_size, *input_size(reference), generator=generator).to(device)
        if case.mode == "inference":
            model.eval()
            if case.dtype == "bf16":
                model, self.images = model.to(torch.bfloat16), self.images.to(torch.bfloat16)
            if case.optimize:
                model = optimize_for_inference(model)
            self.optimizer = None
        else:
            model.train()
            classes = max(reference.num_classes, 1)
            self.labels = torch.randint(0, classes, (case.batch_size,), generator=generator).to(device)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # the training engine's optimizer
        self.model = model
        self.forward = torch.compile(model) if case.compile else model
        self.compiled_once = False

    def _autocast(self):
        autocast = self.case.dtype == "bf16-autocast" or (self.case.mode == "train" and self.case.dtype == "bf16")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def _compile_context(self):
        """Inductor's freezing (weights folded in as constants) is what makes compiled CPU inference fast."""
        if self.case.compile and self.case.mode == "inference" and not self.compiled_once:
            self.compiled_once = True
            import torch._inductor.config as inductor_config

            return inductor_config.patch(freezing=self.freezing)
        return contextlib.nullcontext()

    def run_forward(self) -> torch.Tensor:
        with self._compile_context(), self._autocast():
            if self.optimizer is None:
                with torch.no_grad():
                    return self.forward(self.images)
            return F.cross_entropy(self.forward(self.images), self.labels)

    def finish(self, loss: torch.Tensor) -> None:
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        """Seconds for one step, measured to completion on the device."""
        _sync(self.device)
        start = self.clock()
        self.finish(self.run_forward())
        _sync(self.device)
        return self.clock() - start


class Gemm:
    """A square matrix product in the case's compute dtype: the rate the hardware reaches on its best op."""

    def __init__(self, size: int, dtype: str, device: torch.device, clock: str):
        compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(size, size, generator=generator).to(device, compute)
        self.b = torch.randn(size, size, generator=generator).to(device, compute)
        self.flops = 2 * size**3
        self.device, self.clock = device, CLOCKS[clock]

    def __call__(self) -> float:
        _sync(self.device)
        start = self.clock()
        torch.mm(self.a, self.b)
        _sync(self.device)
        return self.clock() - start


def model_flops(name: str, batch_size: int, mode: str) -> int:
    """FLOPs of one batch (forward; forward + backward in training), counted on the meta device.

    Counted on allmlp's plain model; the peer and allmlp's optimized module compute the same products.
    """
    with torch.device("meta"):
        model = create_model(name)
        images = torch.empty(batch_size, *input_size(model))
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        if mode == "train":
            out.float().sum().backward()
    return counter.get_total_flops()


def measure_memory(step: Step) -> tuple[float, float | None]:
    """(peak bytes allocated during one step, bytes still held after its forward pass) above the level before it."""
    device = step.device
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = step.run_forward()
        _sync(device)
        activations = torch.cuda.memory_allocated(device) - base
        step.finish(loss)
        del loss
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return float(peak), float(activations) if step.optimizer is not None else None
    return _cpu_memory(step)


# the profiler's native library logs on file descriptor 2 as "LEVEL:YYYY-MM-DD hh:mm:ss pid:tid file:line] text";
# on a CPU machine that is start/stop notes and a failed GPU probe ("gpuGetDeviceCount failed"): noise here
_PROFILER_LOG = re.compile(r"^(USDT|INFO|WARNING|ERROR|STAGE):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \S+:\d+\] ")


@contextlib.contextmanager
def _without_profiler_log() -> Iterator[None]:
    """Hold back what native code writes to stderr meanwhile, then pass on every line except the profiler's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines() if not _PROFILER_LOG.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _cpu_memory(step: Step) -> tuple[float, float | None]:
    """The CPU allocator keeps no statistics; the profiler records every allocation and free with a timestamp."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench_forward"):
            loss = step.run_forward()
        step.finish(loss)
        del loss
    events = list(prof.profiler.kineto_results.events())
    forward_end = max(e.end_ns() for e in events if e.name() == "bench_forward")
    live, peak, after_forward = 0, 0, None
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if after_forward is None and event.start_ns() > forward_end:
            after_forward = live
        live += event.nbytes()
        peak = max(peak, live)
    if after_forward is None:
        after_forward = live
    return float(peak), float(after_forward) if step.optimizer is not None else None


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model is built for."""
    return tuple(model.pretrained_cfg["input_size"])


def _check_same_function(ours: nn.Module, peer: nn.Module, name: str) -> float:
    """Max |difference| of the float32 pooled features on two random images; a peer that computes something else
    is an error. Features, not logits: a new Mixer's head is zero, so its logits are."""
    images = torch.randn(2, *input_size(ours), generator=torch.Generator().manual_seed(1))

    def features(model: nn.Module) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)

    with torch.no_grad():
        a, b = features(ours.eval()), features(peer.eval())
    diff = (a - b).abs().max().item()
    if not diff <= 1e-4 * max(1.0, b.abs().max().item()):
        raise ValueError(f"allmlp and the peer disagree on {name}: max |feature difference| {diff:.3g}")
    return diff


@dataclass(frozen=True)
class Settings:
    """How to measure: the peer, rounds, device, clock, and what compiled inference uses."""

    compare: str | None = None
    rounds: int = 5
    warmup: int = 2
    threads: int | None = None
    device: str = "cpu"
    gemm_size: int | None = None  # side of the reference GEMM; default 2048 on CPU, 8192 on CUDA
    freezing: bool = True
    gelu: str | None = None  # allmlp's GELU; default: timm's exact GELU when comparing with timm
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.compare is not None and self.compare not in PEERS:
            raise ValueError(f"compare must be one of {PEERS}, got {self.compare!r}")
        if self.rounds < 1 or self.warmup < 1:
            raise ValueError(f"rounds and warmup must be >= 1, got rounds={self.rounds}, warmup={self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for, but CUDA is not available")
        if device.type != "cpu" and self.clock == "cpu":
            raise ValueError(f"clock 'cpu' measures CPU work only; time {self.device} with the wall clock")

    @property
    def allmlp_gelu(self) -> str | None:
        return self.gelu or ("erf" if self.compare == "timm" else None)

    @property
    def gemm_side(self) -> int:
        return self.gemm_size or (8192 if torch.device(self.device).type == "cuda" else 2048)


def run_case(case: Case, settings: Settings, log: Callable[[str], None], peer_case: Case | None = None) -> list[Row]:
    """Time one case for allmlp and the peer with interleaved rounds; one row per implementation.

    `peer_case` runs the peer in another configuration (same model and batch size) in the same rounds, which is
    how allmlp's best path is compared with the peer's best path; by default the peer runs `case` unoptimized.
    """
    peer_case = peer_case or replace(case, optimize=False)
    if (peer_case.model, peer_case.batch_size, peer_case.mode) != (case.model, case.batch_size, case.mode):
        raise ValueError(f"the peer must run the same model, batch size and mode: {case} vs {peer_case}")
    device = torch.device(settings.device)
    torch.manual_seed(0)
    peer = settings.compare
    ours, peer_model = _build(case.model, settings.allmlp_gelu, peer)
    if peer is not None:
        diff = _check_same_function(ours, peer_model, case.model)
        log(f"  same weights, float32 features agree with {peer}: max |difference| {diff:.1e}")
    steps = {IMPL: Step(ours, case, device, settings.freezing, ours, settings.clock)}
    if peer is not None:
        steps[peer] = Step(peer_model, peer_case, device, settings.freezing, ours, settings.clock)
    gemms = {
        step.case.compute_dtype: Gemm(settings.gemm_side, step.case.compute_dtype, device, settings.clock)
        for step in steps.values()
    }

    for impl, step in steps.items():
        start = time.perf_counter()
        for _ in range(settings.warmup):
            step()
        compiling = " (includes compiling)" if step.case.compile else ""
        log(f"  warm-up {impl}: {time.perf_counter() - start:.1f} s{compiling}")

    times: dict[str, list[float]] = {impl: [] for impl in steps}
    gemm_times: dict[str, list[float]] = {dtype: [] for dtype in gemms}
    order = list(steps)
    for r in range(settings.rounds):
        for impl in order if r % 2 == 0 else order[::-1]:
            times[impl].append(steps[impl]())
        for dtype, gemm in gemms.items():
            gemm_times[dtype].append(gemm())
        summary = ", ".join(f"{impl} {t[-1] * 1e3:.0f} ms" for impl, t in times.items())
        log(f"  round {r + 1}/{settings.rounds}: {summary}")

    flops = model_flops(case.model, case.batch_size, case.mode)
    rows = []
    for impl, step in steps.items():
        peak, activations = measure_memory(step)
        median = statistics.median(times[impl])
        gemm_rate = gemms[step.case.compute_dtype].flops / statistics.median(gemm_times[step.case.compute_dtype])
        ratio = None
        if peer is not None and impl == IMPL:
            ratio = statistics.median(p / a for p, a in zip(times[peer], times[IMPL], strict=True))
        rows.append(
            Row(
                impl=f"{impl} optimized" if impl == IMPL and step.case.optimize else impl,
                model=step.case.model,
                batch_size=step.case.batch_size,
                dtype=step.case.dtype,
                mode=step.case.mode,
                compile=step.case.compile,
                grad_checkpointing=step.case.grad_checkpointing,
                img_per_s=case.batch_size / median,
                ms_per_batch=median * 1e3,
                best_ms=min(times[impl]) * 1e3,
                ratio_to_peer=ratio,
                model_gflop_per_s=flops / median / 1e9,
                gemm_gflop_per_s=gemm_rate / 1e9,
                gemm_fraction=flops / median / gemm_rate,
                peak_memory_mb=peak / 2**20,
                activation_memory_mb=None if activations is None else activations / 2**20,
                rounds_ms=[t * 1e3 for t in times[impl]],
            )
        )
    return rows


def bench(cases: Iterable[Case], settings: Settings, log: Callable[[str], None] | None = None) -> list[Row]:
    """Time every case (see `expand_cases`) and return the rows; progress goes to `log` (stderr by default)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    cases = list(cases)
    models = sorted({case.model for case in cases})
    compared = peer_has(models) if settings.compare is not None else set()
    if settings.compare is not None and set(models) - compared:
        log(f"{settings.compare} has no {', '.join(sorted(set(models) - compared))}: timed without a peer")
    rows: list[Row] = []
    for index, case in enumerate(cases, 1):
        log(f"[{index}/{len(cases)}] {case}")
        rows.extend(run_case(case, settings if case.model in compared else replace(settings, compare=None), log))
    return rows


COLUMNS = (
    ("model", lambda r: r.model),
    ("impl", lambda r: r.impl),
    ("batch", lambda r: str(r.batch_size)),
    ("dtype", lambda r: r.dtype),
    ("mode", lambda r: r.mode),
    ("compile", lambda r: "yes" if r.compile else "no"),
    ("grad ckpt", lambda r: "yes" if r.grad_checkpointing else "no"),
    ("img/s", lambda r: f"{r.img_per_s:.2f}"),
    ("ms/batch", lambda r: f"{r.ms_per_batch:.1f}"),
    ("vs peer", lambda r: "" if r.ratio_to_peer is None else f"{r.ratio_to_peer:.2f}x"),
    ("GFLOP/s", lambda r: f"{r.model_gflop_per_s:.0f}"),
    ("of GEMM", lambda r: f"{r.gemm_fraction:.0%}"),
    ("peak MB", lambda r: f"{r.peak_memory_mb:.0f}"),
    ("act. MB", lambda r: "" if r.activation_memory_mb is None else f"{r.activation_memory_mb:.0f}"),
)


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table for the README)."""
    header = [name for name, _ in COLUMNS]
    body = [[cell(row) for _, cell in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in [header, *body])


def checkpointing_summary(rows: list[Row]) -> list[str]:
    """One line per training row measured with grad checkpointing: activation memory against the same run without."""

    def key(row: Row) -> tuple:
        return row.impl, row.model, row.batch_size, row.dtype, row.compile

    plain = {key(row): row for row in rows if row.mode == "train" and not row.grad_checkpointing}
    lines = []
    for row in rows:
        base = plain.get(key(row)) if row.grad_checkpointing else None
        if base is None or not base.activation_memory_mb:
            continue
        cut = 1 - row.activation_memory_mb / base.activation_memory_mb
        lines.append(
            f"{row.impl} {row.model} batch {row.batch_size} {row.dtype}{' compiled' if row.compile else ''}: "
            f"activation memory {base.activation_memory_mb:.0f} -> {row.activation_memory_mb:.0f} MB with grad "
            f"checkpointing ({cut:.0%} less); peak {base.peak_memory_mb:.0f} -> {row.peak_memory_mb:.0f} MB; "
            f"speed {row.img_per_s / base.img_per_s:.2f}x"
        )
    return lines


def machine() -> dict:
    """What the numbers were measured on (the bf16 matrix unit decides most of a CPU's bf16 speed)."""
    name, flags = _cpu_info()
    info = {
        "cpu": name,
        "cpu_bf16_unit": "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "none",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "malloc": allocator.state(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(*details: str, malloc: bool = True) -> str:
    """The line a benchmark's table starts with: the CPU and its bf16 unit, threads, torch, then `details` (the
    run's own settings) and the malloc setting (`malloc=False` where the run varies it)."""
    info = machine()
    fields = [f"{info['cpu']} ({info['cpu_bf16_unit']})", f"{info['threads']} threads", f"torch {info['torch']}"]
    return ", ".join([*fields, *details, *([f"malloc: {info['malloc']}"] if malloc else [])])


def _cpu_info() -> tuple[str, set[str]]:
    """Model name and feature flags from /proc/cpuinfo (Linux); elsewhere what `platform` knows."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(name, flags) of the first CPU in /proc/cpuinfo's text (without a name there, what `platform` knows). The
    name carries the family and model numbers, which tell generations apart where a virtual machine names only the
    vendor's line ("AMD EPYC": family 25 is Zen 3 and 4, family 26 Zen 5)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first CPU's block ends
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        name = f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name, set(fields.get("flags", "").split())


def _free_stem(out_dir: Path) -> str:
    """`results`, or `results-2`, `results-3`, ... when earlier runs' files are there: they are kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        stem = "results" if number == 1 else f"results-{number}"
        try:
            (out_dir / f"{stem}.json").open("x").close()  # reserves the name against a bench started alongside
        except FileExistsError:
            continue
        if not (out_dir / f"{stem}.csv").exists():
            return stem
    raise ValueError(f"{out_dir}: no free results-N name")


def write_results(rows: list[Row], out_dir: str | Path, settings: dict, stem: str | None = None) -> tuple[Path, Path]:
    """`results.csv` (one line per row) and `results.json` (rows, per-round times, machine, settings), atomically;
    `results-2.*`, `results-3.*`, ... when an earlier run's results are in `out_dir` (they are never overwritten).
    stem: a name reserved beforehand with `_free_stem`."""
    out_dir = Path(out_dir)
    stem = stem or _free_stem(out_dir)
    names = [f.name for f in fields(Row) if f.name != "rounds_ms"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v for k, v in asdict(row).items() if k != "rounds_ms"})
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    write_bytes_atomic(csv_path, text.getvalue().encode())
    document = {"machine": machine(), "settings": settings, "rows": [asdict(row) for row in rows]}
    write_bytes_atomic(json_path, (json.dumps(document, indent=2) + "\n").encode())
    return csv_path, json_path


def run_command(cases: list[Case], settings: Settings, out_dir: str | Path, markdown: bool = False) -> list[Row]:
    """`allmlp bench`: run, print the table (and the grad-checkpointing memory lines), write CSV and JSON."""
    stem = _free_stem(Path(out_dir))  # an output that cannot be written fails now, not after the timing
    try:
        rows = bench(cases, settings)
    except BaseException:
        (Path(out_dir) / f"{stem}.json").unlink(missing_ok=True)
        raise
    print(machine_line(f"device {settings.device}", f"{settings.clock} clock"))
    print(format_table(rows, markdown))
    for line in checkpointing_summary(rows):
        print(line)
    settings_used = {"cases": [asdict(c) for c in cases], **asdict(settings)}
    csv_path, json_path = write_results(rows, out_dir, settings_used, stem)
    print(f"wrote {csv_path} and {json_path}")
    return rows
