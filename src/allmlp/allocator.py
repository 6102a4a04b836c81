"""Keep the memory a model frees inside the process, so that the next step reuses it (glibc's malloc, Linux).

With its default settings glibc serves large blocks with mmap (above a threshold that starts at 128 KiB and rises
with the sizes freed) and unmaps them when they are freed, and it trims the heap's top once enough there is free.
A model allocates and frees its activations at every step, so every step writes them to fresh pages, and the first
write to each 4 KiB page is a page fault in which the kernel zero-fills it. On the 2-core Zen 5 of these sessions,
eager bf16 inference at batch 16 took 12,000 to 150,000 page faults per batch (by model and run), and filling a
24 MB tensor with a bias (what `nn.Linear` on CPU does before its product) took 6 ms in fresh memory against
0.4 ms in reused memory. `retain_freed_memory` makes glibc serve every block from its heap (`M_MMAP_MAX` 0) and
keep up to 2 GiB of free memory at the heap's top (`M_TRIM_THRESHOLD`): the faults go to nearly none, and the
process's resident memory stays near its peak between steps instead of falling back.

It is a setting of the whole process, so importing allmlp never makes it. The `allmlp` command makes it when it
starts (`ALLMLP_MALLOC=system` leaves glibc's defaults); a program of your own can call it once at the start.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_MAX = -4
KEPT_FREE_BYTES = 2**31 - 1  # the largest trim threshold mallopt takes (an int): 2 GiB
CHOICES = ("retain", "system")

_state = "not set by allmlp"


def runs_on_glibc() -> bool:
    """Whether this process's C library is glibc (asked of the library itself, not read off the executable)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or no such name (macOS, musl)
        return False


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module doc). Returns True when the settings
    took; False, changing nothing, where the C library is not glibc (macOS, Windows, musl)."""
    global _state
    if not runs_on_glibc():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)):
        return False
    _state = "glibc, freed memory kept (allmlp.allocator)"
    return True


def state() -> str:
    """How this process's malloc is set, for benchmark records."""
    return _state


def apply_environment() -> None:
    """The `allmlp` command's policy: retain freed memory unless ALLMLP_MALLOC=system."""
    choice = os.environ.get("ALLMLP_MALLOC", "retain")
    if choice not in CHOICES:
        raise ValueError(f"ALLMLP_MALLOC must be one of {', '.join(CHOICES)} (or unset: retain), got {choice!r}")
    if choice == "retain":
        retain_freed_memory()
