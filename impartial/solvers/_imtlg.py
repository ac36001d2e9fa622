"""IMTL-G: the direction with equal projections on every unit task gradient, in closed form on ``G``.

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021 (the
gradient part, IMTL-G).  The paper writes the solution with ``D = [g₁ − g_t]`` and ``U = [u₁ − u_t]``
(``u_t = g_t/‖g_t‖``) as ``α_{2:k} = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σ α_{2:k}``; we solve the same equations in
the cosine matrix of the task gradients, which needs only ``G`` and is far better conditioned when the
gradient norms differ by orders of magnitude.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, Status, is_low, weighting_solution

__all__ = ["IMTLG"]

#: relative eigenvalue cut-off of the cosine matrix: float64 input, float32 and lower (whose Gram is
#: accumulated in float32: its cosines carry ~1e-7 noise)
_RTOL = (1e-10, 1e-6)
#: components of 1 along kept eigenvectors at or below this (times √k) are round-off: float64, float32 and lower
_ROUNDOFF = (1e-10, 1e-6)


class IMTLG(GramSolver):
    r"""Weights ``α`` whose direction ``d = αᵀJ`` makes the same angle with every task gradient, ``Σα = 1``.

    The IMTL-G problem: find ``d = Σ_t α_t g_t`` with ``d·u_1 = d·u_t`` for all ``t`` (``u_t = g_t/‖g_t‖``) and
    ``Σ_t α_t = 1``.  With the cosine matrix ``C = N⁻¹GN⁻¹`` (``N = diag(‖g_t‖)``) the equal-projection
    directions are ``d = Uᵀγ`` with ``Cγ ∝ 1``, so

    .. math::  γ = C^{+}\mathbf 1, \qquad α = N^{-1}γ, \qquad w = α / |\mathbf 1^\top α|,

    i.e. ``w ∝ G⁺ diag(G)^{1/2}`` for a full-rank ``G``, where it is exactly the paper's closed form.  Choices
    (the paper assumes linearly independent, nonzero gradients):

    - **sign**: ``d = Uᵀγ`` has projection ``+1`` on every unit gradient; dividing by ``|Σα|`` (not ``Σα``)
      keeps it that way when ``Σα < 0``, where the paper's ``Σα = 1`` would return the ascent direction.
      Where ``|Σα|`` is below ``1e-12 ‖α‖₁`` (the paper's answer is unbounded) it is floored there.
    - **zero gradients** have no direction: they get weight 0 and the rest is solved among the others.
    - **rank**: ``C⁺`` drops eigenvalues at or below ``rtol · λ_max(C)`` (``rtol = 1e-10`` for a float64
      ``J``, ``1e-6`` for float32 and lower, whose values carry float32 rounding: the ``precision`` given to
      :meth:`solve`); among the coefficient vectors of the (unique) direction this picks the minimum-norm
      ``γ``.  Components of ``1`` along kept eigenvectors below ``1e-10 √k`` (``1e-6 √k``) are round-off and
      dropped.  When no nonzero direction has equal
      projections, this is the least-squares one (``min ‖Ud − 1‖``); when that is 0 (an antiparallel pair:
      only ``d = 0`` is impartial, as in the paper), the weights are 0 and the status
      STATIONARY.

    ``k = 1`` returns the gradient.  Positively homogeneous, permutation and rotation invariant, stateless.

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> IMTLG().weights(J @ J.T)
    tensor([0.7500, 0.2500], dtype=torch.float64)
    >>> IMTLG()(J)  # projections on e1 and e2 are equal
    tensor([0.7500, 0.7500])
    """

    def __init__(self, *, rtol: float | None = None) -> None:
        self.rtol = rtol

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        low = is_low(precision)
        gamma, _, inv = _equal_projection(G, self.rtol if self.rtol is not None else _RTOL[low], _ROUNDOFF[low])
        alpha = gamma * inv
        # torch.where, not an if: no host sync.  |Σα| keeps the common projection positive.
        denom = torch.maximum(alpha.sum(-1).abs(), 1e-12 * alpha.abs().sum(-1)).unsqueeze(-1)
        w = torch.where(denom > 0, alpha / torch.where(denom > 0, denom, 1.0), 0.0)
        return weighting_solution(w, _stationary_where(gamma), torch.zeros_like(denom.squeeze(-1)), mixing)

    def _hparams(self) -> dict[str, Any]:
        return {} if self.rtol is None else {"rtol": self.rtol}


def _equal_projection(G: Tensor, rtol: float, roundoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """``γ = C⁺1`` on the cosine matrix ``C`` of ``G`` (the direction ``Σ γ_t u_t`` has projection 1 on every
    unit gradient, or is the least-squares such direction), with ``C`` and ``1/‖g_t‖`` (0 for zero rows)."""
    k = G.shape[-1]
    n = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    # a gradient norm whose square underflows is a zero gradient; 1/n stays finite above sqrt(tiny)
    nonzero = n > torch.finfo(G.dtype).tiny ** 0.5
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, n, 1.0), 0.0)
    C = G * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    lam, V = torch.linalg.eigh(C)
    keep = lam > rtol * lam[..., -1:]
    c = V.sum(-2)  # components of 1 along the eigenvectors
    # a component of 1 at round-off level along a kept eigenvector is noise (1 ⊥ that eigenvector)
    keep = keep & (c.abs() > roundoff * k**0.5)
    gamma = (V @ torch.where(keep, c / torch.where(keep, lam, 1.0), 0.0).unsqueeze(-1)).squeeze(-1)
    return gamma, C, inv


def _stationary_where(gamma: Tensor) -> Tensor:
    """STATIONARY where ``γ = 0``: no equal-projection direction but 0, which happens exactly when the unit
    gradients sum to 0 (``C1 = 0``, an antiparallel pair) or every gradient is 0: Pareto-stationary tasks."""
    return (gamma == 0).all(-1).to(torch.int8) * int(Status.STATIONARY)  # OK (0) elsewhere
