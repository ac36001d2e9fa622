"""The conditioning shared by the QP solvers (:mod:`impartial.solvers._qp` says why): the normalised,
regularised problem of a Gram matrix, its eigenvalue cut-off, least-norm weights, and the status codes."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._solution import Status

#: relative Tikhonov term added to the normalised Gram matrix (see the module docstring).
REG = 1e-12
#: a KKT residual above this (relative to the normalised Gram matrix) means "did not converge"
RESIDUAL_TOL = 1e-9
#: projected gradient stops at this residual (then the error is at most a few times it, where it converges)
PG_TOL = 1e-12
#: cap on projected-gradient iterations (the stall test of :func:`._qp_host.projected_gradient` ends most runs)
PG_ITERS = 500


def check_iters(who: str, iters: int | None) -> None:
    """Reject a negative iteration count, naming the solver."""
    if iters is not None and iters < 0:
        raise ValueError(f"{who}: iters must be ≥ 0, got {iters}")


def cutoff(precision: torch.dtype, k: int) -> float:
    """Eigenvalues of the correlation matrix of ``k`` tasks at or below this are zero for input of ``precision``.

    The Gram matrix of float32 (or lower) task gradients is accumulated in float32: its correlation matrix
    carries errors of ~1e-7 (measured up to 5e-7 on rank-deficient inputs, k ≤ 64), which would otherwise
    be taken for directions of curvature and give weights of 1e4 and more along them.
    """
    eps = torch.finfo(torch.float64 if precision == torch.float64 else torch.float32).eps
    return 8 * math.sqrt(k) * eps


class Prepared(NamedTuple):
    #: ``[..., k, k]`` the normalised, regularised Gram matrix
    H: Tensor
    #: ``[...]`` the scale ``max diag G``
    s: Tensor
    #: ``[..., k]`` the normalised task norms ``√diag(G/s)`` (1 for a zero gradient); None where ``null`` is
    D: Tensor | None
    #: ``[..., k, k]`` the projector onto the null space of the correlation matrix, or None when it has none
    null: Tensor | None


def prepare(G: Tensor, precision: torch.dtype | None = None, host: bool = False) -> Prepared:
    """The normalised, regularised problem of ``G`` ``[..., k, k]`` (see the module docstring).

    With ``D = diag(G/s)^½`` (zero rows: ``D_j = 1``), ``H = D (C₊ + δ I) D`` where ``C`` is the correlation
    matrix of the task gradients and ``C₊`` is ``C`` with its eigenvalues ``≤`` :func:`cutoff` set to zero.
    Working on ``C`` makes the cut-off and ``δ`` relative to each task's own norm.  With ``host`` a Cholesky
    of ``C − cutoff·I`` that succeeds proves there is nothing to cut, and the eigendecomposition is skipped.
    """
    k = G.shape[-1]
    if host:
        lean = _prepare_lean(G, cutoff(precision or G.dtype, k))
        if lean is not None:
            return lean
    d = G.diagonal(dim1=-2, dim2=-1)
    s = d.amax(-1, keepdim=True)
    s = torch.where(s > 0, s, 1.0)  # torch.where: no host sync on the all-zero case
    n = torch.where(d > 0, d, s)  # a zero gradient is scaled as if it had the largest norm
    D = (n / s).sqrt()
    rn = n.rsqrt()
    C = G * (rn.unsqueeze(-1) * rn.unsqueeze(-2))
    C = (C + C.mT) * 0.5  # BLAS does not promise a symmetric J Jᵀ; the residuals read both triangles
    tau = cutoff(precision or G.dtype, k)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    null = None
    if not host or int(torch.linalg.cholesky_ex(torch.add(C, eye, alpha=-tau))[1].amax()) != 0:
        lam, V = torch.linalg.eigh(C)
        keep = lam > tau
        C = (V * torch.where(keep, lam, 0.0).unsqueeze(-2)) @ V.mT
        C = (C + C.mT) / 2
        null = (V * (~keep).to(V.dtype).unsqueeze(-2)) @ V.mT
    return Prepared(torch.add(C, eye, alpha=REG) * (D.unsqueeze(-1) * D.unsqueeze(-2)), s.squeeze(-1), D, null)


def _prepare_lean(G: Tensor, tau: float) -> Prepared | None:
    """:func:`prepare` on the host in its common case, in about half the ops; None elsewhere.

    The common case: every task gradient is nonzero and a Cholesky of ``G − τ diag G`` succeeds (for every
    problem), which is the same test as ``C − τ I`` (``C = N G N`` with ``N = diag G^-½``, a congruence):
    nothing is cut, so ``H = D (C + δ I) D = (G + δ diag G) / s``, formed without ``C``.
    """
    d = G.diagonal(dim1=-2, dim2=-1)
    one = G.ndim == 2
    if one:
        diag = d.tolist()
        if min(diag) <= 0:
            return None
    elif not d.amin().item() > 0:
        return None
    A = torch.add(G, G.mT)  # twice the symmetrised G (BLAS does not promise a symmetric J Jᵀ)
    A.diagonal(dim1=-2, dim2=-1).mul_(1 - tau)
    info = torch.linalg.cholesky_ex(A)[1]
    if int(info if one else info.amax()) != 0:
        return None
    if one:
        top = max(diag)
        H = A.mul_(0.5 / top)
        H.diagonal().copy_(d).mul_((1 + REG) / top)
        return Prepared(H, torch.full((), top, dtype=G.dtype), None, None)
    s = d.amax(-1, keepdim=True)  # [..., 1]
    H = A.mul_((0.5 / s).unsqueeze(-1))
    H.diagonal(dim1=-2, dim2=-1).copy_(d * ((1 + REG) / s))
    return Prepared(H, s.squeeze(-1), None, None)


def min_norm(w: Tensor, prep: Prepared) -> Tensor:
    """The weights ``[..., k]`` of least norm (in units of each task's norm) with the direction of ``w``.

    Moving weights along the null space of the correlation matrix leaves the direction unchanged; the QPs
    leave there whatever the ridge ``δ`` picked (up to ``1/√δ``), which summed against a float32 ``J`` would
    cost digits.
    """
    if prep.null is None or prep.D is None:
        return w
    y = w * prep.D
    return (y - (y.unsqueeze(-2) @ prep.null).squeeze(-2)) / prep.D


def status(r: Tensor, stationary: Tensor | None = None) -> Tensor:
    """:class:`Status` codes ``[...]`` (int8): NOT_CONVERGED where the residual ``r`` exceeds
    :data:`RESIDUAL_TOL`, else STATIONARY where ``stationary``, else OK.  (Non-finite input is the caller's:
    :meth:`GramSolver.solve`.)"""
    converged = r <= RESIDUAL_TOL  # NaN: not converged
    if stationary is None:
        return (~converged).to(torch.int8) * int(Status.NOT_CONVERGED)
    # three ops (these run on every call, at every size): STATIONARY is 1, so the bool is the code
    return torch.where(converged, stationary.to(torch.int8), int(Status.NOT_CONVERGED))


def zero_direction(G: Tensor, w: Tensor) -> Tensor:
    """Where the direction ``wᵀJ`` is 0 ``[...]``: ``wᵀGw ≤ 2δ max diag G`` (the ridge's level; all of it when
    every task gradient is 0).  Those problems are Pareto-stationary: the exact answer is 0."""
    norm2 = torch.linalg.vecdot(w, (G @ w.unsqueeze(-1)).squeeze(-1))
    return norm2 <= 2 * REG * G.diagonal(dim1=-2, dim2=-1).amax(-1)
