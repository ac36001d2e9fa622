"""CAGrad: the ball constraint, non-conflict for c ≥ 1, optimality of the dual, and its special cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from impartial.solvers import MGDA, CAGrad, Status, _cagrad, gram
from impartial.solvers._qp import RESIDUAL_TOL
from reference.qp import cagrad_ref
from strategies import jacobians

TOL = 1e-8


@given(J=jacobians(degenerate=False), c=st.sampled_from([0.1, 0.4, 0.9, 1.0, 3.0]))
def test_cagrad_direction_is_on_the_ball_around_the_mean(J: torch.Tensor, c: float) -> None:
    """``‖d − g₀‖ = c‖g₀‖`` (before any rescale; this solver applies none).

    Holds when ``g_w ≠ 0`` at the optimum, which is sure when 0 is outside the hull of the gradients.
    """
    # 0 in the hull (likely when k > d): g_w can vanish at the optimum, d is not unique and may lie inside
    assume(_zero_outside_hull(J))
    g0 = J.mean(0)
    d = CAGrad(c=c)(J)
    assert abs(float((d - g0).norm()) - c * float(g0.norm())) <= 1e-8 * float(J.abs().max()) * (1 + c)


@given(J=jacobians(), c=st.sampled_from([0.1, 0.4, 1.0, 3.0]))
def test_cagrad_direction_stays_in_the_ball(J: torch.Tensor, c: float) -> None:
    g0 = J.mean(0)
    d = CAGrad(c=c)(J)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9) + 1e-6 * float(J.abs().max())


def _zero_outside_hull(J: torch.Tensor) -> bool:
    """0 well outside the hull of the gradients: then ``g_w ≠ 0`` at the optimum and ``d`` is unique."""
    return float(MGDA()(J).norm()) > 1e-3 * float(J.norm(dim=1).max())


@given(J=jacobians(), c=st.sampled_from([1.0, 1.5, 4.0]))
def test_cagrad_is_non_conflicting_for_c_at_least_one(J: torch.Tensor, c: float) -> None:
    d = CAGrad(c=c)(J)
    # 1e-8 when d is unique; 1e-4 when 0 is in the hull (the √δ-level selection, see rows/qp.py)
    tol = 1e-8 if _zero_outside_hull(J) else 1e-4
    assert (J @ d).min() >= -tol * float((J * J).sum(1).max())


@given(J=jacobians(max_k=24))
def test_cagrad_matches_reference_where_the_direction_is_unique(J: torch.Tensor) -> None:
    assume(_zero_outside_hull(J))
    assert (CAGrad()(J) - cagrad_ref(J)).abs().max() <= 1e-8 * float(J.abs().max())


@given(J=jacobians(degenerate=False), c=st.sampled_from([0.2, 0.4, 0.8]))
def test_cagrad_maximises_the_worst_improvement_in_the_ball(J: torch.Tensor, c: float) -> None:
    """Primal optimality: no point of the ball improves ``min_i g_i·d`` (checked against random ball points
    and the dual value, equal by strong duality)."""
    assume(_zero_outside_hull(J))
    g0 = J.mean(0)
    r = c * float(g0.norm())
    d = CAGrad(c=c)(J)
    best = float((J @ d).min())
    w = CAGrad(c=c).weights(gram(J)) - 1 / J.shape[0]  # ∝ the dual minimiser
    w = w / w.sum() if float(w.sum()) > 0 else w
    dual = float(w @ (J @ g0)) + r * float((w @ J).norm())
    scale = float((J * J).sum(1).max())
    assert abs(best - dual) <= 1e-7 * scale
    u = torch.randn(64, J.shape[1], generator=torch.Generator().manual_seed(0), dtype=J.dtype)
    others = g0 + r * u / u.norm(dim=1, keepdim=True)
    assert float((others @ J.T).min(1).values.max()) <= best + 1e-9 * scale


def test_cagrad_c0_is_the_mean_and_large_c_approaches_mgda() -> None:
    J = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(CAGrad(c=0.0)(J), J.mean(0))
    d = CAGrad(c=1e6)(J)
    m = MGDA()(J)
    assert torch.allclose(d / d.norm(), m / m.norm(), atol=1e-5)


def test_cagrad_rejects_negative_c() -> None:
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-0.1)


@given(J=jacobians(min_k=3, max_k=24, min_d=24, max_d=60), c=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
def test_the_direct_interior_answer_equals_the_general_path(J: torch.Tensor, c: float) -> None:
    """One problem on the host takes the whole simplex's stationary point directly where it is inside
    (:func:`._cagrad._interior`); a batch of one runs :func:`._cagrad.cagrad_dual`.  Same weights (float64,
    relative to their size), same status, residuals at round-off."""
    G = gram(J)
    one, batch = CAGrad(c=c).solve(G), CAGrad(c=c).solve(G[None])
    scale = float(batch.weights.abs().max().clamp(min=1.0))
    assert torch.allclose(one.weights, batch.weights[0], rtol=0, atol=1e-9 * scale)
    assert int(one.status) == int(batch.status[0])
    if int(one.status) != int(Status.NOT_CONVERGED):  # the class of the test below: both paths say so
        assert float(one.residual) <= RESIDUAL_TOL and float(batch.residual[0]) <= RESIDUAL_TOL


def test_an_antiparallel_pair_below_c_is_not_converged_never_ok() -> None:
    """Found by the thorough profile: tasks ``a, −a, b`` (and a zero task) with ``|cos(a, b)| < c < 1``.  The
    primal maximisers are the whole disk ``{‖d − g₀‖ ≤ c‖g₀‖, a·d = 0, b·d ≥ 0}`` (worst improvement 0), the dual
    minimum sits at ``g_w = 0`` where ``d = g₀ + (c‖g₀‖/‖g_w‖) g_w`` is undefined, and the iterations run off
    along it: the status says NOT_CONVERGED (finite weights, the last iterate), never OK.  Where ``|cos| > c``
    the answer is unique and OK."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 24, generator=gen, dtype=torch.float64)
    b = b - (a @ b) / (a @ a) * a * 0.8  # |cos(a, b)| well below 0.5
    for rows in ([a, -a, b], [a, -a, torch.zeros_like(a), b]):
        sol = CAGrad(c=0.5).solve(gram(torch.stack(rows)))
        assert int(sol.status) == int(Status.NOT_CONVERGED) and bool(sol.weights.isfinite().all())
    b2 = b + 3.0 * a  # |cos(a, b2)| > 0.5: the hyperplane a·d = 0 misses the ball, one answer
    sol = CAGrad(c=0.5).solve(gram(torch.stack([a, -a, b2])))
    assert int(sol.status) == int(Status.OK) and float(sol.residual) <= RESIDUAL_TOL


def test_the_direct_interior_answer_runs_where_the_stationary_point_is_inside_and_only_there(monkeypatch) -> None:
    seen: list[bool] = []
    real = _cagrad._interior

    def spy(H: torch.Tensor, c: float, tol: float):
        out = real(H, c, tol)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(_cagrad, "_interior", spy)
    J = torch.randn(16, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # inside at c = 0.5
    w = CAGrad(c=0.5).weights(gram(J))
    J2 = torch.cat([J[:8], J[:1] + 0.05 * J[8:]])  # half the rows near row 0: the stationary point leaves the simplex
    w2 = CAGrad(c=0.5).weights(gram(J2))
    assert seen == [True, False]
    assert torch.allclose(w, CAGrad(c=0.5).weights(gram(J)[None])[0], rtol=0, atol=1e-9)
    assert torch.allclose(w2, CAGrad(c=0.5).weights(gram(J2)[None])[0], rtol=0, atol=1e-9)
