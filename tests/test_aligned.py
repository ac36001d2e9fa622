"""Aligned-MTL: the aligned task gradients are orthogonal with equal norms (Gram = λ_min · I)."""

from __future__ import annotations

import torch
from hypothesis import given
from torch import Tensor

from impartial.solvers import AlignedMTL, gram
from strategies import jacobians


@given(J=jacobians(max_k=12, min_d=12, degenerate=False))
def test_aligned_gram_is_lambda_min_identity(J: Tensor) -> None:
    G = gram(J)
    B = AlignedMTL().mixing(G)
    lam = torch.linalg.eigvalsh(G)
    aligned = B @ G @ B.mT
    k = G.shape[0]
    if lam[0] <= lam[-1] * k * torch.finfo(torch.float32).eps:
        return  # below the reference code's cut-off the rank is smaller (the projector test covers it)
    assert torch.allclose(aligned, lam[0] * torch.eye(k, dtype=G.dtype), rtol=0, atol=1e-8 * float(lam[0]))


@given(J=jacobians(max_k=16))
def test_aligned_gram_is_lambda_min_times_a_projector(J: Tensor) -> None:
    # at any rank, B G Bᵀ = λ_min V_r V_rᵀ: a multiple of the orthogonal projector onto the kept eigenspace
    G = gram(J)
    M = AlignedMTL().mixing(G)
    A = M @ G @ M.mT
    scale = float(torch.linalg.eigvalsh(A)[-1])
    if scale == 0:
        assert torch.equal(AlignedMTL()(J), torch.zeros_like(J[0]))
        return
    P = A / scale
    assert torch.allclose(P @ P, P, rtol=0, atol=1e-7)
    # the products M G Mᵀ round at ε k ‖M‖² ‖G‖, which P divides by λ_min (found by the thorough profile: a
    # near-antiparallel pair, λ_min/λ_max = 8e-6, asymmetry 1.5e-12 within a bound of 1.7e-11)
    k, eps = G.shape[0], torch.finfo(G.dtype).eps
    roundoff = 2 * k * eps * float(M.abs().max()) ** 2 * float(G.abs().max()) / scale
    assert torch.allclose(P, P.mT, rtol=0, atol=max(1e-12, roundoff))


@given(J=jacobians(max_k=12))
def test_aligned_task_gradients_are_B_J_and_sum_to_the_direction(J: Tensor) -> None:
    s = AlignedMTL()
    B = s.mixing(gram(J))
    assert torch.allclose(B, B.mT, rtol=0, atol=1e-12 * float(B.abs().max().clamp_min(1e-300)))
    new = s.apply(J)
    assert torch.allclose(new, B @ J, rtol=1e-9, atol=1e-9 * float(J.abs().max()))
    assert torch.allclose(new.sum(0), s(J), rtol=1e-9, atol=1e-9 * float(J.abs().max()))


def test_orthogonal_tasks_are_rescaled_to_the_smallest_norm() -> None:
    J = torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(AlignedMTL()(J), torch.full((3,), 0.5, dtype=torch.float64))


def test_eigenvalues_below_the_float32_cutoff_are_dropped() -> None:
    # the third direction has eigenvalue 1e-9 · λ_max < 3 · eps(float32) · λ_max: it is dropped, and λ_min is
    # the smallest kept one (1), not 1e-9.
    J = torch.diag(torch.tensor([1.0, 1.0, 1e-9**0.5], dtype=torch.float64))
    B = AlignedMTL().mixing(gram(J))
    assert torch.allclose(B, torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)))
