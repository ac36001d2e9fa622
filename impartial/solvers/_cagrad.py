"""CAGrad: the best worst-case improvement within a ball around the mean gradient.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(Algorithm 1).  Primal: ``max_d min_i g_i·d`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖``; its dual is a convex problem on the
simplex that needs only the Gram matrix, solved here exactly: small ``k`` (up to 10) by enumerating every
face's stationary point, larger ``k`` by the active-set iterations of :mod:`._qp` (host-driven on the CPU,
a fixed ``8k + 32`` of them elsewhere).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, Status
from ._qp import REG, RESIDUAL_TOL, check_iters, cutoff, prepare, status, zero_direction
from ._qp_faces import Face, all_faces, as_step, default_iters, enumerates, face_minimisers, masked_solve, pick_feasible
from ._qp_host import dot, host_active_set, host_residual, on_host, residual

__all__ = ["CAGrad"]


def _stationary(sol: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, ...]:
    """On a face with ``sol = H_FF⁻¹ [1, b]`` (``[..., k, 2]``): ``(w, μ, exact, a, β, A, C)``, the face's
    stationary point ``w = (μa − β)/√D``, ``μ = (C + √D)/A``, valid where ``exact = D > 0`` (see
    :func:`cagrad_dual`)."""
    a, beta = sol[..., 0], sol[..., 1]
    A, C = a.sum(-1, keepdim=True), beta.sum(-1, keepdim=True)
    E = (b * beta).sum(-1, keepdim=True)
    D = C * C - A * E + A * r * r
    exact = D > 0
    sqrtD = torch.where(exact, D, torch.ones_like(D)).sqrt()
    mu = (C + sqrtD) / A
    return (mu * a - beta) / sqrtD, mu, exact, a, beta, A, C


def _norm(H: Tensor, w: Tensor) -> Tensor:
    """``‖g_w‖ = √(wᵀHw)`` ``[..., m, 1]`` for ``w`` ``[..., m, k]``."""
    return ((w @ H) * w).sum(-1, keepdim=True).clamp(min=0).sqrt()


def _face(H: Tensor, b: Tensor, r: Tensor, w: Tensor) -> Face:
    """The face step at the current point ``w``: the face's stationary point where it has one, else the
    minimiser of the quadratic majoriser ``wᵀb + (r/2q)wᵀHw + rq/2`` at the current ``q = ‖g_w‖``."""

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ones = torch.ones_like(b)
        w_exact, mu_exact, exact, a, beta, A, C = _stationary(masked_solve(H, free, torch.stack([ones, b], -1)), b, r)
        rho = r / _norm(H, w)
        mu_mm = (rho + C) / A
        w_mm = (mu_mm * a - beta) / rho
        return torch.where(exact, w_exact, w_mm), torch.where(exact, mu_exact, mu_mm), exact

    return face


def _grad(H: Tensor, b: Tensor, r: Tensor):
    return lambda w: b + (r / _norm(H, w)) * (w @ H)


def _objective(H: Tensor, b: Tensor, r: Tensor):
    """``f`` at candidates ``W`` ``[..., m, n, k]`` → ``[..., m, n]`` (for the projected search)."""
    return lambda W: (W * b.unsqueeze(-2)).sum(-1) + r * ((W @ H.unsqueeze(-3)) * W).sum(-1).clamp(min=0).sqrt()


def cagrad_dual(H: Tensor, c: float, iters: int | None, host: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(w, q, residual)``: the dual minimiser ``w`` ``[..., k]``, ``q = ‖g_w‖`` and the KKT residual ``[...]``.

    Dual: ``min_{w ∈ Δ} f(w) = wᵀb + r √(wᵀHw)`` with ``b = H1/k`` and ``r = c‖g₀‖ = c √(1ᵀH1)/k``.
    On a face ``F`` stationarity reads ``b + r H w / q = μ1`` with ``q = ‖g_w‖``, so
    ``w = (q/r)(μ a − β)`` with ``a = H_FF⁻¹1``, ``β = H_FF⁻¹b``; ``wᵀHw = q²`` and ``1ᵀw = 1`` give
    ``μ = (C + √D)/A`` and ``r/q = √D`` with ``A = 1ᵀa``, ``C = 1ᵀβ``, ``E = bᵀβ``, ``D = C² − AE + Ar²``.
    When ``D ≤ 0`` the face has no interior stationary point; the step then minimises the quadratic
    majoriser at the current ``q``, which also lowers ``f`` (the iterations are then linear, not finite).
    """
    k = H.shape[-1]
    b = H.sum(-1, keepdim=True).mT / k  # [..., 1, k]
    r = c * (b.sum(-1, keepdim=True) / k).clamp(min=0).sqrt()  # ‖g₀‖² = 1ᵀH1/k² = 1ᵀb/k
    ones = torch.ones_like(b)
    if enumerates(k, 1, iters, host):
        # every nonempty face's stationary point at once (exact where D > 0), the uniform start as a candidate
        # that always exists; f is strictly convex on the simplex, so the feasible candidate of least f is the
        # optimum, which is the stationary point of its own face
        sol = face_minimisers(H, all_faces(k, H)[1:], torch.stack([ones, b], dim=-1))  # [..., 1, n, k, 2]
        W, _, exact, *_ = _stationary(sol, b.unsqueeze(-2), r.unsqueeze(-1))
        W = torch.where(exact, W, torch.full_like(W, -1.0))  # no stationary point: infeasible, never picked
        W = torch.cat([W, (ones / k).unsqueeze(-2)], dim=-2)
        w = pick_feasible(W, _objective(H, b, r)(W))
    else:
        # the majoriser steps converge linearly, not in one step: 4× the QPs' budget
        cap = 4 * default_iters(k) if iters is None else iters
        w, free = ones / k, ones > 0
        if host:
            w = host_active_set(
                lambda idx: _row_step(H, b, r, idx), w.reshape(-1, 1, k), free.reshape(-1, 1, k), cap
            ).reshape(b.shape)
        else:
            for _ in range(cap):
                w, free, _ = as_step(_grad(H, b, r), _face(H, b, r, w), w, free, _objective(H, b, r), simplex=True)
    g = _grad(H, b, r)(w)
    return (
        w.squeeze(-2),
        _norm(H, w).squeeze(-2).squeeze(-1),
        residual(g - (g * w).sum(-1, keepdim=True), w).squeeze(-1),
    )


def _interior(H: Tensor, c: float, tol: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(weights, status, residual)`` of one problem ``H`` ``[k, k]`` on the host where the whole simplex's
    stationary point (:func:`cagrad_dual`) is strictly inside it (then it is the dual minimiser: ``f`` is
    strictly convex), from one Cholesky and host reads of ``k``-vectors; None elsewhere, at a Pareto-stationary
    point, or where the KKT residual is not at round-off.

    :func:`cagrad_dual` starts on that face; this is its common case in a few ops, with the same residual and
    :class:`CAGrad`'s weights ``1/k + ρ w`` and status, computed from the answer.
    """
    k = H.shape[-1]
    b = H.sum(-1) / k
    L, info = torch.linalg.cholesky_ex(H)
    sol = torch.cholesky_solve(torch.stack([torch.ones_like(b), b], dim=-1), L)
    if int(info) != 0:
        return None
    bl, (a, beta) = b.tolist(), sol.mT.tolist()
    g0 = max(sum(bl) / k, 0.0)  # ‖g₀‖² (normalised)
    r = c * math.sqrt(g0)
    A, C, E = sum(a), sum(beta), dot(bl, beta)
    D = C * C - A * E + A * r * r
    if not D > 0:
        return None
    mu, root = (C + math.sqrt(D)) / A, math.sqrt(D)
    w = [(mu * u - v) / root for u, v in zip(a, beta, strict=True)]
    if min(w) <= 0:
        return None
    hw = (H @ torch.tensor(w, dtype=H.dtype)).tolist()
    q = math.sqrt(max(dot(hw, w), 0.0))  # ‖g_w‖
    if not q * q > tol:  # Pareto-stationary: the general path returns d = 0 there (c ≥ 1)
        return None
    g = [u + r / q * v for u, v in zip(bl, hw, strict=True)]
    gw = dot(g, w)
    lam = [u - gw for u in g]
    res = host_residual(lam, w)
    if not res <= RESIDUAL_TOL:
        return None
    rho = r / q  # c‖g₀‖/‖g_w‖
    # ‖d‖² for d = g₀ + ρ g_w: zero only where g₀ = −ρ g_w (c = 1 and 0 on the ball's edge)
    stationary = g0 + 2 * rho * dot(bl, w) + rho * rho * q * q <= 2 * REG
    code = Status.STATIONARY if stationary else Status.OK
    weights = torch.tensor([1 / k + rho * u for u in w], dtype=H.dtype)
    return weights, torch.full((), int(code), dtype=torch.int8), torch.full((), res, dtype=H.dtype)


def _row_step(H: Tensor, b: Tensor, r: Tensor, idx: Tensor):
    """:func:`._qp_faces.as_step` on the problems ``idx`` of the flattened batch (rows ``[n, 1, k]``)."""
    k = H.shape[-1]
    Hr, br, rr = H.reshape(-1, k, k), b.reshape(-1, 1, k), r.reshape(-1, 1, 1)
    Hr, br, rr = (Hr[idx] if Hr.shape[0] > 1 else Hr.expand(idx.numel(), k, k)), br[idx], rr[idx]

    def step(w: Tensor, free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, free, settled = as_step(
            _grad(Hr, br, rr), _face(Hr, br, rr, w), w, free, _objective(Hr, br, rr), simplex=True
        )
        return w, free, settled.squeeze(-1)

    return step


class CAGrad(GramSolver):
    r"""Conflict-Averse Gradient descent: maximise the worst task's improvement near the mean gradient.

    .. math::  w^\star = \arg\min_{w \in \Delta_k} w^\top G \mathbf{1}/k + c\lVert g_0\rVert\sqrt{w^\top G w},
               \qquad d = g_0 + \frac{c \lVert g_0 \rVert}{\lVert g_{w^\star} \rVert}\, g_{w^\star},

    with ``g₀ = 1ᵀJ/k`` the mean gradient and ``g_w = wᵀJ`` (Liu et al., NeurIPS 2021, Algorithm 1).  So
    ``‖d − g₀‖ = c‖g₀‖`` and, for ``c ≥ 1`` (``d = 0`` is then in the ball), ``J d ≥ 0``: no task conflicts.
    ``c = 0`` is the mean; ``k = 1`` returns the gradient scaled by ``1 + c``.

    Choices: ``c = 0.4`` by default (the paper's setting on NYUv2 and CityScapes).  No rescale: the
    paper's update is ``θ ← θ − α d``; the official code's ``rescale=1`` divides ``d`` by ``1 + c²``, which
    only changes the step size.  The dual is solved exactly (:func:`cagrad_dual`), not by SLSQP.  As in
    :mod:`._qp`, the instance solved is that of the gradients ``[J, √δ·diag(‖g_i‖)]`` (``δ = 1e-12``).
    At a Pareto-stationary point (0 in the hull: ``g_{w*} = 0``) the paper's ``g_w/‖g_w‖`` is 0/0: for
    ``c ≥ 1`` every optimal ``d`` lies in the dual cone, and the one of least norm, ``d = 0``, is returned
    (status STATIONARY).  For ``c < 1`` it happens too, e.g. an exactly antiparallel pair ``a, −a`` beside ``b``
    with ``|cos(a, b)| < c``: the optimal ``d`` then fill a disk of the ball (worst improvement 0) that the method
    does not choose among, and the status is NOT_CONVERGED (the last iterate's weights, finite).  STATIONARY also
    wherever ``d = 0`` (``g₀ = 0``).

    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
    >>> CAGrad(c=0.5)(J)
    tensor([0.4579, 0.6868])
    """

    def __init__(self, c: float = 0.4, *, iters: int | None = None) -> None:
        if not c >= 0:
            raise ValueError(f"CAGrad: c must be ≥ 0, got {c}")
        check_iters("CAGrad", iters)
        self.c = float(c)
        self.iters = iters

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        host = on_host(G)
        k = G.shape[-1]
        mean = torch.full_like(G[..., 0], 1.0 / k)
        if self.c == 0.0:  # a hyperparameter, not a tensor value: no host sync
            w, r, stationary = mean, torch.zeros_like(G[..., 0, 0]), zero_direction(G, mean)
        else:
            prep = prepare(G, precision, host)
            H = prep.H
            # nothing cut only: where prepare cut a null space the general path picks among equal directions
            if host and G.ndim == 2 and self.iters is None and prep.null is None:
                direct = _interior(H, self.c, cutoff(precision, k) + 2 * REG)
                if direct is not None:
                    w, code, r = direct
                    return Solution(w, code, r, torch.diag_embed(w) if mixing else None)
            u, q, r = cagrad_dual(H, self.c, self.iters, host)
            # ρ = c‖g₀‖/‖g_w‖ (H's normalisation cancels)
            rho = self.c * (H.sum((-2, -1)).clamp(min=0).sqrt() / k) / q.clamp(min=1e-300)
            w = mean + rho.unsqueeze(-1) * u
            stationary = (q * q <= cutoff(precision, k) + 2 * REG) & (self.c >= 1.0)
            w = torch.where(stationary.unsqueeze(-1), 0.0, w)
            r = torch.where(stationary, 0.0, r)  # the residual of the formula's 0/0 means nothing there
            stationary = stationary | zero_direction(G, w)  # g₀ = 0: d = g₀ + 0 (every task gradient 0, say)
        return Solution(w, status(r, stationary), r, torch.diag_embed(w) if mixing else None)

    def _hparams(self) -> dict[str, Any]:
        return {"c": self.c} | ({} if self.iters is None else {"iters": self.iters})
