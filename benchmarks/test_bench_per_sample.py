"""Every sample a task (issue 14): ``impartial.backward(L, model, block="params")`` on a vector of per-sample losses
vs TorchJD's ``autogram.Engine(model, batch_dim=0)`` with the same weighting, and a plain ``L.mean().backward()``.

Models (``_bench_per_sample``): an MLP, a small convnet and a small Transformer encoder; B ∈ {32, 128, 512};
weightings Mean and UPGrad.  Wall time via pytest-benchmark (UPGrad at B = 512 exceeds ``IMPARTIAL_BENCH_MAX_S`` on
both sides and is skipped here; ``per_sample_ratios.py`` times it once), peak memory in ``extra_info``.  The ratios
BENCHMARKS.md reports come from ``benchmarks/per_sample_ratios.py`` (thread time, interleaved, one process).

    pytest benchmarks/test_bench_per_sample.py --benchmark-only -m quick
"""

from __future__ import annotations

import pytest
import torch
from _bench_per_sample import MODELS, SIZES, WEIGHTINGS, flat_grad, make, model_of, step

from _bench_registry import versions
from _bench_util import measure, peak_mb


def _cases() -> list:
    out = []
    for model in MODELS:
        for B in SIZES:
            quick = [pytest.mark.quick] if B == 128 else []
            out.append(pytest.param(model, B, "plain", None, marks=quick, id=f"{model}-B{B}-plain"))
            for weighting in WEIGHTINGS:
                for variant in ("impartial", "torchjd"):
                    out.append(
                        pytest.param(
                            model, B, variant, weighting, marks=quick, id=f"{model}-B{B}-{variant}-{weighting}"
                        )
                    )
    return out


@pytest.mark.parametrize(("model", "B", "variant", "weighting"), _cases())
def test_per_sample_step(benchmark, model: str, B: int, variant: str, weighting: str | None) -> None:
    case = make(model, B)
    run = step(case, variant, weighting)
    benchmark.group = f"per-sample {model} B={B}"
    benchmark.extra_info.update(
        kind="per-sample",
        model=model,
        B=B,
        variant=variant,
        weighting=weighting or "",
        n_params=case.params,
        **versions(),
    )
    out = measure(benchmark, run)
    benchmark.extra_info["peak_mb"] = peak_mb(run)
    if variant == "impartial":
        assert out.blocks[0].gram_from == "per-sample", out.blocks[0].note
    assert torch.isfinite(flat_grad(model_of(run))).all()
