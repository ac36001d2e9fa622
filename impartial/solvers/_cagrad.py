"""CAGrad: the best worst-case improvement within a ball around the mean gradient.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(Algorithm 1).  Primal: ``max_d min_i g_i·d`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖``; its dual is a convex problem on the
simplex that needs only the Gram matrix, solved here exactly: small ``k`` (up to 10) by enumerating every
face's stationary point (:func:`._qp.enumerates`), larger ``k`` by the batched active-set method of :mod:`._qp`
(``iters`` fixed iterations, default ``8k + 32``: a cap found by testing, not a proof; 4k + 16 left a
k = 17 problem unconverged, off by 3% of max|J|, where 5k sufficed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver
from ._qp import (
    active_set,
    all_faces,
    check_iters,
    default_iters,
    enumerates,
    face_minimisers,
    masked_solve,
    pick_feasible,
    prepare,
)

__all__ = ["CAGrad"]


#: marks the default iteration count, for which small problems are enumerated (see :func:`._qp.enumerates`)
_DEFAULT = -1


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


def cagrad_dual(H: Tensor, c: float, iters: int) -> tuple[Tensor, Tensor]:
    r"""``(w, ρ)``: the dual minimiser ``w`` ``[..., k]`` and ``ρ = r/‖g_w‖``, on a prepared Gram matrix ``H``.

    Dual: ``min_{w ∈ Δ} f(w) = wᵀb + r √(wᵀHw)`` with ``b = H1/k`` and ``r = c‖g₀‖ = c √(1ᵀH1)/k``.
    On a face ``F`` stationarity reads ``b + r H w / q = μ1`` with ``q = ‖g_w‖``, so
    ``w = (q/r)(μ a − β)`` with ``a = H_FF⁻¹1``, ``β = H_FF⁻¹b``; ``wᵀHw = q²`` and ``1ᵀw = 1`` give
    ``μ = (C + √D)/A`` and ``r/q = √D`` with ``A = 1ᵀa``, ``C = 1ᵀβ``, ``E = bᵀβ``, ``D = C² − AE + Ar²``.
    When ``D ≤ 0`` the face has no interior stationary point; the step then minimises the quadratic
    majoriser ``wᵀb + (r/2q)wᵀHw + rq/2`` (at the current ``q``), which also lowers ``f``.
    """
    k = H.shape[-1]
    b = H.sum(-1, keepdim=True).mT / k  # [..., 1, k]
    r = c * (b.sum(-1, keepdim=True) / k).clamp(min=0).sqrt()  # ‖g₀‖² = 1ᵀH1/k² = 1ᵀb/k
    ones = torch.ones_like(b)

    def norm(w: Tensor) -> Tensor:
        return ((w @ H) * w).sum(-1, keepdim=True).clamp(min=0).sqrt()

    if enumerates(k, 1, None if iters == _DEFAULT else iters):
        # every nonempty face's stationary point at once (exact where D > 0), the uniform start as a candidate
        # that always exists; f is strictly convex on the simplex, so the feasible candidate of least f is the
        # optimum, which is the stationary point of its own face
        sol = face_minimisers(H, all_faces(k, H)[1:], torch.stack([ones, b], dim=-1))  # [..., 1, n, k, 2]
        W, _, exact, *_ = _stationary(sol, b.unsqueeze(-2), r.unsqueeze(-1))
        W = torch.where(exact, W, torch.full_like(W, -1.0))  # no stationary point: infeasible, never picked
        W = torch.cat([W, (ones / k).unsqueeze(-2)], dim=-2)
        f = (W * b.unsqueeze(-2)).sum(-1) + r * ((W @ H.unsqueeze(-3)) * W).sum(-1).clamp(min=0).sqrt()
        w = pick_feasible(W, f)
        return w.squeeze(-2), (r / norm(w)).squeeze(-2).squeeze(-1)

    # the majoriser step needs q at the current point; the loop reports each new point through grad()
    state = {"w": ones / k}

    def grad(w: Tensor) -> Tensor:
        state["w"] = w
        return b + (r / norm(w)) * (w @ H)

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w_exact, mu_exact, exact, a, beta, A, C = _stationary(
            masked_solve(H, free, torch.stack([ones, b], dim=-1)), b, r)
        # majoriser step at the current point: r/q with q = ‖g_w‖ of the current w
        rho = r / norm(state["w"])
        mu_mm = (rho + C) / A
        w_mm = (mu_mm * a - beta) / rho
        return torch.where(exact, w_exact, w_mm), torch.where(exact, mu_exact, mu_mm), exact

    # 4x the QPs' budget by default: on faces without an interior stationary point the majoriser steps
    # converge linearly, not in one step (a k = 17 case needed ~5k iterations)
    iters = 4 * default_iters(k) if iters == _DEFAULT else iters
    w = active_set(grad, face, ones / k, ones > 0, iters)
    return w.squeeze(-2), (r / norm(w)).squeeze(-2).squeeze(-1)


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
    :mod:`._qp`, the instance solved is that of the gradients ``[J, √δ·diag(‖g_i‖)]`` (``δ = 1e-12``);
    this matters when some ``g_w`` vanishes (0 in the hull: a Pareto-stationary point), where the paper's
    ``g_w/‖g_w‖`` is 0/0 and the perturbation selects a finite optimal ``d`` (accurate to ~1e-6 there).

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

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        k = G.shape[-1]
        mean = torch.full_like(G[..., 0], 1.0 / k)
        if self.c == 0.0:  # a hyperparameter, not a tensor value: no host sync
            return mean
        H, _ = prepare(G)
        w, rho = cagrad_dual(H, self.c, _DEFAULT if self.iters is None else self.iters)
        return mean + rho.unsqueeze(-1) * w

    def _hparams(self) -> dict[str, Any]:
        return {"c": self.c} | ({} if self.iters is None else {"iters": self.iters})
