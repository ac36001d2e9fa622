"""UPGrad and DualProj: the KKT conditions of every projection QP, and non-conflict."""

from __future__ import annotations

import torch
from hypothesis import given

from impartial.solvers import DualProj, UPGrad, _upgrad, gram
from impartial.solvers._upgrad import project_weights
from strategies import jacobians

TOL = 1e-6  # √δ: see tests/rows/qp.py


def _scale2(J: torch.Tensor) -> float:
    return max(float((J * J).sum(1).max()), 1e-300)


@given(J=jacobians())
def test_upgrad_projection_kkt_conditions_hold(J: torch.Tensor) -> None:
    """For ``v_i = argmin_{v ≥ e_i} vᵀGv``: ``v ≥ e_i``, ``G v ≥ 0`` and ``(G v)_j (v_j − δ_ij) = 0``.

    (Stationarity ``2Gv = λ`` with multipliers ``λ ≥ 0`` of ``v ≥ u`` and complementary slackness.)
    """
    G = gram(J)
    k = G.shape[0]
    U = torch.eye(k, dtype=G.dtype)
    V = project_weights(G, U)
    GV = V @ G
    s = _scale2(J)
    assert (V - U).min() >= 0
    assert GV.min() >= -TOL * s * (1 + float(V.abs().max()))
    assert (GV * (V - U)).abs().max() <= TOL * s * (1 + float(V.abs().max())) ** 2


@given(J=jacobians())
def test_upgrad_is_non_conflicting(J: torch.Tensor) -> None:
    d = UPGrad()(J)
    assert (J @ d).min() >= -TOL * _scale2(J)


@given(J=jacobians())
def test_dualproj_is_non_conflicting_and_the_projection_of_the_mean(J: torch.Tensor) -> None:
    d = DualProj()(J)
    s = _scale2(J)
    assert (J @ d).min() >= -TOL * s
    # projection onto a cone: (ḡ − d) ⟂ d and ‖d‖ ≤ ‖ḡ‖
    g = J.mean(0)
    assert abs(float((g - d) @ d)) <= TOL * s
    assert float(d.norm()) <= float(g.norm()) * (1 + 1e-9) + TOL * s**0.5


@given(J=jacobians(degenerate=False))
def test_upgrad_is_the_mean_when_no_task_conflicts(J: torch.Tensor) -> None:
    J = J.abs()  # nonnegative entries: all inner products ≥ 0, every g_i is in the dual cone
    assert torch.allclose(UPGrad()(J), J.mean(0), rtol=1e-9, atol=1e-9 * float(J.abs().max()))
    assert torch.allclose(DualProj()(J), J.mean(0), rtol=1e-9, atol=1e-9 * float(J.abs().max()))


def test_upgrad_pinned_value() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # π(g₁) = (½, ½) (onto x₂ ≥ x₁), π(g₂) = (0, 1) (onto x₁ ≥ 0)
    assert torch.allclose(UPGrad()(J), torch.tensor([0.25, 0.75], dtype=torch.float64), atol=1e-12)


def test_weights_equal_torchjd_upgrad_and_dualproj() -> None:
    torchjd = __import__("pytest").importorskip("torchjd.aggregation")
    J = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for ours, theirs in ((UPGrad(), torchjd.UPGrad()), (DualProj(), torchjd.DualProj())):
        try:
            expected = theirs(J)
        except ImportError:  # TorchJD's optional quadprog extra is missing
            __import__("pytest").skip("torchjd QP extra not installed")
        # TorchJD regularises and normalises G before its QP (reg_eps = 1e-4): agreement to ~1e-3 only
        assert torch.allclose(ours(J), expected, atol=1e-3)


@given(J=jacobians(min_k=2, max_k=24, min_d=24, max_d=60))
def test_the_no_conflict_answer_equals_the_general_path(J: torch.Tensor) -> None:
    """One problem on the host returns ``mean(U)`` directly where no projection moves (``Hu ≥ 0``, nothing cut);
    a batch of one runs the QPs.  Same weights and status (float64)."""
    for solver in (UPGrad(), DualProj()):
        G = gram(J)
        one, batch = solver.solve(G), solver.solve(G[None])
        assert torch.allclose(one.weights, batch.weights[0], rtol=0, atol=1e-9)
        assert int(one.status) == int(batch.status[0])


def test_the_no_conflict_answer_runs_where_no_task_conflicts_and_only_there(monkeypatch) -> None:
    seen: list[bool] = []
    real = _upgrad._no_conflict
    monkeypatch.setattr(_upgrad, "_no_conflict", lambda *a: seen.append(real(*a) is not None) or real(*a))
    gen = torch.Generator().manual_seed(0)
    J = torch.rand(6, 40, dtype=torch.float64, generator=gen)  # nonnegative entries: every pair agrees
    assert torch.equal(UPGrad().weights(gram(J)), torch.full((6,), 1 / 6, dtype=torch.float64))
    J[0] = 0.1 * J[0] - J[1]  # a pair in conflict (J still of full rank): their projections move
    w = UPGrad().weights(gram(J))
    assert seen == [True, False] and torch.allclose(w, UPGrad().weights(gram(J)[None])[0], rtol=0, atol=1e-12)


def test_no_warning_when_J_requires_grad() -> None:
    """Host reads of values use ``.item()``/``.tolist()``: ``float()`` of a tensor that requires grad warns."""
    import warnings

    for solver in (UPGrad(), DualProj()):
        for shape in ((12, 50), (1, 4, 16), (70, 2000)):
            J = torch.randn(*shape, requires_grad=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                solver(J).sum().backward()


@given(J=jacobians(min_k=2, max_k=2))
def test_two_tasks_in_closed_form_equal_the_active_set(J: torch.Tensor) -> None:
    """k = 2: UPGrad and DualProj in closed form (each conflicting task's partner weight rises until its multiplier
    is 0) against the box QPs solved by active-set iterations from 0 on the same prepared ``H``, batched too."""
    from impartial.solvers._qp import min_norm, nonneg_qp, prepare

    G = gram(J)
    p = prepare(G, torch.float64)
    for solver, U in ((UPGrad(), None), (DualProj(), torch.full((1, 2), 0.5, dtype=torch.float64))):
        x, _ = nonneg_qp(p.H, p.H if U is None else U @ p.H, 50)
        ref = min_norm(((torch.eye(2, dtype=J.dtype) if U is None else U) + x).mean(-2), p)
        one, batch = solver.solve(G), solver.solve(G.expand(3, 2, 2))
        assert torch.allclose(one.weights, ref, rtol=0, atol=1e-9)
        assert torch.allclose(batch.weights, ref.expand(3, 2), rtol=0, atol=1e-9)
        assert float(one.residual) == 0.0 and int(one.status) == int(batch.status[0])


def test_a_subclass_with_other_preferences_takes_the_qps_at_two_tasks() -> None:
    """The k = 2 closed form holds for nonnegative preference rows only; other preferences solve the box QPs."""

    class Signed(DualProj):
        def _preferences(self, G: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, -0.5]], dtype=G.dtype).expand(*G.shape[:-2], 1, 2)

    J = torch.tensor([[1.0, 0.0], [2.5, 2.75**0.5]], dtype=torch.float64)  # c = Hu < 0 in both entries
    G = gram(J)
    V = project_weights(G, torch.tensor([[1.0, -0.5]], dtype=torch.float64))
    assert torch.allclose(Signed().weights(G), V.mean(-2), rtol=0, atol=1e-12)
