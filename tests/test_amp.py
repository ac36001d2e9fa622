"""Mixed precision: bf16 autocast, GradScaler-scaled losses, and the dtype of the ``k × k`` solve.

- Scaling every loss by ``s = 2ⁿ`` (what ``GradScaler`` does) scales every task gradient by ``s`` exactly (a
  power of two changes only the exponent), and ``G`` by ``s²``.  A positively homogeneous solver's weights are
  then *bitwise* the same, so ``.grad`` is bitwise ``s`` times the unscaled one and ``unscale_`` recovers it
  bitwise: a scaled training run is the unscaled run, bit for bit, even when the scale changes every step.
- ``torch.autocast("cpu", dtype=torch.bfloat16)``: the block gradients are bf16, the Gram is accumulated in
  float32 and the solve runs in float64; the update is the float32 one to bf16 accuracy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor

import impartial
from impartial.solvers import IMTLG, MGDA, NSGD, AlignedMTL, CAGrad, ConFIG, DualProj, Mean, NashMTL, Sum, UPGrad, gram
from models import make, shared_params
from registry import SolverInfo, claiming, rows
from strategies import jacobians, losses_for

HOMOGENEOUS = [pytest.param(r, id=r.id) for r in claiming("homogeneous")]
GRAM_ROWS = [pytest.param(r, id=r.id) for r in rows() if r.make().gram_space]


def _call(info: SolverInfo, solver, J: Tensor, s: float = 1.0, weights: bool = False) -> Tensor:
    """One call of ``solver`` on ``s·J`` (losses scaled by ``s`` too, as a GradScaler scales them)."""
    kw = {"losses": losses_for(J) * s} if info.needs_losses else {}
    torch.manual_seed(0)  # rows drawing from the global RNG draw the same numbers for both scales
    if weights:
        return solver.weights(gram(J * s), **kw)
    if info.context is not None:
        kw.update(info.context(J))  # activations: a loss scale does not touch them
    return solver(J * s, **kw)


@pytest.mark.parametrize("info", HOMOGENEOUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(J=jacobians(max_k=10, max_d=24), n=st.integers(-24, 24))
def test_homogeneous_solvers_are_bitwise_invariant_to_a_power_of_two_loss_scale(
    info: SolverInfo, dtype: torch.dtype, J: Tensor, n: int
) -> None:
    """Weights bitwise equal and direction bitwise ``s`` times, over two calls (stateful solvers update)."""
    s = 2.0**n
    if dtype == torch.float32:  # keep the float32 Gram of both scales clear of overflow and subnormals
        big = float(J.abs().max()) * max(s, 1.0)
        tiny = float(J[J != 0].abs().min()) * min(s, 1.0) if (J != 0).any() else 1.0
        assume(big < 1e15 and tiny > 1e-15)
    J = J.to(dtype)
    J2 = J.roll(1, dims=-2).flip(-1)  # a second, different call
    a, b = info.make(), info.make()
    if a.gram_space:
        for Jc in (J, J2):
            wa, wb = _call(info, a, Jc, weights=True), _call(info, b, Jc, s, weights=True)
            assert wa.dtype == torch.float64
            assert torch.equal(wa, wb), f"max |Δw| = {float((wa - wb).abs().max()):.3e} at s = 2^{n}"
        a, b = info.make(), info.make()
    for Jc in (J, J2):
        da, db = _call(info, a, Jc), _call(info, b, Jc, s)
        assert torch.equal(da * s, db), f"max |s·A(J) − A(sJ)| = {float((da * s - db).abs().max()):.3e}"


def _step_pair(model_name: str, info: SolverInfo, keep_norm: bool, steps: int = 3, init_scale: float = 2.0**14) -> None:
    torch.manual_seed(0)
    model, x = make(model_name)
    model, x = model.float(), x.float()
    scaled = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, scaled)]
    solvers = [info.make(), info.make()]
    # growth_interval=1: the scale doubles after every step, so stateful solvers see a new scale each call
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        tasks, also, _ = model.losses(x)
        torch.manual_seed(1)
        impartial.backward(tasks, shared_params(model), solver=solvers[0], also=also, keep_norm=keep_norm)
        tasks, also, _ = scaled.losses(x)
        s = float(scaler.get_scale())
        torch.manual_seed(1)
        impartial.backward(
            [scaler.scale(t) for t in tasks],
            shared_params(scaled),
            solver=solvers[1],
            also=[scaler.scale(a) for a in also],
            keep_norm=keep_norm,
        )
        for (name, p), q in zip(model.named_parameters(), scaled.parameters()):
            assert torch.equal(q.grad, p.grad * s), f"{name}: .grad is not exactly s = {s} times the unscaled"
        scaler.unscale_(opts[1])
        for (name, p), q in zip(model.named_parameters(), scaled.parameters()):
            assert torch.equal(q.grad, p.grad), name
        opts[0].step()
        scaler.step(opts[1])
        scaler.update()
    assert float(scaler.get_scale()) == init_scale * 2**steps  # no step was skipped for an inf
    for (name, p), q in zip(model.named_parameters(), scaled.parameters()):
        assert torch.equal(p, q), f"{name}: the scaled run left the unscaled one"


@pytest.mark.parametrize("info", HOMOGENEOUS)
@pytest.mark.parametrize("keep_norm", [True, False], ids=["keep_norm", "raw"])
@pytest.mark.parametrize("model_name", ["mlp", "conv", "vae"])
def test_grad_scaler_training_is_bitwise_the_unscaled_training(
    model_name: str, keep_norm: bool, info: SolverInfo
) -> None:
    """``keep_norm=False`` leaves the solver's own scale in the update (FairGrad, not homogeneous, fails it)."""
    _step_pair(model_name, info, keep_norm)


@pytest.mark.parametrize("info", GRAM_ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_gram_solve_runs_in_float64_whatever_the_input_dtype(info: SolverInfo, dtype: torch.dtype) -> None:
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    kw = {"losses": losses_for(J.double())} if info.needs_losses else {}
    seen: list[torch.dtype] = []
    solver = info.make()
    for name in ("_weights", "_solve"):  # where the public entry points hand over the k × k problem
        if hasattr(solver, name):
            inner = getattr(solver, name)
            setattr(solver, name, lambda G, *a, _inner=inner, **kw: seen.append(G.dtype) or _inner(G, *a, **kw))
    w = solver.weights(gram(J), **kw)
    assert w.dtype == torch.float64 and gram(J).dtype == torch.float64
    w2 = info.make().weights(gram(J).to(dtype), **kw)  # a user's low-precision G is promoted too
    assert w2.dtype == torch.float64
    assert all(d == torch.float64 for d in seen), seen
    assert info.make()(J, **kw | (info.context(J) if info.context else {})).dtype == dtype


# Solvers whose weights are continuous in G (sign- and order-based ones flip on bf16 noise near ties).
_SMOOTH = [Sum, Mean, IMTLG, MGDA, UPGrad, DualProj, CAGrad, NashMTL, AlignedMTL, ConFIG, NSGD]
#: max |Δ .grad| / max |.grad| of bf16 autocast vs float32: 5 bf16 eps (2⁻⁸); observed ≤ 4.3e-3
BF16_TOL = 2e-2


@pytest.mark.parametrize("solver", _SMOOTH, ids=lambda c: c.__name__)
@pytest.mark.parametrize("model_name", ["mlp", "conv", "vae", "hivae"])
def test_bf16_autocast_update_matches_float32(model_name: str, solver: type) -> None:
    model, x = make(model_name)
    model, x = model.float(), x.float()
    amp = copy.deepcopy(model)
    tasks, also, _ = model.losses(x)
    impartial.backward(tasks, shared_params(model), solver=solver(), also=also)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tasks, also, acts = amp.losses(x)
    # the block gradients are bf16 (the VAE's z adds its float32 noise buffer: float32 there, bf16 layers)
    block_dtype = torch.float32 if model_name == "vae" else torch.bfloat16
    assert all(a.dtype == block_dtype for a in acts.values())
    report = impartial.backward(tasks, shared_params(amp), solver=solver(), also=also)
    for b in report.blocks:
        assert b.gram.dtype == torch.float64
        assert b.weights is None or b.weights.dtype == torch.float64
    for q in amp.parameters():
        assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    # over the whole gradient vector: a parameter whose gradient is ~0 (a conv bias before BatchNorm) has
    # no scale of its own
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    got = torch.cat([q.grad.flatten() for q in amp.parameters()])
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= BF16_TOL, f"relative max |Δ .grad| = {err:.3e}"
