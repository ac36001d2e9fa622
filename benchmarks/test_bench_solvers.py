"""Solver throughput: every solver × k × d, float32, CPU, next to TorchJD and the floor.

Each group ``solvers k=… d=…`` holds, for one ``J [k, d]``: the floor ``J.mean(-2)`` (one pass over J),
``J @ J.T`` (one Gram), every solver of ``impartial.solvers`` and TorchJD's same-named aggregator.  The ratios
BENCHMARKS.md reports (ours / (floor + Gram), TorchJD / ours) come from ``make_tables.py``.

    pytest benchmarks/test_bench_solvers.py --benchmark-only -m quick --benchmark-json=benchmarks/results/cpu.json
"""

from __future__ import annotations

import pytest
import torch

from _bench_registry import entries, fmt_d, versions
from _bench_util import MAX_MB, jacobian, mb, measure

KS = (2, 4, 8, 16, 32, 64, 128, 256)
DS = (10**4, 10**5, 10**6)
#: the subset reported today: the solver issue's table (k ∈ {2, 8, 32}, d ∈ {1e4, 1e6}) and the UPGrad target
QUICK = {(k, d) for k in (2, 8, 32) for d in (10**4, 10**6)} | {(256, 10**4)}


def _cases() -> list:
    rows = entries()
    cases = []
    for d in DS:
        for k in KS:
            size = mb((k, d))
            marks = [pytest.mark.quick] if (k, d) in QUICK else []
            suffix = ""
            if size > MAX_MB:
                suffix = f"-SKIP_mem{size:.0f}MB"
                marks.append(
                    pytest.mark.skip(
                        reason=f"J [{k}, {fmt_d(d)}] is {size:.0f} MB > IMPARTIAL_BENCH_MAX_MB={MAX_MB:.0f}"
                    )
                )
            base = f"k{k}-d{fmt_d(d)}{suffix}"
            impls = [("floor", None, "floor"), ("gram", None, "gram")]
            for e in rows:
                impls.append((e.name, e, "ours"))
                if e.torchjd:
                    impls.append((e.name, e, "torchjd"))
            for name, e, side in impls:
                m = list(marks)
                if e is not None and e.missing and side == "ours":
                    m.append(pytest.mark.skip(reason=f"{e.name}: {e.missing}"))
                label = name if e is None else f"{name}-{side}"
                cases.append(pytest.param(name, e, side, k, d, marks=m, id=f"{label}-{base}"))
    return cases


@pytest.mark.parametrize(("name", "entry", "side", "k", "d"), _cases())
def test_solver(benchmark, name, entry, side, k, d) -> None:
    J = jacobian((k, d))
    benchmark.group = f"solvers k={k} d={fmt_d(d)}"
    benchmark.extra_info.update(
        kind="solver",
        solver=name,
        side=side,
        k=k,
        d=d,
        dtype="float32",
        device="cpu",
        gram_space=bool(entry and entry.gram_space),
        **versions(),
    )
    if side == "floor":
        fn = lambda: J.mean(-2)  # noqa: E731
    elif side == "gram":
        fn = lambda: J @ J.mT  # noqa: E731
    elif side == "ours":
        solver = entry.make()
        losses = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5
        fn = lambda: solver(J, losses=losses)  # noqa: E731
    else:
        agg = entry.make_torchjd(k, None if entry.missing else entry.make())
        fn = lambda: agg(J)  # noqa: E731
    with torch.no_grad():
        out = measure(benchmark, fn)
    assert out.shape == ((k, k) if side == "gram" else (d,))
