"""The shared QP machinery: each problem's KKT conditions, on both schedules (host-driven on the CPU, fixed and
sync-free elsewhere), on Gram matrices with the structure that breaks solvers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from impartial.solvers import _qp_host
from impartial.solvers._qp import REG, RESIDUAL_TOL, cutoff, nonneg_qp, prepare, simplex_qp
from impartial.solvers._qp_faces import IPM_K, default_iters, enumerates, masked_solve
from impartial.solvers._qp_host import COMPACT_K, compact_solve, on_host, projected_gradient
from strategies import build, jacobians

KKT_TOL = 1e-9  # relative to the normalised Gram matrix (max diagonal 1)
PATHS = [pytest.param(True, id="host"), pytest.param(False, id="fixed")]


def _directions_close(X: torch.Tensor, Y: torch.Tensor, Jn: torch.Tensor, tol: float) -> None:
    """Weights compared as directions ``xᵀJ`` (normalised ``J``): where ``k > d`` the weights have directions
    of curvature δ that different methods (and BLAS kernels) resolve differently; the directions agree."""
    err = float(((X - Y) @ Jn).abs().max())
    assert err <= tol, f"directions differ by {err:.3e} > {tol:.1e}"


@given(J=jacobians(max_k=32))
def test_prepare_is_psd_normalised_scale_free_and_the_same_on_both_paths(J: torch.Tensor) -> None:
    G = J @ J.T
    p = prepare(G)
    D = p.H.diagonal().sqrt()
    assert torch.linalg.eigvalsh(p.H / (D[:, None] * D[None, :])).min() >= REG / 2  # δ relative to each task
    expected = G / p.s if float(p.s) > 0 else G
    assert (p.H - expected).abs().max() <= 1e-10
    assert (prepare(1e6 * G).H - p.H).abs().max() <= 1e-10
    host = prepare(G, host=True)
    assert (host.H - p.H).abs().max() <= 1e-12 and host.null is None or host.null is not None
    if host.null is None:  # the host path skipped the eigendecomposition: nothing was under the cut-off
        assert float(p.null.abs().max()) == 0.0
        assert torch.allclose(host.s, p.s, rtol=1e-15, atol=0)


def test_cutoff_follows_the_precision_of_the_input() -> None:
    assert cutoff(torch.float32, 16) == cutoff(torch.bfloat16, 16) > 1e6 * cutoff(torch.float64, 16)


@pytest.mark.parametrize("host", PATHS)
@given(J=jacobians(max_k=32), m=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
# found by the thorough profile: a zero gradient (curvature δ alone) whose multiplier, 1e-15, is 6e-9 in its own
# units; enumeration picked the face by objective, which that changes by 2e-17 (below round-off): residual 2.2e-9
@example(J=build(6, 1, 0, edits=[("zero", 5, 0, 1.0)]), m=3, seed=3392)
def test_nonneg_qp_kkt_conditions_hold(host: bool, J: torch.Tensor, m: int, seed: int) -> None:
    """x ≥ 0, λ = Hx + c ≥ 0, λ ⊙ x = 0: the KKT conditions of min ½xᵀHx + cᵀx over x ≥ 0.

    ``c = H u`` (the dual-cone projection of ``Jᵀu``, any signs): a bounded problem even for singular ``H``.
    """
    H = prepare(J @ J.T, host=host).H
    u = torch.randn(m, J.shape[0], generator=torch.Generator().manual_seed(seed), dtype=H.dtype)
    c = u @ H
    x, r = nonneg_qp(H, c, host=host)
    assert (x >= 0).all()
    # the host schedule runs until every problem is solved; the fixed one must say where it is not
    ok = r <= RESIDUAL_TOL
    assert ok.all() or not host, r
    for xi, ci in zip(x[ok], c[ok]):
        lam = xi @ H + ci
        assert lam.min() >= -KKT_TOL * (1 + ci.abs().max())
        assert (lam * xi).abs().max() <= KKT_TOL * (1 + ci.abs().max()) * (1 + xi.abs().max())


@pytest.mark.parametrize("host", PATHS)
@given(J=jacobians(max_k=32))
# found by the thorough profile: an antiparallel pair and a zero row at 1e-10; clamping the enumerated face
# minimiser's round-off negatives (−1.3e-12 in all) left its sum 1 + 1.3e-12
@example(J=build(10, 7, 3214, spread=True, edits=[("zero", 0, 0, 1.0), ("antiparallel", 0, 1, 1.0)], scale=-10))
def test_simplex_qp_kkt_conditions_hold(host: bool, J: torch.Tensor) -> None:
    """x ∈ Δ, Hx ≥ xᵀHx componentwise, with equality on the support (min-norm point of the hull)."""
    H = prepare(J @ J.T, host=host).H
    x, r = simplex_qp(H, torch.zeros(1, J.shape[0], dtype=H.dtype), host=host)
    x = x[0]
    assert (x >= 0).all() and abs(float(x.sum()) - 1) <= 1e-12
    # the host schedule runs until the problem is solved; the fixed one must say where it is not
    assert float(r) <= RESIDUAL_TOL or not host, r
    if float(r) <= RESIDUAL_TOL:
        Hx = H @ x
        gap = Hx - x @ Hx
        assert gap.min() >= -KKT_TOL
        assert (gap * x).abs().max() <= KKT_TOL


@given(J=jacobians(max_k=40), seed=st.integers(0, 2**31 - 1))
# found by the thorough profile: a zero row (0 is a vertex of the hull); the fixed schedule stops at that vertex
# (gap δ = 1e-12, multipliers −δ above the entry threshold), the host goes on to 0.9δ: 1.74e-7 apart
@example(J=build(21, 9, 0, spread=True, edits=[("zero", 0, 0, 1.0)]), seed=0)
def test_host_and_fixed_schedules_give_the_same_answer(J: torch.Tensor, seed: int) -> None:
    """Projected gradient + active set (host) against enumeration / active set / interior point (fixed).

    The simplex answers are compared within what their duality gaps allow: for the min-norm point ``d*`` of the
    (ridge-perturbed) hull and any ``x`` of the simplex, ``‖xᵀJ̃ − d*‖² ≤ 2 gap(x)`` with
    ``gap(x) = xᵀHx − minᵢ (Hx)ᵢ``, and the active set accepts gaps up to its entry threshold (1e-11), so where
    the hull is degenerate the two may differ by ``√(2δ) = 1.4e-6`` (1.74e-7 measured on the example).
    """
    k = J.shape[0]
    p = prepare(J @ J.T)
    Jn = J / p.s.sqrt()
    c = torch.randn(3, k, generator=torch.Generator().manual_seed(seed), dtype=J.dtype) @ p.H
    _directions_close(nonneg_qp(p.H, c, host=True)[0], nonneg_qp(p.H, c, host=False)[0], Jn, 1e-7)
    z = torch.zeros(1, k, dtype=J.dtype)
    xh, xf = simplex_qp(p.H, z, host=True)[0], simplex_qp(p.H, z, host=False)[0]
    _directions_close(xh, xf, Jn, 1e-7 + _gap_bound(p.H, xh) + _gap_bound(p.H, xf))


def test_the_host_enumerates_up_to_nine_tasks_and_agrees_with_the_enumeration_at_ten() -> None:
    """From k = 10 the host schedule runs its active set where the fixed one still enumerates all faces of one
    problem; the box, simplex and CAGrad answers agree (directions, float64), on conflicting and on random J."""
    from impartial.solvers._cagrad import cagrad_dual

    assert enumerates(9, 1, None, host=True) and not enumerates(10, 1, None, host=True)
    assert enumerates(10, 1, None) and enumerates(8, 8, None, host=True) and not enumerates(9, 9, None)
    gen = torch.Generator().manual_seed(10)
    for d in (6, 20, 300):
        J = torch.randn(10, d, generator=gen, dtype=torch.float64)
        J[0] = -2.0 * J[1:].sum(0) / 9  # the mean conflicts with task 0
        p = prepare(J @ J.T)
        Jn = J / p.s.sqrt()
        c = torch.full((1, 10), 0.1, dtype=J.dtype) @ p.H
        _directions_close(nonneg_qp(p.H, c, host=True)[0], nonneg_qp(p.H, c, host=False)[0], Jn, 1e-7)
        z = torch.zeros(1, 10, dtype=J.dtype)
        xh, xf = simplex_qp(p.H, z, host=True)[0], simplex_qp(p.H, z, host=False)[0]
        _directions_close(xh, xf, Jn, 1e-7 + _gap_bound(p.H, xh) + _gap_bound(p.H, xf))
        wh, wf = cagrad_dual(p.H, 0.5, None, True)[0], cagrad_dual(p.H, 0.5, None, False)[0]
        _directions_close(wh.unsqueeze(0), wf.unsqueeze(0), Jn, 1e-7)


def _gap_bound(H: torch.Tensor, x: torch.Tensor) -> float:
    """``√(2 gap(x))`` for one simplex point ``x`` ``[1, k]``: how far its direction can be from the min-norm point."""
    Hx = x @ H
    return (2 * max(float((Hx * x).sum() - Hx.min()), 0.0)) ** 0.5


def test_projected_gradient_gives_up_where_it_stalls_and_the_active_set_finishes() -> None:
    """Strongly correlated tasks (κ ≈ 1e3): projected gradient stops short of its tolerance, and the active set
    takes those problems to the exact answer."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(32, 1, generator=gen, dtype=torch.float64) * torch.randn(1, 300, generator=gen, dtype=torch.float64)
    J = J + 0.03 * torch.randn(32, 300, generator=gen, dtype=torch.float64)
    H = prepare(J @ J.T).H
    x, r = projected_gradient(H, H, 500, 1e-12)
    assert float(r.max()) > 1e-12  # projected gradient alone did not make it
    xs, rs = nonneg_qp(H, H, host=True)
    xl, _ = nonneg_qp(H, H, 3 * default_iters(32), host=False)
    assert float(rs.max()) <= 1e-12
    _directions_close(xs, xl, J / J.norm(dim=1).max(), 1e-10)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("size", [0, 1, 9, 20])
def test_compact_solve_equals_the_masked_solve(size: int, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Free sets of every size up to ``size`` (an empty one, a full one): the gathered solve on the largest free
    set gives the masked solve's face minimisers, zero off each free set, whole or in chunks of problems."""
    if chunked:
        monkeypatch.setattr(_qp_host, "CHUNK", 2 * 20 * max(size, 1))  # two problems a chunk
    gen = torch.Generator().manual_seed(size)
    k = 20
    J = torch.randn(k, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 30, generator=gen, dtype=torch.float64)
    H = prepare(J @ J.T).H  # rank 6: the face systems are as ill-conditioned as prepare leaves them
    free = torch.rand(7, k, generator=gen) < torch.linspace(0, 1, 7).unsqueeze(-1)
    free[:, size:] = False
    free[-1, :size] = True
    rhs = H @ torch.randn(7, k, 2, generator=gen, dtype=torch.float64)  # c = Hu, as the solvers' are
    X = compact_solve(H, free, rhs)
    assert bool((X[~free] == 0).all())
    _directions_close(X.mT, masked_solve(H, free, rhs).mT, J / J.norm(dim=1).max(), 1e-7)


def test_host_active_set_on_compact_faces_matches_the_fixed_schedule() -> None:
    """Correlated tasks at ``k ≥ COMPACT_K`` (per-sample-like: many agree): projected gradient hands them to the
    active set, which solves its faces by :func:`compact_solve`; the fixed schedule's answer is the same."""
    gen = torch.Generator().manual_seed(1)
    k = COMPACT_K + 8
    J = torch.randn(k, 1, generator=gen, dtype=torch.float64) * torch.randn(1, 500, generator=gen, dtype=torch.float64)
    J = J + 0.1 * torch.randn(k, 500, generator=gen, dtype=torch.float64)
    H = prepare(J @ J.T).H
    assert float(projected_gradient(H, H, 500, 1e-12)[1].max()) > 1e-12  # the active set has work to do
    xs, rs = nonneg_qp(H, H, host=True)
    xf, _ = nonneg_qp(H, H, 3 * default_iters(k), host=False)
    assert float(rs.max()) <= 1e-12
    _directions_close(xs, xf, J / J.norm(dim=1).max(), 1e-9)


@pytest.mark.parametrize("host", PATHS)
def test_batched_problems_equal_one_at_a_time(host: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    p = prepare(J @ J.mT, host=host)
    Jn = J / p.s.sqrt()[:, None, None]
    c = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64) @ p.H
    X = nonneg_qp(p.H, c, host=host)[0]
    for b in range(3):
        _directions_close(X[b], nonneg_qp(p.H[b], c[b], host=host)[0], Jn[b], 1e-10 if host else 1e-12)


@pytest.mark.parametrize("host", PATHS)
@pytest.mark.parametrize("k", [5, 12, IPM_K + 6])
@pytest.mark.parametrize("d", [3, 40])
def test_each_method_agrees_with_a_long_active_set_batched(host: bool, k: int, d: int) -> None:
    """Enumeration (k = 5), the active set (k = 12) and the interior point + polish or projected gradient
    (k ≥ IPM_K), on a batch of 3 Gram matrices with 2 problems each (batch ≠ problems), equal one at a time
    and agree with 3× the default active-set iterations (directions, relative to the normalised gradients)."""
    assert enumerates(5, 2, None) and not enumerates(12, 2, None) and not enumerates(IPM_K + 6, 1, None)
    gen = torch.Generator().manual_seed(k + d)
    J = torch.randn(3, k, d, generator=gen, dtype=torch.float64)
    J = J * torch.exp(torch.empty(3, k, 1, dtype=J.dtype).uniform_(-3, 3, generator=gen))
    J[1, 0] = 0.0
    J[2, 1] = -J[2, 2]
    p = prepare(J @ J.mT, host=host)
    H, Jn = p.H, J / p.s.sqrt()[:, None, None]
    c = torch.randn(3, 2, k, generator=gen, dtype=J.dtype) @ H
    z = torch.zeros(3, 1, k, dtype=J.dtype)
    for X, R in [
        (nonneg_qp(H, c, host=host)[0], nonneg_qp(H, c, 3 * default_iters(k), host=False)[0]),
        (simplex_qp(H, z, host=host)[0], simplex_qp(H, z, 3 * default_iters(k), host=False)[0]),
    ]:
        _directions_close(X, R, Jn, 1e-8)
    # the host's projected gradient stops at a residual of 1e-12, not at a face minimiser: 1e-10 there
    for b in range(3):
        _directions_close(
            nonneg_qp(H, c, host=host)[0][b], nonneg_qp(H[b], c[b], host=host)[0], Jn[b], 1e-10 if host else 1e-12
        )


def test_simplex_host_takes_the_hull_point_where_feasible_and_the_active_set_elsewhere() -> None:
    """A batch of two: near-orthogonal tasks (the affine hull's minimiser is ≥ 0, hence optimal) and tasks
    where it is not (one row shared by the others: weights 0 there); both equal the fixed schedule's answer."""
    gen = torch.Generator().manual_seed(9)
    J = torch.randn(2, 20, 400, generator=gen, dtype=torch.float64)
    J[1, 1:] += 3 * J[1, :1]  # every other task has g₀'s component: the min-norm point drops some of them
    p = prepare(J @ J.mT, host=True)
    z = torch.zeros(2, 1, 20, dtype=J.dtype)
    x, r = simplex_qp(p.H, z, host=True)
    assert (x[0] > 0).all() and (x[1] == 0).any()
    assert (r <= RESIDUAL_TOL).all()
    _directions_close(x, simplex_qp(p.H, z, 3 * default_iters(20), host=False)[0], J / p.s.sqrt()[:, None, None], 1e-8)


@pytest.mark.parametrize("host", PATHS)
def test_all_zero_gram_gives_a_simplex_point_and_the_zero_nonneg_point(host: bool) -> None:
    p = prepare(torch.zeros(4, 4, dtype=torch.float64), host=host)
    assert float(p.s) == 1.0
    w, _ = simplex_qp(p.H, torch.zeros(1, 4, dtype=p.H.dtype), host=host)
    assert (w >= 0).all() and abs(float(w.sum()) - 1) <= 1e-12  # every simplex point is optimal
    assert torch.equal(
        nonneg_qp(p.H, torch.zeros(2, 4, dtype=p.H.dtype), host=host)[0], torch.zeros(2, 4, dtype=p.H.dtype)
    )


def test_interior_point_path_runs_under_vmap_and_compile() -> None:
    """The k ≥ IPM_K path (interior point + polish) is sync-free: vmap and fullgraph compile give the batch."""
    k = IPM_K + 2
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(2, k, 9, generator=gen, dtype=torch.float64)
    H = prepare(J @ J.mT).H
    c = torch.randn(2, 3, k, generator=gen, dtype=J.dtype) @ H
    X = nonneg_qp(H, c)[0]
    assert torch.allclose(torch.func.vmap(lambda H, c: nonneg_qp(H, c)[0])(H, c), X, rtol=0, atol=1e-12)
    torch._dynamo.reset()
    compiled = torch.compile(lambda H, c: simplex_qp(H, c)[0], fullgraph=True, backend="eager")
    z = torch.zeros(2, 1, k, dtype=J.dtype)
    assert torch.allclose(compiled(H, z), simplex_qp(H, z)[0], rtol=0, atol=1e-12)


def test_on_host_only_for_plain_cpu_tensors_outside_any_trace() -> None:
    """The host-driven schedule reads values: never under vmap, grad transforms or torch.compile (this test
    fails loudly if torch renames what :func:`on_host` relies on)."""
    x = torch.ones(3, 3, dtype=torch.float64)
    assert on_host(x)
    seen: list[bool] = []
    torch.func.vmap(lambda t: seen.append(on_host(t)) or t)(x)
    torch.func.grad(lambda t: seen.append(on_host(t)) or t.sum())(x)
    assert seen == [False, False]
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: t * (2.0 if on_host(t) else 3.0), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), 3 * x)
    assert not on_host(torch.empty(2, device="meta"))
