"""Aligned-MTL: make the task gradients orthogonal with equal norms, by one eigendecomposition of ``G``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramSolver, Solution, is_low
from ._imtlg import _ROUNDOFF

__all__ = ["AlignedMTL"]

#: relative eigenvalue cut-off of the reference code: ``k · eps`` of float32 (``torch.finfo().eps``)
_EPS = torch.finfo(torch.float32).eps


class AlignedMTL(GramSolver):
    r"""New task gradients ``B J`` whose Gram matrix is ``λ_min · I``: stable, conflict-free, equally scaled.

    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task Learning",
    CVPR 2023.  With ``G = VΛVᵀ`` restricted to its ``r`` retained eigenpairs, the alignment is the Procrustes
    solution ``B = √λ_min · V Λ^{-1/2} Vᵀ``, so

    .. math::  B G Bᵀ = λ_{\min} V V^\top \;(= λ_{\min} I \text{ at full rank}), \qquad w = \mathbf 1^\top B,

    the condition number of the aligned system is 1 and the direction is ``wᵀJ = Σ_i (BJ)_i``.  It is 0
    exactly when ``1`` is orthogonal to the kept eigenvectors, i.e. when the task gradients sum to 0: then
    (components of ``1`` at round-off, below ``1e-10 √k``, ``1e-6 √k`` for a float32 ``J``, count as 0) the
    weights are 0 and the status STATIONARY.  As in the
    authors' code (SamsungLabs/MTL, "min" scale mode, the paper's): eigenvalues at or below
    ``λ_max · k · eps(float32)`` are dropped (whatever the input dtype), and ``λ_min`` is the smallest one
    kept.  ``B`` is a spectral function of ``G``, so the result does not depend on the eigenvector basis
    (repeated eigenvalues included).  Positively homogeneous; ``k = 1`` returns the gradient; all-zero
    gradients give the zero direction.  The mixing matrix is ``B`` (the aligned task gradients).

    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> AlignedMTL()(J)  # both rescaled to the smaller norm
    tensor([1., 1.])
    """

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        k = G.shape[-1]
        lam, V = torch.linalg.eigh(G)
        keep = lam > lam[..., -1:] * k * _EPS
        lam_min = torch.where(keep, lam, torch.inf).amin(-1, keepdim=True)
        # √(λ_min/λ) on the kept eigenvalues, 0 elsewhere; torch.where keeps 0/0 and inf/inf out (no sync)
        scale = torch.where(keep, (lam_min / torch.where(keep, lam, 1.0)).sqrt(), 0.0)
        c = V.sum(-2)  # components of 1 along the eigenvectors: w = Σ_kept scale · c · v
        stationary = (~keep | (c.abs() <= _ROUNDOFF[is_low(precision)] * k**0.5)).all(-1)
        w = torch.where(stationary.unsqueeze(-1), 0.0, (V @ (scale * c).unsqueeze(-1)).squeeze(-1))
        M = (V * scale.unsqueeze(-2)) @ V.mT if mixing else None
        # all-zero gradients keep no eigenvalue, so they are stationary here too: the bool is the code
        return Solution(w, stationary.to(torch.int8), torch.zeros_like(w[..., 0]), M)
