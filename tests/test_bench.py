"""`allmlp bench`: cases, FLOP counts, the table and files it writes, bad input. No timing is asserted."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import allmlp
from allmlp import allocator
from allmlp.cli import main
from allmlp.tools.bench import Case, Settings, bench, expand_cases, expand_models, model_flops, parse_cpuinfo

COLUMNS = ["img/s", "ms/batch", "vs peer", "GFLOP/s", "of GEMM", "peak MB", "act. MB"]
QUICK = ["--models", "mixer_s32_224", "--batch-sizes", "1", "--rounds", "1", "--warmup", "1", "--gemm-size", "64"]


def test_flops_of_b16_are_the_papers():
    assert model_flops("mixer_b16_224", 1, "inference") == pytest.approx(25.2e9, rel=0.001)  # 12.6 GMACs
    assert model_flops("mixer_b16_224", 2, "train") == pytest.approx(2 * 3 * 25.2e9, rel=0.01)  # fwd + 2x bwd


def test_cases_cover_every_combination_once():
    cases = expand_cases(["mixer_s32_224"], [1, 2], ["fp32", "bf16", "bf16-autocast"], ["inference", "train"],
                         [False, True], grad_checkpointing=True)  # fmt: skip
    inference = [c for c in cases if c.mode == "inference"]
    train = [c for c in cases if c.mode == "train"]
    assert len(inference) == 2 * 3 * 2 and not any(c.grad_checkpointing for c in inference)
    assert {c.dtype for c in train} == {"fp32", "bf16"}  # training in bf16 is autocast either way
    assert len(train) == 2 * 2 * 2 * 2 and len(set(cases)) == len(cases)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: expand_cases(["mixer_x1"], [1], ["fp32"], ["inference"], [False]), "unknown model 'mixer_x1'"),
        (lambda: expand_cases(["mixer_s32_224"], [0], ["fp32"], ["inference"], [False]), "batch sizes must be"),
        (lambda: expand_cases(["mixer_s32_224"], [1], ["fp16"], ["inference"], [False]), "dtype must be one of"),
        (lambda: expand_cases(["mixer_s32_224"], [1], ["fp32"], ["eval"], [False]), "mode must be one of"),
        (lambda: Settings(compare="authors"), "compare must be one of"),
        (lambda: Settings(rounds=0), "rounds and warmup must be >= 1"),
        (lambda: Settings(clock="tsc"), "clock must be one of"),
        (lambda: Settings(threads=0), "threads must be >= 1"),
    ],
)
def test_bad_settings_are_named(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_a_model_timm_lacks_is_timed_without_a_peer():
    logs = []
    rows = bench([Case("mixer_s8_224", 1, "fp32", "inference", False)], Settings(compare="timm", rounds=1,
                 warmup=1), log=logs.append)  # fmt: skip
    assert "timm has no mixer_s8_224: timed without a peer" in logs
    assert [(row.impl, row.ratio_to_peer) for row in rows] == [("allmlp", None)]


def test_models_are_names_or_patterns():
    assert expand_models(["cyclemlp_b[12]", "vip_*", "cyclemlp_b1"]) == ["cyclemlp_b1", "cyclemlp_b2", "vip_l7",
                                                                           "vip_m7", "vip_s7"]  # fmt: skip
    assert set(expand_models(["*"])) == set(allmlp.list_models())
    with pytest.raises(ValueError, match="unknown model 'resnet_\\*'"):
        expand_models(["resnet_*"])


def test_cli_reports_bad_input(capsys):
    assert main(["bench", "--models", "mixer_nope"]) == 2
    assert "unknown model 'mixer_nope'" in capsys.readouterr().err


def test_bench_against_timm_writes_table_csv_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", *QUICK, "--dtypes", "bf16", "--modes", "inference", "train", "--compare", "timm"]
    assert main([*args, "--grad-checkpointing", "--threads", "1", "--clock", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[1]
    assert all(column in header for column in COLUMNS)
    assert "activation memory" in captured.out and "with grad checkpointing" in captured.out
    assert "round 1/1" in captured.err and "[3/3]" in captured.err  # progress

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["mode"], r["grad_checkpointing"]) for r in rows] == [
        ("allmlp", "inference", "False"),
        ("timm", "inference", "False"),
        ("allmlp", "train", "False"),
        ("timm", "train", "False"),
        ("allmlp", "train", "True"),
        ("timm", "train", "True"),
    ]
    for row in rows:
        assert float(row["img_per_s"]) > 0 and float(row["gemm_fraction"]) > 0 and float(row["peak_memory_mb"]) > 0
        assert (row["ratio_to_peer"] != "") == (row["impl"] == "allmlp")
        assert (row["activation_memory_mb"] != "") == (row["mode"] == "train")
    plain, checkpointed = float(rows[2]["activation_memory_mb"]), float(rows[4]["activation_memory_mb"])
    assert 0 < checkpointed < plain / 2  # only the block inputs are kept

    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["compare"] == "timm" and document["machine"]["threads"] == 1
    assert len(document["rows"]) == 6 and all(len(r["rounds_ms"]) == 1 for r in document["rows"])


def test_bench_alone_in_fp32(tmp_path, capsys):
    assert main(["bench", *QUICK, "--dtypes", "fp32", "--out", str(tmp_path), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| model | impl |" in table and "| mixer_s32_224 | allmlp | 1 | fp32 | inference |" in table
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.json").is_file()


def test_cyclemlp_vip_benchmark_checks_the_authors_formulation_and_prints_its_table():
    """benchmarks/bench_cyclemlp_vip.py runs end to end: same logits as the authors' formulation, every row."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_cyclemlp_vip.py"
    command = [sys.executable, str(script), "--threads", "1", "--batch", "1", "--rounds", "1", "--no-compile"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    differences = [float(d) for d in re.findall(r"max \|logit difference\|.*: (\S+)", output)]
    assert len(differences) == 2 and max(differences) < 1e-5
    rows = re.findall(r"^\| (cyclemlp_b1|vip_s7) \| (\w+) \| ([\w ]+) \| [\d.]+ \| \d+\.\d\dx \|$", output, re.M)
    impls = ("allmlp", "allmlp optimized", "authors")
    expected = {(m, d, i) for m in ("cyclemlp_b1", "vip_s7") for d in ("float32", "bfloat16") for i in impls}
    assert set(rows) == expected - {("cyclemlp_b1", "bfloat16", "authors")} and len(rows) == 11
    assert "| cyclemlp_b1 | bfloat16 | authors | n/a (deform_conv2d: no bf16 CPU kernel) | |" in output


def test_a_peer_that_computes_something_else_is_refused():
    """The check compares features: a new Mixer's zero head makes every logit 0, which would hide any difference."""
    import copy

    import torch

    from allmlp import MlpMixer
    from allmlp.tools.bench import _check_same_function

    ours = MlpMixer(img_size=32, patch_size=8, num_classes=10, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                    channels_mlp_dim=32)  # fmt: skip
    peer = copy.deepcopy(ours)
    assert _check_same_function(ours, peer, "tiny") < 1e-5
    with torch.no_grad():
        peer.blocks[1].mlp_channels.fc2.weight[0].add_(0.5)
    with pytest.raises(ValueError, match=r"disagree on tiny: max \|feature difference\|"):
        _check_same_function(ours, peer, "tiny")


def test_bench_keeps_earlier_results_and_prints_no_profiler_noise(tmp_path, capfd):
    args = ["bench", *QUICK, "--dtypes", "fp32", "--out", str(tmp_path)]
    assert main(args) == 0
    first = (tmp_path / "results.json").read_bytes()
    assert main(args) == 0
    assert (tmp_path / "results.json").read_bytes() == first  # the earlier run's numbers are still there
    assert (tmp_path / "results-2.csv").is_file() and json.loads((tmp_path / "results-2.json").read_text())["rows"]
    captured = capfd.readouterr()  # file-descriptor level: what the profiler's native code prints, too
    assert "wrote" in captured.out and "results-2.csv" in captured.out
    for noise in ("gpuGetDeviceCount", "USDT:", "profiler_start", "DeviceProperties"):
        assert noise not in captured.err


@pytest.mark.parametrize("name", ["cyclemlp_b1", "vip_s7"])
def test_a_step_of_cyclemlp_and_vip_is_built_and_counted(name):
    """Their configs hold img_size as one int (CycleMLP) or a list (ViP); the bench step needs (H, W)."""
    import torch

    from allmlp.tools.bench import Case, Step, model_flops

    model = allmlp.create_model(name)
    step = Step(model, Case(name, 1, "fp32", "inference", False), torch.device("cpu"), True, model, "wall")
    assert step.images.shape == (1, 3, 224, 224)
    assert model_flops(name, 1, "inference") > 1e9


def test_optimized_cases_are_inference_in_the_models_dtype_eager_and_compiled():
    cases = expand_cases(["mixer_s32_224"], [1], ["fp32", "bf16", "bf16-autocast"], ["inference", "train"],
                         [False, True], optimize_modes=[False, True])  # fmt: skip
    optimized = [(c.dtype, c.mode, c.compile) for c in cases if c.optimize]
    assert optimized == [("fp32", "inference", False), ("fp32", "inference", True), ("bf16", "inference", False),
                         ("bf16", "inference", True)]  # fmt: skip
    assert str(next(c for c in cases if c.optimize)) == "mixer_s32_224 batch 1 fp32 inference optimized"
    cases = expand_cases(["resmlp_12_224", "wavemlp_t"], [1], ["bf16"], ["inference"], [False],
                         optimize_modes=[False, True])  # fmt: skip
    only_where_it_applies = [("resmlp_12_224", False), ("wavemlp_t", False), ("wavemlp_t", True)]
    assert [(c.model, c.optimize) for c in cases] == only_where_it_applies


def test_bench_times_the_optimized_module_as_its_own_row(tmp_path, capsys):
    assert main(["bench", *QUICK, "--dtypes", "fp32", "--optimize", "off", "on", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        assert [r["impl"] for r in csv.DictReader(f)] == ["allmlp", "allmlp optimized"]


def run_families_benchmark(model: str, *options: str) -> tuple[str, list[tuple[str, str, str]]]:
    """benchmarks/bench_families.py on `model` (1 thread, batch 1, 1 round): its stderr and its table rows
    (dtype, implementation, ratio or '')."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_families.py"
    command = [sys.executable, str(script), "--models", model, "--threads", "1", "--batch", "1", "--rounds", "1"]
    result = subprocess.run([*command, *options], capture_output=True, text=True, check=True)
    row = rf"^\| {model} \| (\w+) \| ([\w ]+) \| [\d.]+ \| ([\d.]+x)? \| \d+% \|$"
    return result.stderr, re.findall(row, result.stdout, re.M)


def test_families_benchmark_covers_every_family_and_checks_the_authors_formulation():
    """benchmarks/bench_families.py has an authors' formulation (tests/reference) for every family it times by
    default, and runs end to end: logits agree, one row per implementation and dtype, with ratio and GEMM share."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_families import OWN_BENCHMARK, authors_constructors, default_models

    families = {entry.architecture.__name__ for entry in allmlp.models.REGISTRY.values()} - OWN_BENCHMARK
    assert families <= set(authors_constructors())
    assert {allmlp.get_entry(name).architecture.__name__ for name in default_models()} == families
    log, rows = run_families_benchmark("spach_ms_mlp_xxs")
    assert re.search(r"spach_ms_mlp_xxs: logits agree with the authors formulation to \S+", log)
    assert {(dtype, impl) for dtype, impl, _ in rows} == {
        (d, i) for d in ("float32", "bfloat16") for i in ("authors", "allmlp")
    }
    assert all(ratio for dtype, impl, ratio in rows if impl == "allmlp")


def test_families_benchmark_times_the_deploy_form_against_the_authors_deploy_form():
    """A family with a deploy form (RepMLPNet) gets rows for it, allmlp's folded by `allmlp.reparameterize` against
    the authors' `deploy=True` model with the same folded weights, after their logits are compared."""
    log, rows = run_families_benchmark("repmlpnet_t224", "--dtypes", "float32")
    assert re.search(r"repmlpnet_t224 deployed: logits agree with the authors formulation to \S+", log)
    assert [impl for _, impl, _ in rows] == ["authors", "allmlp", "authors deployed", "allmlp deployed"]
    assert [ratio for _, impl, ratio in rows if impl.startswith("authors")] == ["1.00x", "1.00x"]


def test_families_benchmark_times_the_inference_module_where_there_is_one():
    """A family `allmlp.optimize_for_inference` takes (Wave-MLP) gets a row for its inference module, compared with
    the authors' model as built, after its logits are compared with theirs."""
    log, rows = run_families_benchmark("wavemlp_t_dw", "--dtypes", "float32")
    assert re.search(r"wavemlp_t_dw optimized: logits agree with the authors formulation to \S+", log)
    assert [impl for _, impl, _ in rows] == ["authors", "allmlp", "allmlp optimized"]
    assert all(ratio for _, impl, ratio in rows if impl.startswith("allmlp"))


@pytest.mark.skipif(not allocator.runs_on_glibc(), reason="the setting it measures is glibc's")
def test_malloc_benchmark_times_both_settings_in_fresh_processes():
    """benchmarks/bench_malloc.py runs a model once under glibc's defaults and once with freed memory kept, in
    processes of their own, and reports the speeds, the page faults and the per-pair speed-up."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_malloc.py"
    command = [sys.executable, str(script), "--models", "mixer_s32_224", "--threads", "1", "--batch", "2",
               "--pairs", "1", "--warmup", "1", "--batches", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    row = re.search(
        r"^\| mixer_s32_224 \| [\d.]+ \| [\d.]+ \| [\d,]+ → [\d,]+ \| [\d.]+x \([\d.]+\) \|$",
        result.stdout,
        re.M,
    )
    assert row, result.stdout  # (that the setting removes the faults is test_allocator's)


ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16 avx512_vp2intersect

processor\t: 1
model name\t: another CPU
"""


def test_the_cpu_is_named_with_its_family_and_model():
    """A virtual machine's "AMD EPYC" says nothing of the generation; the family and model numbers do (26: Zen 5)."""
    name, flags = parse_cpuinfo(ZEN5)
    assert name == "AMD EPYC (family 26, model 2)"
    assert {"avx512_bf16", "avx512f"} <= flags and "amx_bf16" not in flags
