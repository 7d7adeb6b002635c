"""Process-wide settings that make SignRound's tuning faster on a CPU, for a program that owns its
process and opts in: the `lowbit` command runs inside `tuned_process()`. The library itself never
changes its host's process; a script that wants the same speed wraps its work the same way.
Outside `tuned_process()` everything here does nothing.

- glibc's malloc thresholds. Each tuning step allocates and frees the same few-MB buffers. glibc
  starts by handing blocks over 128 KiB back to the OS on free (and zeroing them again on the next
  use), which lengthened a compiled step's iterations in a fresh process (BENCHMARKS.md); it raises
  its thresholds by itself only after the first big free. They are set at once to what glibc
  would reach (32 MiB to mmap, 64 MiB to trim).
- inductor's vector-ISA probe. Before its first CPU compile in a process, torch checks each vector
  ISA the CPU has by loading a probe library in a fresh Python subprocess (BENCHMARKS.md). torch
  reads the ISAs from ATen's CPU check, which has already vouched for them (CPU and OS support),
  so the list is taken without the probes, when code inside is about to compile
  (`before_compile`: importing inductor costs seconds, which a command that compiles nothing
  should not pay). With AMX (whose use the OS must grant), or where inductor's internals differ,
  torch's own check runs as usual.
"""
from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager
from contextvars import ContextVar

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_START = 128 * 1024  # both thresholds' starting values


# Inside tuned_process: what to undo on leaving it.
_undo: ContextVar[list | None] = ContextVar("lowbit_tuned_process", default=None)


@contextmanager
def tuned_process():
    """Within: the malloc thresholds raised, and inductor's ISA list taken without probes once
    something compiles. On exit the ISA list is forgotten (torch probes again when it next needs
    it) and the thresholds go back to glibc's starting values (glibc then no longer moves them by
    itself)."""
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)
    undo: list = []
    token = _undo.set(undo)
    try:
        yield
    finally:
        _undo.reset(token)
        for fn in undo:
            fn()
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, GLIBC_START)
            mallopt(M_TRIM_THRESHOLD, GLIBC_START)


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere):
    a long job that frees a block's worth of tensors at a time keeps its resident memory flat."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def before_compile() -> None:
    """Called before a CPU torch.compile: inside tuned_process, inductor's ISA list is taken
    without its probes (once); elsewhere nothing happens."""
    undo = _undo.get()
    if undo is None or undo:
        return
    listing = _isa_list_without_probe()
    undo.append(listing.cache_clear if listing is not None else (lambda: None))


def _mallopt():
    """glibc's mallopt, or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def _isa_list_without_probe():
    """Fill inductor's cached ISA list without the probe subprocesses; returns the cached function
    (to clear on exit), or None where nothing was done."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor import config, cpu_vec_isa

        listing = cpu_vec_isa.valid_vec_isa_list
        if (config.cpp.vec_isa_ok is not None or listing.cache_info().currsize
                or "amx_tile" in cpu_vec_isa.x86_isa_checker()):
            return None
        with config.patch({"cpp.vec_isa_ok": True}):
            listing()
        return listing
    except (ImportError, AttributeError):
        return None
