"""The shared QP machinery: each solver's KKT conditions, on Gram matrices with the structure that breaks solvers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from impartial.solvers._qp import IPM_K, REG, default_iters, enumerates, nonneg_qp, prepare, simplex_qp
from strategies import jacobians

KKT_TOL = 1e-9  # relative to the normalised Gram matrix (max diagonal 1)


@given(J=jacobians(max_k=32))
def test_prepare_is_psd_normalised_and_scale_free(J: torch.Tensor) -> None:
    G = J @ J.T
    H, s = prepare(G)
    D = H.diagonal().sqrt()
    assert torch.linalg.eigvalsh(H / (D[:, None] * D[None, :])).min() >= REG / 2  # δ relative to each task
    expected = G / s if float(s) > 0 else G
    assert (H - expected).abs().max() <= 1e-10
    H2, _ = prepare(1e6 * G)
    assert (H2 - H).abs().max() <= 1e-10


@given(J=jacobians(max_k=32), m=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_nonneg_qp_kkt_conditions_hold(J: torch.Tensor, m: int, seed: int) -> None:
    """x ≥ 0, λ = Hx + c ≥ 0, λ ⊙ x = 0: the KKT conditions of min ½xᵀHx + cᵀx over x ≥ 0.

    ``c = H u`` (the dual-cone projection of ``Jᵀu``, any signs): a bounded problem even for singular ``H``.
    """
    H, _ = prepare(J @ J.T)
    u = torch.randn(m, J.shape[0], generator=torch.Generator().manual_seed(seed), dtype=H.dtype)
    c = u @ H
    x = nonneg_qp(H, c)
    lam = x @ H + c
    assert (x >= 0).all()
    assert lam.min() >= -KKT_TOL * (1 + c.abs().max())
    assert (lam * x).abs().max() <= KKT_TOL * (1 + c.abs().max()) * (1 + x.abs().max())


@given(J=jacobians(max_k=32))
def test_simplex_qp_kkt_conditions_hold(J: torch.Tensor) -> None:
    """x ∈ Δ, Hx ≥ xᵀHx componentwise, with equality on the support (min-norm point of the hull)."""
    H, _ = prepare(J @ J.T)
    x = simplex_qp(H, torch.zeros(1, J.shape[0], dtype=H.dtype))[0]
    assert (x >= 0).all() and abs(float(x.sum()) - 1) <= 1e-12
    Hx = H @ x
    gap = Hx - x @ Hx
    assert gap.min() >= -KKT_TOL
    assert (gap * x).abs().max() <= KKT_TOL


def test_batched_problems_equal_one_at_a_time() -> None:
    """Compared as directions ``xᵀJ`` (normalised): with k = 6 > d = 4 the weights have a direction of
    curvature δ = 1e-12 that batched and single solves (different BLAS kernels) resolve differently, by
    up to ~1e-4, while the directions agree to round-off."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    H, s = prepare(J @ J.mT)
    Jn = J / s.sqrt()[:, None, None]
    c = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64) @ H
    X = nonneg_qp(H, c)
    for b in range(3):
        for i in range(5):
            assert ((X[b, i] - nonneg_qp(H[b], c[b, i : i + 1])[0]) @ Jn[b]).abs().max() <= 1e-12


@pytest.mark.parametrize("k", [5, 12, IPM_K + 6])
@pytest.mark.parametrize("d", [3, 40])
def test_each_method_agrees_with_a_long_active_set_batched(k: int, d: int) -> None:
    """Enumeration (k = 5), the active set (k = 12) and the interior point + polish (k ≥ IPM_K), on a batch
    of 3 Gram matrices with 2 problems each (batch ≠ problems), equal one at a time and agree with 3× the
    default active-set iterations (directions, relative to the normalised gradients)."""
    assert enumerates(5, 2, None) and not enumerates(12, 2, None) and not enumerates(IPM_K + 6, 1, None)
    gen = torch.Generator().manual_seed(k + d)
    J = torch.randn(3, k, d, generator=gen, dtype=torch.float64)
    J = J * torch.exp(torch.empty(3, k, 1, dtype=J.dtype).uniform_(-3, 3, generator=gen))
    J[1, 0] = 0.0
    J[2, 1] = -J[2, 2]
    H, s = prepare(J @ J.mT)
    Jn = J / s.sqrt()[:, None, None]
    for X, R in [(nonneg_qp(H, c := torch.randn(3, 2, k, generator=gen, dtype=J.dtype) @ H),
                  nonneg_qp(H, c, 3 * default_iters(k))),
                 (simplex_qp(H, z := torch.zeros(3, 1, k, dtype=J.dtype)), simplex_qp(H, z, 3 * default_iters(k)))]:
        assert ((X - R) @ Jn).abs().max() <= 1e-8
    for b in range(3):  # as directions: see test_batched_problems_equal_one_at_a_time
        assert ((nonneg_qp(H, c)[b] - nonneg_qp(H[b], c[b])) @ Jn[b]).abs().max() <= 1e-12


def test_all_zero_gram_gives_a_simplex_point_and_the_zero_nonneg_point() -> None:
    H, s = prepare(torch.zeros(4, 4, dtype=torch.float64))
    assert float(s) == 1.0
    w = simplex_qp(H, torch.zeros(1, 4, dtype=H.dtype))
    assert (w >= 0).all() and abs(float(w.sum()) - 1) <= 1e-12  # every simplex point is optimal
    assert torch.equal(nonneg_qp(H, torch.zeros(2, 4, dtype=H.dtype)), torch.zeros(2, 4, dtype=H.dtype))


def test_interior_point_path_runs_under_vmap_and_compile() -> None:
    """The k ≥ IPM_K path (interior point + polish) is sync-free: vmap and fullgraph compile give the batch."""
    k = IPM_K + 2
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(2, k, 9, generator=gen, dtype=torch.float64)
    H, _ = prepare(J @ J.mT)
    c = torch.randn(2, 3, k, generator=gen, dtype=J.dtype) @ H
    X = nonneg_qp(H, c)
    assert torch.allclose(torch.func.vmap(nonneg_qp)(H, c), X, rtol=0, atol=1e-12)
    torch._dynamo.reset()
    compiled = torch.compile(simplex_qp, fullgraph=True, backend="eager")
    z = torch.zeros(2, 1, k, dtype=J.dtype)
    assert torch.allclose(compiled(H, z), simplex_qp(H, z), rtol=0, atol=1e-12)
