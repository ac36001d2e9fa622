"""Reference loops for the weighting solvers (IMTLG, NashMTL, FairGrad, AlignedMTL, ConFIG).

Plain float64 transcriptions of each paper, written for clarity, not speed: Python loops over tasks and
singular triplets, computed from ``J`` itself (never from ``G``) so they check the Gram-space fast paths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .qp import min_norm_point


def _unit_rows(J: Tensor) -> tuple[list[int], list[float], Tensor]:
    """Indices and norms of the nonzero rows of ``J``, and those rows normalised."""
    idx, norms = [], []
    for t in range(J.shape[0]):
        n = float(J[t].norm())
        if n * n > torch.finfo(J.dtype).tiny:
            idx.append(t)
            norms.append(n)
    U = torch.stack([J[t] / n for t, n in zip(idx, norms)]) if idx else J[:0]
    return idx, norms, U


def _gamma(U: Tensor, k: int, rtol: float) -> Tensor:
    """``γ = (UUᵀ)⁺1``, one singular triplet of ``U`` at a time: ``x = Uᵀγ = U⁺1`` solves ``min ‖Ux − 1‖``.

    Singular values with ``σ² ≤ rtol σ_max²`` are dropped, and so are components of ``1`` at round-off level.
    """
    P, S, _ = torch.linalg.svd(U, full_matrices=False)
    gamma = torch.zeros(U.shape[0], dtype=U.dtype)
    for i in range(len(S)):
        c = float(P[:, i].sum())
        if S[i] ** 2 > rtol * S[0] ** 2 and abs(c) > 1e-10 * k**0.5:
            gamma = gamma + P[:, i] * c / S[i] ** 2
    return gamma


def imtlg_paper(J: Tensor) -> Tensor:
    """The paper's closed form for linearly independent nonzero rows: ``α_{2:k} = g₁Uᵀ(DUᵀ)⁻¹``."""
    k = J.shape[0]
    u = [J[t] / J[t].norm() for t in range(k)]
    if k == 1:
        return torch.ones(1, dtype=J.dtype)
    D = torch.stack([J[0] - J[t] for t in range(1, k)])
    Ud = torch.stack([u[0] - u[t] for t in range(1, k)])
    a = torch.linalg.solve((D @ Ud.T).T, (J[0] @ Ud.T))  # row vector g₁Uᵀ(DUᵀ)⁻¹, solved transposed
    return torch.cat([1 - a.sum().reshape(1), a])


def imtlg_ref(J: Tensor, losses: Tensor | None = None, rtol: float = 1e-10) -> Tensor:
    """IMTL-G: the paper's closed form where it applies, else the least-squares min-norm definition."""
    k = J.shape[0]
    idx, norms, U = _unit_rows(J)
    w = torch.zeros(k, dtype=J.dtype)
    if not idx:
        return w @ J
    S = torch.linalg.svdvals(U)
    kept = [i for i in range(len(S)) if S[i] ** 2 > rtol * S[0] ** 2]
    if len(kept) == len(idx):  # independent rows: the paper's formula, sign-guarded
        alpha = imtlg_paper(J[idx])
        d = alpha @ J[idx]
        if float(d @ U[0]) < 0:  # common projection negative: the paper's Σα = 1 gives the ascent direction
            alpha = -alpha
        for a, t in zip(alpha, idx):
            w[t] = a
        return w @ J
    # rank-deficient: γ = (UUᵀ)⁺1 through the singular triplets of U
    gamma = _gamma(U, k, rtol)
    alpha = torch.stack([gamma[j] / norms[j] for j in range(len(idx))])
    s, l1 = float(alpha.sum()), float(alpha.abs().sum())
    denom = max(abs(s), 1e-12 * l1)
    if denom == 0:
        return w @ J
    for j, t in enumerate(idx):
        w[t] = alpha[j] / denom
    return w @ J


def _phi_change(x: float, dx: float, p: float) -> float:
    """``φ(x + dx) − φ(x)`` without the cancellation of subtracting two large values."""
    r = math.log1p(dx / x)
    return r if p == 0 else x**p * math.expm1(p * r) / p


def bargain_ref(J: Tensor, p: float, stationary: float = 1e-5) -> Tensor:
    """α-fair weights ``β`` (``p = 1 − 1/α``): ``(Gβ)_i = β_i^{p−1}`` on the nonzero rows, or 0.

    Plain damped Newton on ``F(β) = ½βᵀGβ − Σ φ(β_i)`` in the raw coordinates, with Armijo backtracking,
    run until the Newton decrement is at round-off relative to ``Σ β_i^p`` (the size of ``F``'s terms at the
    solution, where ``βᵀGβ = Σ β_i^p``) or no step decreases ``F`` any more.  Pareto-stationary tasks (a
    convex combination of the unit gradients of norm ≤ ``stationary``, the hull's min-norm point by Wolfe's
    algorithm) have no solution: zero weights.

    Near such tasks ``β`` grows large while ``Σ β_j g_j`` stays small, so everything that involves ``Gβ`` is
    formed from that direction (``(Gβ)_i = g_i·d``, never a sum of large ``β_j G_ij`` that cancel) and the
    change of ``F`` along a step is expanded in ``t`` rather than taken as a difference of two large values.
    """
    k = J.shape[0]
    idx, norms, _ = _unit_rows(J)
    beta = torch.zeros(k, dtype=J.dtype)
    m = len(idx)
    if m == 0:
        return beta
    rows = J[idx]
    U = torch.stack([g / n for g, n in zip(rows, norms)])
    if float((min_norm_point(U) @ U).norm()) <= stationary:
        return beta

    b = [n ** (-2 / (2 - p)) for n in norms]  # exact when the gradients are orthogonal
    for _ in range(500):
        d = sum(x * g for x, g in zip(b, rows))
        # Newton system (G + diag h) Δ = −∇F in the scaled step y = S⁻¹Δ, S = diag(h)^{-1/2}: it reads
        # (AᵀA) y = Aᵀz for A = [Jᵀ S; I] and z = [−d; S β^{p−1}], so y is a least-squares solution, found
        # without forming the normal matrix, whose condition squares A's once β runs off to ∞.
        s = torch.tensor([((1 - p) * x ** (p - 2)) ** -0.5 for x in b], dtype=J.dtype)
        A = torch.cat([rows.T * s, torch.eye(m, dtype=J.dtype)])
        z = torch.cat([-d, s * torch.tensor([x ** (p - 1) for x in b], dtype=J.dtype)])
        y = torch.linalg.lstsq(A, z.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        step = [float(v) for v in s * y]
        dec2 = float((A @ y).norm()) ** 2  # −∇FᵀΔ = yᵀAᵀAy
        if dec2 <= 1e-24 * sum(x**p for x in b):
            break
        e = sum(st * g for st, g in zip(step, rows))
        Gb_step, sGs = float(d @ e), float(e @ e)
        t = 1.0
        while t > 1e-30:  # F(β + tΔ) − F(β) ≤ ¼ t ∇Fᵀ Δ, β + tΔ > 0
            if all(x + t * st > 0 for x, st in zip(b, step)):
                change = t * Gb_step + 0.5 * t * t * sGs - sum(_phi_change(x, t * st, p) for x, st in zip(b, step))
                if change <= -0.25 * t * dec2:
                    break
            t /= 2
        else:  # no step decreases F: β is at round-off
            break
        b = [x + t * st for x, st in zip(b, step)]
    for x, i in zip(b, idx):
        beta[i] = x
    return beta


def nash_ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
    """Nash-MTL with the official ``G/‖G‖_F`` normalisation: ``√‖G‖_F · α*ᵀJ``, ``α* ⊙ Gα* = 1``."""
    G = J @ J.T
    return float(torch.linalg.matrix_norm(G)) ** 0.5 * (bargain_ref(J, 0.0) @ J)


def fairgrad_ref(alpha: float):
    def ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
        return bargain_ref(J, 1.0 - 1.0 / alpha) @ J

    return ref


def aligned_ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
    """Aligned-MTL from the SVD of ``J`` (the authors' code eigendecomposes ``G = JJᵀ``): ``Σ_t (BJ)_t``."""
    k = J.shape[0]
    P, S, _ = torch.linalg.svd(J, full_matrices=False)
    lam = [float(s) ** 2 for s in S]
    kept = [i for i in range(len(lam)) if lam[i] > lam[0] * k * torch.finfo(torch.float32).eps]
    out = torch.zeros_like(J[0])
    if not kept:
        return out
    lam_min = min(lam[i] for i in kept)
    B = sum((lam_min / lam[i]) ** 0.5 * torch.outer(P[:, i], P[:, i]) for i in kept)
    for t in range(k):  # the aligned task gradient t is row t of B J
        for j in range(k):
            out = out + B[t, j] * J[j]
    return out


def config_ref(J: Tensor, losses: Tensor | None = None, rtol: float = 1e-10) -> Tensor:
    """ConFIG as the official code computes it: ``x = lstsq(Ũ, 1)``, ``d = (Σ_i g_i·x̂) x̂``."""
    k = J.shape[0]
    idx, _, U = _unit_rows(J)
    if not idx:
        return torch.zeros_like(J[0])
    x = _gamma(U, k, rtol) @ U  # the minimum-norm least-squares solution of Ũx = 1
    if float(x.norm()) == 0:
        return torch.zeros_like(J[0])
    unit = x / x.norm()
    length = sum(float(J[t] @ unit) for t in range(k))
    return length * unit
