"""MGDA: the KKT conditions of the min-norm point, minimality against Wolfe's algorithm, the k = 2 closed form."""

from __future__ import annotations

import torch
from hypothesis import given

from impartial.solvers import MGDA, gram
from impartial.solvers._mgda import _two_tasks
from impartial.solvers._qp import REG
from reference.qp import mgda_ref
from strategies import jacobians

TOL = 1e-8


def _norm2(J: torch.Tensor) -> float:
    return float((J * J).sum(1).max())


@given(J=jacobians())
def test_mgda_kkt_conditions_hold(J: torch.Tensor) -> None:
    """``g_t·d ≥ ‖d‖²`` for every task, with equality on the support ``w_t > 0``; ``w`` on the simplex."""
    w = MGDA().weights(gram(J))
    d = w @ J
    assert (w >= 0).all() and abs(float(w.sum()) - 1) <= 1e-10
    slack = J @ d - d @ d
    scale = _norm2(J)
    assert slack.min() >= -TOL * scale
    assert (slack * w).abs().max() <= TOL * scale


@given(J=jacobians())
def test_mgda_norm_is_minimal(J: torch.Tensor) -> None:
    # Where 0 lies on the hull's boundary (e.g. an exactly antiparallel pair) the ridge δ = REG of _qp.prepare
    # moves the min-norm point by O(√δ) relative to the largest gradient (see the _qp module docstring).
    d, ref = MGDA()(J), mgda_ref(J)
    assert float(d.norm()) <= float(ref.norm()) + REG**0.5 * _norm2(J) ** 0.5


@given(J=jacobians(min_k=2, max_k=2))
def test_mgda_two_task_closed_form_equals_general_solver(J: torch.Tensor) -> None:
    from impartial.solvers._qp import prepare, simplex_qp

    G = gram(J)
    w_qp = simplex_qp(prepare(G)[0], torch.zeros(1, 2, dtype=G.dtype))[0]
    assert ((_two_tasks(G) - w_qp) @ J).abs().max() <= TOL * _norm2(J) ** 0.5


def test_mgda_is_accurate_at_k40_where_projected_descent_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(40, 30, generator=gen, dtype=torch.float64) + 0.3
    d, ref = MGDA()(J), mgda_ref(J)
    assert (d - ref).norm() <= 1e-9 * ref.norm()


def test_mgda_handles_huge_and_tiny_gradient_norms() -> None:
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    d = MGDA()(J)
    for c in (1e-10, 1e4, 1e15):
        assert torch.allclose(MGDA()(c * J), c * d, rtol=1e-9, atol=0)


def test_mgda_pareto_stationary_gives_zero() -> None:
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    for J in (torch.stack([g, -g, 2 * g]), torch.stack([g, torch.zeros(3, dtype=torch.float64), -g])):
        assert MGDA()(J).abs().max() <= 1e-10  # O(δ): the 1e-12 perturbation of _qp


def test_mgda_pinned_value() -> None:
    J = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # min-norm point of the hull of e₁·2, e₂, 1: w ∝ (1/4, 1, 0) -> (0.2, 0.8, 0), d = (0.4, 0.8, 0)
    assert torch.allclose(MGDA()(J), torch.tensor([0.4, 0.8, 0.0], dtype=torch.float64), atol=1e-12)


def test_mgda_rejects_negative_iters() -> None:
    import pytest

    with pytest.raises(ValueError, match="iters"):
        MGDA(iters=-1)
