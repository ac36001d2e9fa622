"""Shared benchmark plumbing: cached inputs, the timing policy, and peak-memory measurement."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

#: largest J one case may allocate (MB); bigger grid points are skipped with the size in their id
MAX_MB = float(os.environ.get("IMPARTIAL_BENCH_MAX_MB", "256"))
#: a call slower than this (s) is timed once more instead of calibrated over many rounds
SLOW_S = float(os.environ.get("IMPARTIAL_BENCH_SLOW_S", "0.5"))
#: a first call still running after this many seconds is abandoned and the case skipped (keeps the grid bounded)
MAX_S = float(os.environ.get("IMPARTIAL_BENCH_MAX_S", "20"))


class _TooSlow(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TooSlow


@functools.lru_cache(maxsize=1)
def jacobian(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Task gradients ``J`` of ``shape`` (float32, standard normal); cached so adjacent cases share it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def mb(shape: tuple[int, ...]) -> float:
    n = 1
    for s in shape:
        n *= s
    return 4 * n / 2**20


def measure(benchmark: Any, fn: Callable[[], Any]) -> Any:
    """Time ``fn`` with pytest-benchmark; a slow ``fn`` (first call > SLOW_S) gets one timed round only.

    Returns the warm-up call's result (for a sanity check after timing).
    """
    import pytest

    # SIGALRM interrupts the warm-up between two Python bytecodes (torch ops are short next to MAX_S)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, MAX_S)
    t0 = time.perf_counter()
    try:
        out = fn()  # warm-up: lazy init, first-touch page faults, TorchJD's cvxpy problem construction
    except _TooSlow:
        pytest.skip(f"TIMEOUT: one call takes more than IMPARTIAL_BENCH_MAX_S={MAX_S:g} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    first = time.perf_counter() - t0
    benchmark.extra_info["first_call_s"] = first
    if first > SLOW_S:
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
    return out


_libc: Any = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory ``fn`` adds over what is live before it (MB), or None where Linux can't tell.

    glibc keeps freed heap pages, which would hide a re-allocation; ``malloc_trim`` returns them first, then
    ``clear_refs`` (5) resets the high-water mark ``VmHWM`` to the current RSS.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        gc.collect()
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024
    except (OSError, KeyError):
        return None
