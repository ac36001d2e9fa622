"""MGDA: the KKT conditions of the min-norm point, minimality against Wolfe's algorithm, the k = 2 closed form."""

from __future__ import annotations

import torch
from hypothesis import example, given

from impartial.solvers import MGDA, _mgda, gram
from impartial.solvers._mgda import _two_tasks
from impartial.solvers._qp import REG, RESIDUAL_TOL
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


_DUPLICATE = (
    torch.randn(2, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    * torch.tensor([[2.0], [0.7]], dtype=torch.float64)
)[[0, 1, 1]]


@given(J=jacobians(min_k=3, max_k=24, min_d=24, max_d=60))
# found by the thorough profile: a duplicate task (prepare cuts a null space); the hull's ridge split the pair
# evenly where the general path did not (same direction): the direct path runs only where nothing is cut
@example(J=_DUPLICATE)
def test_the_direct_hull_answer_equals_the_general_path(J: torch.Tensor) -> None:
    """One problem on the host takes the affine hull's minimiser directly where it is inside the simplex
    (:func:`._mgda._interior_hull`); a batch of one runs :func:`._qp.simplex_qp`.  Same weights (float64),
    same status, residuals at round-off."""
    G = gram(J)
    one, batch = MGDA().solve(G), MGDA().solve(G[None])
    assert torch.allclose(one.weights, batch.weights[0], rtol=0, atol=1e-9)
    assert int(one.status) == int(batch.status[0])
    assert float(one.residual) <= RESIDUAL_TOL and float(batch.residual[0]) <= RESIDUAL_TOL


def test_the_direct_hull_answer_runs_where_the_hull_point_is_inside_and_only_there(monkeypatch) -> None:
    seen: list[bool] = []
    real = _mgda._interior_hull

    def spy(H: torch.Tensor, tol: float):
        out = real(H, tol)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(_mgda, "_interior_hull", spy)
    J = torch.randn(8, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = MGDA().weights(gram(J))  # random directions in 50 dims: the hull point is inside
    J2 = torch.cat([J[:4], J[:1] + 0.1 * J[4:]])  # rows 4.. near row 0: row 0 leaves the support
    w2 = MGDA().weights(gram(J2))
    assert seen == [True, False]
    assert (w > 0).all() and float(w2.min()) == 0.0
    assert torch.allclose(w2, mgda_weights_batched(J2), rtol=0, atol=1e-9)


def mgda_weights_batched(J: torch.Tensor) -> torch.Tensor:
    return MGDA().weights(gram(J)[None])[0]
