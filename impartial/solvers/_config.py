"""ConFIG: the direction with equal projections on every unit task gradient, with a projection length."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, is_low, weighting_solution
from ._imtlg import _ROUNDOFF, _RTOL, _equal_projection, _stationary_where

__all__ = ["ConFIG"]


class ConFIG(GramSolver):
    r"""Conflict-free inverse gradients: ``d = (Σ_i g_i·ĝ) ĝ``, ``ĝ = Ũ⁺1 / ‖Ũ⁺1‖`` (``Ũ``: unit gradients).

    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025 (equal direction weights, projection length: the paper's and the official ``conflictfree``
    defaults).  ``x = Ũ⁺1`` has ``u_i·x = 1`` for every task, so ``d`` makes the same positive angle with
    all of them.  In Gram space ``x = Σ_i γ_i u_i`` with ``γ = C⁺1`` on the cosine matrix ``C`` (the same
    solve as :class:`IMTLG`, only the length differs), ``‖x‖² = γᵀCγ`` and ``Σ_i g_i·x = nᵀCγ``
    (``n_i = ‖g_i‖``), so

    .. math::  w_i = \frac{n^\top C γ}{γ^\top C γ} \, \frac{γ_i}{n_i}.

    The official code solves ``Ũx = 1`` with ``torch.linalg.lstsq`` (minimum-norm least squares); we do the
    same through ``C``, whose rank is cut at ``rtol · λ_max(C)`` (``1e-10`` for float64 input, ``1e-6`` for
    float32 and lower): singular values of ``Ũ`` below ``√rtol`` of the largest are dropped.  Zero
    gradients have no unit vector: they take no part (weight 0, as the official ``nan_to_num`` gives).
    When ``1`` has no component in the span of ``C`` (an antiparallel pair), ``x = 0`` and so is ``d``
    (status STATIONARY).
    Positively homogeneous; ``k = 1`` returns the gradient.

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> ConFIG()(J)  # x = (1, 1); length (g1 + g2)·x/‖x‖ = 4/√2
    tensor([2., 2.])
    """

    def __init__(self, *, rtol: float | None = None) -> None:
        self.rtol = rtol

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        low = is_low(precision)
        gamma, C, inv = _equal_projection(G, self.rtol if self.rtol is not None else _RTOL[low], _ROUNDOFF[low])
        n = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        Cg = (C @ gamma.unsqueeze(-1)).squeeze(-1)
        xx = (gamma * Cg).sum(-1, keepdim=True)  # ‖x‖²
        length = (n * Cg).sum(-1, keepdim=True)  # Σ_i g_i·x
        # x = 0 (no equal-projection direction at all): d = 0; torch.where, no host sync
        w = torch.where(xx > 0, length / torch.where(xx > 0, xx, 1.0) * gamma * inv, 0.0)
        return weighting_solution(w, _stationary_where(gamma), torch.zeros_like(xx.squeeze(-1)), mixing)

    def _hparams(self) -> dict[str, Any]:
        return {} if self.rtol is None else {"rtol": self.rtol}
