"""Benchmarks run only on request: ``pytest benchmarks/ --benchmark-only`` (or ``IMPARTIAL_BENCH=1``).

The default ``pytest`` never collects this folder (``testpaths`` are ``tests`` and ``impartial``); this hook
also skips the benchmarks when the folder is named explicitly without ``--benchmark-only``, so a stray
``pytest benchmarks/`` stays cheap.  ``-m quick`` selects the subset whose numbers BENCHMARKS.md reports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: the benchmark subset BENCHMARKS.md reports (run with -m quick)")


def _wanted(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", default=False)) or os.environ.get("IMPARTIAL_BENCH", "") not in (
        "",
        "0",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _wanted(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark-only or IMPARTIAL_BENCH=1")
    for item in items:
        if _HERE in Path(str(item.path)).parents and item.path.name.startswith("test_bench"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _bench_threads() -> None:
    # One thread by default: on a shared 2-core machine a second OpenMP thread waits on the other users and
    # turns microseconds into milliseconds.  IMPARTIAL_BENCH_THREADS=2 on an idle machine.
    torch.set_num_threads(int(os.environ.get("IMPARTIAL_BENCH_THREADS", "1")))
