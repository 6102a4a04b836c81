"""The malloc setting of the `allmlp` command: freed activations stay in the process instead of page-faulting back."""

import os
import subprocess
import sys

import pytest

from allmlp import allocator, cli

GLIBC = allocator.runs_on_glibc()

# Allocate-fill-free cycles of a 64 MiB tensor (16,384 pages of 4 KiB, above glibc's largest mmap threshold):
# two to settle the heap, then the minor page faults of six more.
CYCLES = """
import resource, sys, torch
from allmlp import allocator
print(allocator.retain_freed_memory() if sys.argv[1] == "retain" else None)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(16 << 20)
before = faults()
for _ in range(6):
    torch.ones(16 << 20)
print(faults() - before)
"""
PAGES = (64 << 20) // 4096


def _faults(setting: str) -> tuple[str, int]:
    lines = subprocess.run([sys.executable, "-c", CYCLES, setting], capture_output=True, text=True, check=True)
    took, faults = lines.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    took, faults = _faults("retain")
    assert took == "True"
    # Retained memory is reused without faults (0 here), but a run during a fresh-clone `make test` once faulted
    # one block's pages again, plus one: allow two blocks. glibc's defaults fault all six (98,310 here).
    assert faults <= 2 * PAGES, f"{faults} page faults in six cycles of a 64 MiB block: more than two blocks' pages"
    _, default_faults = _faults("system")
    # glibc's defaults give each cycle fresh pages: 6 * PAGES faults here with 4 KiB pages (fewer where transparent
    # huge pages are always on), the cost that the setting removes
    assert default_faults > faults


def test_elsewhere_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(os, "confstr", lambda name: None)
    monkeypatch.setattr(allocator, "_state", "not set by allmlp")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("no C library call off glibc"))
    assert allocator.retain_freed_memory() is False
    assert allocator.state() == "not set by allmlp"


@pytest.mark.parametrize(("value", "retains"), [(None, True), ("retain", True), ("system", False)])
def test_the_command_retains_freed_memory_unless_told_not_to(monkeypatch, capsys, value, retains):
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1))
    if value is None:
        monkeypatch.delenv("ALLMLP_MALLOC", raising=False)
    else:
        monkeypatch.setenv("ALLMLP_MALLOC", value)
    assert cli.main(["list", "mixer_s16*"]) == 0
    assert calls == ([1] if retains else [])


def test_a_bad_malloc_choice_is_refused_by_name(monkeypatch, capsys):
    monkeypatch.setenv("ALLMLP_MALLOC", "jemalloc")
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert "ALLMLP_MALLOC must be one of retain, system" in err and "'jemalloc'" in err
