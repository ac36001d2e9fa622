"""Reference loops for the weighting solvers (IMTLG, NashMTL, FairGrad, AlignedMTL, ConFIG).

Plain float64 transcriptions of each paper, written for clarity, not speed: Python loops over tasks and
singular triplets, computed from ``J`` itself (never from ``G``) so they check the Gram-space fast paths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def _phi(x: float, p: float) -> float:
    return math.log(x) if p == 0 else x**p / p


def bargain_ref(J: Tensor, p: float, stationary: float = 1e-5) -> Tensor:
    """α-fair weights ``β`` (``p = 1 − 1/α``): ``(Gβ)_i = β_i^{p−1}`` on the nonzero rows, or 0.

    Plain damped Newton on ``F(β) = ½βᵀGβ − Σ φ(β_i)`` in the raw coordinates, with Armijo backtracking,
    run until the Newton decrement is at round-off.  Pareto-stationary tasks (a convex combination of the
    unit gradients of norm ≤ ``stationary``) have no solution: zero weights.
    """
    k = J.shape[0]
    idx, norms, _ = _unit_rows(J)
    beta = torch.zeros(k, dtype=J.dtype)
    m = len(idx)
    if m == 0:
        return beta
    G = torch.tensor([[float(J[i] @ J[j]) for j in idx] for i in idx], dtype=J.dtype)

    def F(b: list[float]) -> float:
        bt = torch.tensor(b, dtype=J.dtype)
        return 0.5 * float(bt @ G @ bt) - sum(_phi(x, p) for x in b)

    b = [1.0 / n for n in norms]
    for _ in range(500):
        bt = torch.tensor(b, dtype=J.dtype)
        grad = G @ bt - torch.tensor([x ** (p - 1) for x in b], dtype=J.dtype)
        H = G + torch.diag(torch.tensor([(1 - p) * x ** (p - 2) for x in b], dtype=J.dtype))
        step = -torch.linalg.solve(H, grad)
        dec2 = float(-(grad @ step))
        if dec2 < 1e-26:
            break
        t, f0 = 1.0, F(b)
        while True:
            cand = [x + t * float(s) for x, s in zip(b, step)]
            if all(x > 0 for x in cand) and F(cand) <= f0 - 0.25 * t * dec2:
                break
            t /= 2
            if t < 1e-30:
                break
        b = cand
        # certificate ‖Σ v_i u_i‖ with v ∝ β_i ‖g_i‖ on the simplex: stop once the tasks are stationary
        v = [x * n for x, n in zip(b, norms)]
        direction = sum(x * J[i] for x, i in zip(b, idx))
        if float(direction.norm()) / sum(v) <= stationary:
            return beta
    v = [x * n for x, n in zip(b, norms)]
    if float(sum(x * J[i] for x, i in zip(b, idx)).norm()) / sum(v) <= stationary:
        return beta
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
