"""End-to-end step: ``sum(losses).backward()`` vs ``impartial.backward`` (``block="auto"`` / ``"params"``) vs
TorchJD ``mtl_backward`` + ``jac_to_grad``; wall time (pytest-benchmark) and peak memory (``extra_info``).

A step = zero grads, forward, backward; the optimizer step is left out (the same for all).  Models: the
zoo's MVAE (``examples/vae_zoo``, digits trio, KL terms in ``also``) and an MLP trunk of 1.05M parameters with
k ∈ {2, 8, 32} heads.

    pytest benchmarks/test_bench_step.py --benchmark-only -m quick
"""

from __future__ import annotations

import pytest
import torch

from _bench_models import make, step
from _bench_registry import versions
from _bench_util import measure, peak_mb

MODELS = ("vae", "mlp-k2", "mlp-k8", "mlp-k32")
SOLVERS = ("IMTLG", "UPGrad")
QUICK_MODELS = ("vae", "mlp-k8")


def _cases() -> list:
    cases = []
    for model in MODELS:
        quick = [pytest.mark.quick] if model in QUICK_MODELS else []
        cases.append(pytest.param(model, "plain", None, marks=quick, id=f"{model}-plain"))
        for solver in SOLVERS:
            for variant in ("auto", "params", "torchjd"):
                cases.append(pytest.param(model, variant, solver, marks=quick, id=f"{model}-{variant}-{solver}"))
    return cases


@pytest.mark.parametrize(("model", "variant", "solver"), _cases())
def test_step(benchmark, model, variant, solver) -> None:
    setup = make(model)
    try:
        run = step(setup, variant, solver)
    except TypeError as e:  # a placeholder solver class
        pytest.skip(f"{solver} not implemented yet ({e})")
    try:
        run()
    except NotImplementedError as e:
        pytest.skip(f"impartial.backward not implemented yet ({e})")
    benchmark.group = f"step {model}"
    benchmark.extra_info.update(
        kind="step",
        model=model,
        source=setup.name,
        variant=variant,
        solver=solver or "",
        n_shared=sum(p.numel() for p in setup.shared),
        k=len(setup.heads),
        **versions(),
    )
    measure(benchmark, run)
    benchmark.extra_info["peak_mb"] = peak_mb(run)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in setup.shared)
