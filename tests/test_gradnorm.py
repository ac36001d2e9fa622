"""GradNorm and NSGD: multi-call runs equal the papers' loops; the weights balance norms; state and vmap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_contract import assert_close
from torch import Tensor

from impartial.solvers import NSGD, GradNorm, gram
from reference.projection import gradnorm_ref, nsgd_ref
from strategies import jacobians


def _sequence(J: Tensor, T: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """T task-gradient matrices and positive losses drifting from J (rows rescaled each call)."""
    gen = torch.Generator().manual_seed(seed)
    Js = [J * torch.exp(torch.randn(J.shape[0], 1, generator=gen, dtype=J.dtype)) for _ in range(T)]
    losses = [torch.rand(J.shape[0], generator=gen, dtype=J.dtype) + 0.1 for _ in range(T)]
    return Js, losses


@given(
    J=jacobians(max_k=12, degenerate=False),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([0.0, 0.5, 1.5]),
    progress=st.sampled_from(["loss", "grad"]),
)
def test_gradnorm_equals_the_paper_loop_over_calls(J: Tensor, seed: int, alpha: float, progress: str) -> None:
    Js, losses = _sequence(J, 6, seed)
    s = GradNorm(alpha, lr=0.1, progress=progress, reference_step=2)
    expected = gradnorm_ref(Js, losses, alpha, 0.1, progress, 2)
    for Jt, Lt, e in zip(Js, losses, expected):
        assert_close(s(Jt, losses=Lt), e, 1e-9, float(Jt.abs().max()))


@given(J=jacobians(max_k=12, degenerate=False), seed=st.integers(0, 2**31 - 1))
def test_nsgd_equals_the_torchmoo_loop_across_its_reference_step(J: Tensor, seed: int) -> None:
    Js, _ = _sequence(J, 5, seed)
    s = NSGD(reference_step=2)
    for Jt, e in zip(Js, nsgd_ref(Js, reference_step=2)):
        assert_close(s(Jt), e, 1e-9, float(Jt.abs().max()))


@given(J=jacobians(min_k=2, max_k=6, min_d=6, degenerate=False))
def test_gradnorm_with_alpha_zero_balances_the_weighted_gradient_norms(J: Tensor) -> None:
    s = GradNorm(alpha=0.0, lr=0.05)
    G = gram(J)
    for _ in range(400):
        w = s.weights(G)
    weighted = w * G.diagonal().sqrt()
    # sign steps of about lr on every log w_i leave an oscillation of that order around the balance
    assert float(weighted.max() / weighted.min()) < 1 + 6 * 0.05
    assert float(w.sum()) == pytest.approx(J.shape[0]) and (w > 0).all()


@given(
    J=jacobians(max_k=8, degenerate=False), c=st.sampled_from([1e-8, 1e-3, 1e4, 1e12]), seed=st.integers(0, 2**31 - 1)
)
def test_gradnorm_and_nsgd_weights_are_scale_free_over_calls(J: Tensor, c: float, seed: int) -> None:
    Js, losses = _sequence(J, 4, seed)
    for make in (lambda: GradNorm(lr=0.1), lambda: GradNorm(progress="grad", reference_step=1), NSGD):
        a, b = make(), make()
        for Jt, Lt in zip(Js, losses):
            wa, wb = a.weights(gram(Jt), losses=Lt), b.weights(gram(c * Jt), losses=Lt)
            assert_close(wb, wa, 1e-9, 1.0)


def test_nsgd_gives_every_task_the_same_length() -> None:
    J = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    new = NSGD().apply(J)
    assert torch.allclose(new.norm(dim=-1), new.norm(dim=-1)[0].expand(3))


def test_gradnorm_needs_losses_unless_alpha_is_zero() -> None:
    J = torch.randn(3, 5)
    with pytest.raises(ValueError, match="losses"):
        GradNorm()(J)
    GradNorm(alpha=0.0)(J)
    GradNorm(progress="grad")(J)
    with pytest.raises(ValueError, match="shape"):
        GradNorm()(J, losses=torch.ones(4))


def test_gradnorm_rejects_a_different_task_count_until_reset() -> None:
    s = GradNorm(progress="grad")
    s(torch.randn(3, 4))
    with pytest.raises(ValueError, match="reset"):
        s(torch.randn(4, 4))
    s.reset()
    s(torch.randn(4, 4))


def test_a_whole_stateful_run_vmaps_and_equals_one_batched_solver() -> None:
    gen = torch.Generator().manual_seed(0)
    Js = torch.randn(5, 3, 4, 7, generator=gen, dtype=torch.float64)  # [T, B, k, d]
    Ls = torch.rand(5, 3, 4, generator=gen, dtype=torch.float64) + 0.1
    for make in (lambda: GradNorm(lr=0.1, reference_step=1), lambda: NSGD(reference_step=2)):

        def run(J: Tensor, L: Tensor) -> Tensor:  # one solver, T calls
            s = make()  # noqa: B023 -- run() is called within this iteration
            return torch.stack([s(J[t], losses=L[t]) for t in range(J.shape[0])])

        vmapped = torch.func.vmap(run, in_dims=(1, 1), out_dims=1)(Js, Ls)
        s = make()
        batched = torch.stack([s(Js[t], losses=Ls[t]) for t in range(5)])
        assert torch.allclose(vmapped, batched, rtol=1e-12, atol=1e-14)


def test_compiled_gradnorm_follows_the_eager_run_as_its_state_advances() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    Js = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    Ls = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.1
    eager, compiled = GradNorm(lr=0.1, reference_step=1), GradNorm(lr=0.1, reference_step=1)
    step = torch.compile(compiled.__call__, fullgraph=True, backend="eager")
    for J, L in zip(Js, Ls):
        assert torch.allclose(step(J, losses=L), eager(J, losses=L), rtol=1e-12, atol=1e-14)
