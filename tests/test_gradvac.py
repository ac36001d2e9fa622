"""GradVac: the coefficient-space rounds equal the paper's loop across calls, and the vaccine hits its target."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_contract import assert_close
from torch import Tensor

from impartial.solvers import GradVac, gram
from impartial.solvers._gradvac import vaccinate
from impartial.solvers._pcgrad import project_conflicts, random_orders
from reference.projection import gradvac_ref
from rows.projection import _CyclicGradVac
from strategies import batched_jacobians, jacobians


def _run_against_loop(J: Tensor, seed: int, beta: float, tol: float) -> None:
    k = J.shape[0]
    solver = GradVac(beta, generator=torch.Generator().manual_seed(seed))
    draws = torch.Generator().manual_seed(seed)
    phi_hat = torch.zeros(k, k, dtype=J.dtype)
    for step in range(3):
        Jt = J * (1.0 + step) if step != 1 else J.flip(-1)  # different gradients, same scale
        expected, phi_hat = gradvac_ref(Jt, random_orders((), k, draws), phi_hat, beta)
        assert_close(solver(Jt), expected, tol, float(J.abs().max()))
        assert_close(solver.state_dict()["phi_hat"], phi_hat, tol, 1.0)


@given(
    J=jacobians(max_k=8, min_d=10, degenerate=False),
    seed=st.integers(0, 2**31 - 1),
    beta=st.sampled_from([1e-2, 0.3, 1.0]),
)
def test_gradvac_equals_the_paper_loop_over_calls_with_the_ema_carried(J: Tensor, seed: int, beta: float) -> None:
    # tasks in general position: no modified gradient cancels, so the Gram form is exact to round-off
    _run_against_loop(J, seed, beta, 1e-10)


@given(J=jacobians(max_k=16), seed=st.integers(0, 2**31 - 1), beta=st.sampled_from([1e-2, 0.3, 1.0]))
def test_gradvac_follows_the_paper_loop_on_degenerate_tasks_to_its_stated_precision(
    J: Tensor, seed: int, beta: float
) -> None:
    # collinear, duplicate, zero tasks and d < k: modified gradients cancel, where a Gram matrix resolves
    # ‖g_i'‖ only to ~√(k·eps) of its bound (see the GradVac docstring)
    _run_against_loop(J, seed, beta, 1e-5)


@given(J=jacobians(min_k=2, max_k=2, min_d=2, degenerate=False), target=st.floats(-0.9, 0.95))
def test_gradvac_raises_the_pair_cosine_exactly_to_its_target(J: Tensor, target: float) -> None:
    G = gram(J)
    phi_hat = torch.full((2, 2), target, dtype=J.dtype)
    orders = torch.tensor([[1], [0]])
    W, _ = vaccinate(G, phi_hat, orders, 0.01)
    new = W @ J

    def cos(a: Tensor, b: Tensor) -> float:  # not torch.cosine_similarity: it floors norms at 1e-8
        return float(a @ b / (a.norm() * b.norm()))

    for i, j in ((0, 1), (1, 0)):
        before, after = cos(J[i], J[j]), cos(new[i], J[j])
        assert after == pytest.approx(max(before, target), abs=1e-9)


@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_gradvac_with_zero_targets_is_pcgrad(J: Tensor, seed: int) -> None:
    k = J.shape[0]
    orders = random_orders((), k, torch.Generator().manual_seed(seed))
    W, _ = vaccinate(gram(J), torch.zeros(k, k, dtype=J.dtype), orders, 0.5)
    assert_close(W.sum(-2) @ J, project_conflicts(gram(J), orders).sum(-2) @ J, 1e-10, float(J.abs().max()))


@given(J=batched_jacobians(max_k=8), seed=st.integers(0, 2**31 - 1))
def test_vaccinate_is_sync_free_under_vmap(J: Tensor, seed: int) -> None:
    B, k = J.shape[:2]
    G = gram(J)
    phi_hat = torch.rand(B, k, k, generator=torch.Generator().manual_seed(seed), dtype=J.dtype) - 0.5
    orders = random_orders((B,), k, torch.Generator().manual_seed(seed))
    W, phi = torch.func.vmap(vaccinate, in_dims=(0, 0, 0, None))(G, phi_hat, orders, 0.1)
    for b in range(B):
        Wb, phib = vaccinate(G[b], phi_hat[b], orders[b], 0.1)
        assert_close(W[b], Wb, 1e-9, 1.0)
        assert_close(phi[b], phib, 1e-9, 1.0)


def test_a_whole_gradvac_run_vmaps_and_equals_one_batched_solver() -> None:
    Js = torch.randn(3, 4, 5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # [T, B, k, d]

    def run(J: Tensor) -> Tensor:  # J [T, k, d]: one solver, T calls
        s = _CyclicGradVac(beta=0.3)
        return torch.stack([s(J[t]) for t in range(J.shape[0])])

    vmapped = torch.func.vmap(run, in_dims=1, out_dims=1)(Js)
    s = _CyclicGradVac(beta=0.3)
    batched = torch.stack([s(Js[t]) for t in range(3)])
    assert torch.allclose(vmapped, batched, rtol=1e-12, atol=1e-14)


def test_gradvac_ema_persists_and_reset_forgets_it() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    s = GradVac(beta=0.5)
    s(J)
    s(J)
    # cos(g1, g2) = -1/√2 at every call (the EMA is measured before each correction)
    assert torch.allclose(s.state_dict()["phi_hat"][0, 1], torch.tensor(-0.75 / 2**0.5, dtype=torch.float64))
    s.reset()
    assert "phi_hat" not in s.state_dict()


def test_gradvac_rejects_a_different_task_count_until_reset() -> None:
    s = GradVac()
    s(torch.randn(3, 4))
    with pytest.raises(ValueError, match="reset"):
        s(torch.randn(4, 4))
    s.reset()
    s(torch.randn(4, 4))
