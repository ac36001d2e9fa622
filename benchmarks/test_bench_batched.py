"""Batched small problems (per-sample blocks): ours in one call on ``J [B, k, d]`` vs a loop of TorchJD over B.

TorchJD aggregators take one ``[k, d]`` matrix at a time, so per-sample use means a Python loop over B.

    pytest benchmarks/test_bench_batched.py --benchmark-only -m quick
"""

from __future__ import annotations

import pytest
import torch

from _bench_registry import entries, versions
from _bench_util import jacobian, measure

BS = (1, 64, 1024)
KDS = ((2, 16), (2, 64), (4, 16), (4, 64))
QUICK = {(B, k, d) for B in BS for (k, d) in ((2, 16), (4, 64))}


def _cases() -> list:
    cases = []
    for k, d in KDS:
        for B in BS:
            base = f"B{B}-k{k}-d{d}"
            marks = [pytest.mark.quick] if (B, k, d) in QUICK else []
            for e in entries():
                sides = ("ours", "torchjd") if e.torchjd else ("ours",)
                for side in sides:
                    m = list(marks)
                    if e.missing and side == "ours":
                        m.append(pytest.mark.skip(reason=f"{e.name}: {e.missing}"))
                    cases.append(pytest.param(e, side, B, k, d, marks=m, id=f"{e.name}-{side}-{base}"))
    return cases


@pytest.mark.parametrize(("entry", "side", "B", "k", "d"), _cases())
def test_batched(benchmark, entry, side, B, k, d) -> None:
    J = jacobian((B, k, d))
    benchmark.group = f"batched B={B} k={k} d={d}"
    benchmark.extra_info.update(
        kind="batched", solver=entry.name, side=side, B=B, k=k, d=d, dtype="float32", device="cpu", **versions()
    )
    if side == "ours":
        solver = entry.make()
        losses = torch.rand(B, k, generator=torch.Generator().manual_seed(1)) + 0.5  # loss-based GradNorm
        fn = lambda: solver(J, losses=losses)  # noqa: E731
    else:
        agg = entry.make_torchjd(k, None if entry.missing else entry.make())
        fn = lambda: torch.stack([agg(J[b]) for b in range(B)])  # noqa: E731
    with torch.no_grad():
        out = measure(benchmark, fn)
    assert out.shape == (B, d)
