"""MGDA-UB: the minimum-norm convex combination of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (problem (3), and
MGDA-UB when ``J`` holds the gradients at a shared representation).  The direction is the min-norm point
of the convex hull of the task gradients: a common descent direction, or 0 at a Pareto-stationary point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, Status
from ._qp import REG, RESIDUAL_TOL, check_iters, cutoff, prepare, simplex_qp, status
from ._qp_faces import kept_constant
from ._qp_host import dot, host_residual, on_host

__all__ = ["MGDA"]


def _two_tasks(G: Tensor) -> Tensor:
    """The paper's closed form for ``k = 2``: ``w = (γ, 1 − γ)``, ``γ = clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1)``."""
    # numerator and denominator as one product of the flattened G with a constant (these run on every call)
    num, den = (G.flatten(-2) @ _coefficients(G)).unbind(-1)
    # g₁ = g₂ (den = 0): every γ gives the same direction; take the middle.  torch.where: no host sync.
    positive = den > 0
    gamma = torch.where(positive, num / torch.where(positive, den, 1.0), 0.5).clamp(0.0, 1.0)
    return torch.stack([gamma, 1 - gamma], dim=-1)


def _coefficients(G: Tensor) -> Tensor:
    """``[4, 2]``: the flattened ``G`` times this is ``((g₂ − g₁)·g₂, ‖g₁ − g₂‖²)`` (both triangles averaged)."""
    return kept_constant(_KEPT, (G.dtype, G.device), lambda: G.new_tensor(_COEFFICIENTS))


_COEFFICIENTS = [[0.0, 1.0], [-0.5, -1.0], [-0.5, -1.0], [1.0, 1.0]]
_KEPT: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _interior_hull(H: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(w, status, residual)`` of one problem ``H`` ``[k, k]`` on the host where the affine hull's minimiser
    ``w = H⁻¹1 / 1ᵀH⁻¹1`` is strictly inside the simplex (then it is the answer: every bound multiplier is 0),
    read from one Cholesky; None elsewhere, or where its KKT residual is not at round-off.

    :func:`._qp.simplex_qp` starts from the same point; this is its common case in a few ops and host reads
    of ``k``-vectors, with the same residual, computed from the answer.
    """
    L, info = torch.linalg.cholesky_ex(H)
    a = torch.cholesky_solve(torch.ones(H.shape[-1], 1, dtype=H.dtype), L).view(-1)
    if int(info) != 0:
        return None
    x = a.tolist()
    if min(x) <= 0:
        return None
    inv = 1 / sum(x)
    w = a * inv
    x = [v * inv for v in x]  # the entries of w, as the same products
    g = (H @ w).tolist()
    mu = dot(g, x)  # wᵀHw = ‖d‖² (normalised)
    lam = [u - mu for u in g]  # each λ_j = (Hw)_j − μ is 0 up to round-off
    r = host_residual(lam, x)
    if not r <= RESIDUAL_TOL:
        return None
    code = Status.STATIONARY if mu <= tol else Status.OK
    return w, torch.full((), int(code), dtype=torch.int8), torch.full((), r, dtype=H.dtype)


class MGDA(GramSolver):
    r"""The min-norm point of the convex hull of the task gradients (MGDA-UB).

    .. math::  w = \arg\min_{w \in \Delta_k} \lVert w^\top J \rVert^2 = \arg\min_{w \in \Delta_k} w^\top G w,
               \qquad d = w^\top J .

    Sener & Koltun, NeurIPS 2018.  Optimality (KKT): ``g_t · d ≥ ‖d‖²`` for every task, with equality on the
    support ``w_t > 0``; so ``d`` decreases every loss, or is 0 when 0 is in the hull (Pareto-stationary:
    e.g. a zero task gradient, or an antiparallel pair; the status then says STATIONARY).  ``k = 1`` returns
    the gradient, ``k = 2`` uses the paper's closed form; ``k > 2`` solves the QP exactly with :mod:`._qp`
    (``iters`` caps its active-set iterations), not with the paper's Frank–Wolfe loop.  The solution is
    scale-free: ``G`` is normalised inside, so gradient norms from 1e-10 to 1e15 behave alike.

    Gradient normalisation: none.  Problem (3) of the paper weights the raw gradients; the authors' code
    optionally divides them by their norm or loss (``l2`` / ``loss`` / ``loss+``) -- compose with
    :class:`NSGD` for that.  The ``torchmoo`` code clamps the weights with ``min(w, 1e-3)``; we do not.

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> MGDA()(J)
    tensor([0.5000, 0.5000])
    """

    def __init__(self, *, iters: int | None = None) -> None:
        check_iters("MGDA", iters)
        self.iters = iters

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        host = on_host(G)
        k = G.shape[-1]
        # Pareto-stationary: the min-norm point is 0 but for the ridge and what the precision cannot resolve
        tol = cutoff(precision, k) + 2 * REG
        if k <= 2:  # a shape, not a value: no host sync.  Closed form: no residual, the fewest ops
            w = torch.ones_like(G[..., 0]) if k == 1 else _two_tasks(G)
            s = G.diagonal(dim1=-2, dim2=-1).amax(-1)
            stationary = torch.linalg.vecdot(w, (G @ w.unsqueeze(-1)).squeeze(-1)) <= tol * s  # all-zero G: 0 ≤ 0
            code = stationary.to(torch.int8)  # STATIONARY is 1, OK 0
            return Solution(w, code, torch.zeros_like(s), torch.diag_embed(w) if mixing else None)
        prep = prepare(G, precision, host)
        # nothing cut only: where prepare cut a null space the general path picks among equal directions
        if host and G.ndim == 2 and prep.null is None:
            hull = _interior_hull(prep.H, tol)
            if hull is not None:
                w, code, r = hull
                return Solution(w, code, r, torch.diag_embed(w) if mixing else None)
        w, r = simplex_qp(prep.H, torch.zeros_like(G[..., :1, :]), self.iters, host)
        w, r = w.squeeze(-2), r.squeeze(-1)
        stationary = ((w.unsqueeze(-2) @ prep.H).squeeze(-2) * w).sum(-1) <= tol
        return Solution(w, status(r, stationary), r, torch.diag_embed(w) if mixing else None)

    def _hparams(self) -> dict[str, Any]:
        return {} if self.iters is None else {"iters": self.iters}
