"""CAGrad: the ball constraint, non-conflict for c ≥ 1, optimality of the dual, and its special cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from impartial.solvers import MGDA, CAGrad, gram
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
