"""``impartial.backward`` on ``torch.compile``d models (backends "eager" and "aot_eager": fast on CPU).

Solvers themselves compile with ``fullgraph=True``: that is the registry's ``compile`` claim
(``test_contract.py::test_compiles_with_fullgraph``), not repeated here.

``impartial.backward`` finds blocks in the autograd graph.  Compiling the trunk and the heads as separate
modules keeps the block (the trunk's output) visible, and the gradients are the uncompiled ones.  Compiling
the whole multi-loss forward as one region with an AOT backend hides the block inside one
``CompiledFunctionBackward`` node: the shared parameters become the blocks (one solve per parameter), which
the report shows; ``block="params"`` is then exact.
"""

from __future__ import annotations

import copy

import pytest
import torch

import impartial
from impartial.solvers import IMTLG, MGDA, NSGD, GradNorm, PCGrad, Sum, UPGrad
from models import make, shared_params

BACKENDS = ["eager", "aot_eager"]
#: max |Δ| relative to the largest gradient entry (observed: 0 with trunk and heads compiled, 1.8e-15 through a
#: wholly compiled forward with block="params")
TOL = 1e-12


def _solver(name: str):
    return {
        "IMTLG": IMTLG,
        "MGDA": MGDA,
        "UPGrad": UPGrad,
        "NSGD": lambda: NSGD(reference_step=1),
        "GradNorm": lambda: GradNorm(alpha=1.5, lr=0.1),
        "PCGrad": lambda: PCGrad(generator=torch.Generator().manual_seed(0)),
    }[name]()


def _assert_close(a: torch.nn.Module, b: torch.nn.Module, what: str = "grad") -> None:
    ref = torch.cat([getattr(p, what).flatten() for p in a.parameters()])
    got = torch.cat([getattr(q, what).flatten() for q in b.parameters()])
    err = float((got - ref).abs().max())
    assert err <= TOL * float(ref.abs().max()), f"max |Δ {what}| = {err:.3e}"


def _compile_parts(model: torch.nn.Module, backend: str) -> None:
    # torch.compile(module), not module.compile(): the latter left these modules uncompiled on torch 2.13
    model.trunk = torch.compile(model.trunk, backend=backend)
    for i, head in enumerate(model.heads):
        model.heads[i] = torch.compile(head, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["IMTLG", "MGDA", "UPGrad", "NSGD", "GradNorm", "PCGrad"])
@pytest.mark.parametrize("model_name", ["mlp", "vae", "conv"])
def test_training_with_a_compiled_trunk_and_heads_equals_the_uncompiled_model(
    model_name: str, solver: str, backend: str
) -> None:
    """Three optimizer steps (stateful solvers update in between): same blocks, same grads, same weights."""
    torch._dynamo.reset()
    model, x = make(model_name)
    compiled = copy.deepcopy(model)
    _compile_parts(compiled, backend)
    solvers = [_solver(solver), _solver(solver)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, compiled)]
    for _ in range(3):
        reports = []
        for m, s, opt in zip((model, compiled), solvers, opts):
            opt.zero_grad()
            tasks, also, acts = m.losses(x)
            if m is compiled and backend == "aot_eager" and model_name != "vae":  # it did compile
                assert type(acts["z"].grad_fn).__name__ == "CompiledFunctionBackward", acts["z"].grad_fn
            reports.append(impartial.backward(tasks, shared_params(m), solver=s, also=also))
        assert [b.tasks for b in reports[1].blocks] == [b.tasks for b in reports[0].blocks]
        assert [b.shape for b in reports[1].blocks] == [b.shape for b in reports[0].blocks]
        _assert_close(model, compiled)
        for opt in opts:
            opt.step()
    _assert_close(model, compiled, "data")


@pytest.mark.parametrize("model_name", ["mlp", "hivae"])
def test_a_wholly_compiled_forward_is_exact_with_block_params(model_name: str) -> None:
    torch._dynamo.reset()
    model, x = make(model_name)
    compiled = copy.deepcopy(model)
    losses = torch.compile(compiled.losses, backend="aot_eager")
    for m, fn in ((model, model.losses), (compiled, losses)):
        tasks, also, _ = fn(x)
        impartial.backward(tasks, shared_params(m), solver=IMTLG(), also=also, block="params")
    _assert_close(model, compiled)


def test_a_wholly_compiled_forward_hides_the_block_and_the_report_shows_it() -> None:
    """Documented limitation (docs/compile.md): one AOT region → every shared parameter is its own block.

    If this starts failing because the block is found through the compiled region, update the docs.
    """
    torch._dynamo.reset()
    model, x = make("mlp")
    tasks, also, _ = torch.compile(model.losses, backend="aot_eager")(x)
    with pytest.warns(UserWarning, match="compiled as one graph"):
        report = impartial.backward(tasks, shared_params(model), solver=Sum(), also=also, keep_norm=False)
    assert len(report.warnings) == 1 and "compiled as one graph" in str(report)
    n_shared = len(shared_params(model))
    assert len(report.blocks) == n_shared
    assert all(b.name.startswith("shared_params[") for b in report.blocks), [b.name for b in report.blocks]
    # with Sum every block is still the plain sum: a wholly compiled forward is a plain backward there
    ref, _ = make("mlp")
    tasks, also, _ = ref.losses(x)
    sum(tasks + also).backward()
    _assert_close(ref, model)
