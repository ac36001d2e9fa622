"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232; reference code
TorchJD).  The dual cone ``{x : J x ≥ 0}`` holds the directions that conflict with no task.  By their
Proposition 1 the projection of ``Jᵀu`` onto it is ``Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv``: a small QP on the
Gram matrix, solved here for all projections at once by :mod:`._qp` (``v = u + x``, ``x ≥ 0``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, Status
from ._qp import Prepared, check_iters, min_norm, nonneg_qp, prepare, status, zero_direction
from ._qp_host import on_host

__all__ = ["UPGrad", "DualProj", "project_weights"]


def _project(
    G: Tensor, U: Tensor | None, iters: int | None, precision: torch.dtype, host: bool, prep: Prepared | None = None
) -> tuple[Tensor, Tensor, Prepared]:
    """``(V, r, prepared)`` for the rows of ``U`` (None: the identity, UPGrad's ``k`` problems)."""
    prep = prepare(G, precision, host) if prep is None else prep
    # c = H u: the objective ½(u + x)ᵀH(u + x) in x, up to a constant (c = H for U = I: H is symmetric)
    x, r = nonneg_qp(prep.H, prep.H if U is None else U @ prep.H, iters, host)
    if U is None:
        x.diagonal(dim1=-2, dim2=-1).add_(1.0)  # V = I + X, in place on the fresh X
        return x, r, prep
    return U + x, r, prep


def project_weights(G: Tensor, U: Tensor, iters: int | None = None) -> Tensor:
    """``V`` ``[..., m, k]`` with ``V_i = argmin_{v ≥ U_i} vᵀGv``: ``Jᵀ V_i`` is the projection of ``Jᵀ U_i``.

    ``G`` ``[..., k, k]``, ``U`` ``[..., m, k]``.  KKT: ``v ≥ u``, ``G v ≥ 0``, ``(G v)_j (v_j − u_j) = 0``.
    """
    return _project(G, U, iters, G.dtype, on_host(G, U))[0]


def _no_conflict(G: Tensor, U: Tensor | None, prep: Prepared) -> Tensor | None:
    """The weights ``mean(U)`` of one problem on the host where no combination ``Jᵀu`` conflicts with a task (``Hu
    ≥ 0`` for every row: ``x = 0`` solves every box QP, with residual exactly 0) and :func:`prepare` cut nothing
    (so they are the weights of least norm); None elsewhere.  :func:`._qp.nonneg_qp`'s first test, in a few ops."""
    if prep.null is not None:
        return None
    c = prep.H if U is None else U @ prep.H  # c = H u, row by row (H is symmetric)
    if not c.min().item() >= 0:
        return None
    k = G.shape[-1]
    return torch.full((k,), 1.0 / k, dtype=G.dtype) if U is None else U.mean(-2)


def _two_tasks(H: Tensor, U: Tensor | None) -> Tensor:
    """The weights ``mean(U + X)`` ``[..., 2]`` for two tasks in closed form: ``x = max(0, −c/diag H)`` entrywise
    for each row ``u ≥ 0`` (``c = H u``).

    Exact: ``uᵀc = uᵀHu ≥ 0`` leaves at most one ``c_j`` negative; raising ``x_j`` to ``−c_j/h_jj`` zeroes that
    multiplier and leaves the other at ``c_i − h_ij c_j/h_jj = u_i det H / h_jj ≥ 0``.  (UPGrad's ``u = e_i``:
    projecting ``g_i`` adds ``max(0, −h₁₂)/h_jj`` of its partner; DualProj's ``u = ½1``.)
    """
    h = H.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    if U is None:
        return 0.5 + 0.5 * (-H / h).clamp(min=0.0).sum(-2)  # the diagonal's −1 clamps to 0
    return (U + (-(U @ H) / h).clamp(min=0.0)).mean(-2)


class _DualCone(GramSolver):
    """What UPGrad and DualProj share: the box QPs ``v ≥ u`` for the rows ``u`` of :meth:`_preferences`."""

    def __init__(self, *, iters: int | None = None) -> None:
        check_iters(type(self).__name__, iters)
        self.iters = iters

    @abstractmethod
    def _preferences(self, G: Tensor) -> Tensor | None:
        """The rows ``u`` ``[..., m, k]`` whose combinations ``Jᵀu`` are projected (None: the identity)."""

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        host = on_host(G)
        prep = None
        if host and G.ndim == 2 and G.shape[-1] > 1 and self.iters is None:
            prep = prepare(G, precision, host)
            w = _no_conflict(G, self._preferences(G), prep)
            if w is not None:
                code = int(Status.STATIONARY) if zero_direction(G, w) else int(Status.OK)
                r = torch.zeros((), dtype=G.dtype)
                return Solution(w, torch.full((), code, dtype=torch.int8), r, torch.diag_embed(w) if mixing else None)
        if G.shape[-1] == 1:  # a shape, not a value: no host sync
            w, r = torch.ones_like(G[..., 0]), torch.zeros_like(G[..., 0, 0])
        elif G.shape[-1] == 2 and self.iters is None and type(self)._preferences in _NONNEGATIVE:
            prep = prepare(G, precision, host) if prep is None else prep  # closed form: residual 0, as for any
            w, r = min_norm(_two_tasks(prep.H, self._preferences(G)), prep), torch.zeros_like(G[..., 0, 0])
        else:
            V, r, prep = _project(G, self._preferences(G), self.iters, precision, host, prep)
            # the mean of the projections, as the weights of least norm that give its direction
            w, r = min_norm(V.mean(-2), prep), r.amax(-1)
        return Solution(w, status(r, zero_direction(G, w)), r, torch.diag_embed(w) if mixing else None)

    def _hparams(self) -> dict[str, Any]:
        return {} if self.iters is None else {"iters": self.iters}


class UPGrad(_DualCone):
    r"""The mean of the task gradients, each projected onto the dual cone of all of them.

    .. math::  d = \frac{1}{k} \sum_i \pi_J(g_i), \quad \pi_J(g_i) = J^\top v_i, \quad
               v_i = \arg\min_{v \ge e_i} v^\top G v, \qquad w = \tfrac{1}{k} \textstyle\sum_i v_i .

    Quinton & Rey 2024 (UPGrad with TorchJD's default mean preference, ``U = I/k``).  Non-conflicting:
    ``J d ≥ 0``.  The ``k`` box QPs share ``G`` and run as one batch, solved exactly (see :mod:`._qp`), where
    TorchJD regularises ``G`` by 1e-4 before its QP.  Among the weights giving ``d`` (many, when the task
    gradients are linearly dependent) the ones of least norm are returned.  ``k = 1`` returns the gradient;
    ``k = 2`` is solved in closed form (projecting ``g_i`` adds ``max(0, −g₁·g₂)/‖g_j‖²`` of its partner ``g_j``).
    Status STATIONARY where ``d = 0`` (e.g. an antiparallel pair), NOT_CONVERGED where a QP's residual is
    over its tolerance (the weights are then the last iterate).

    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> UPGrad()(J)
    tensor([0.2500, 0.7500])
    """

    def _preferences(self, G: Tensor) -> Tensor | None:
        return None


class DualProj(_DualCone):
    r"""The mean gradient projected onto the dual cone of the task gradients.

    .. math::  d = \pi_J(\bar g) = J^\top w, \qquad w = \arg\min_{v \ge \mathbf{1}/k} v^\top G v .

    Quinton & Rey 2024 (DualProj with the mean preference).  Non-conflicting: ``J d ≥ 0``; equals the
    mean when no task conflicts with it.  The weights of least norm that give ``d`` are returned.  ``k = 1``
    returns the gradient; ``k = 2`` is solved in closed form.  Status as for :class:`UPGrad`.

    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> DualProj()(J)
    tensor([0.0000, 0.5000])
    """

    def _preferences(self, G: Tensor) -> Tensor | None:
        return torch.full_like(G[..., :1, :], 1.0 / G.shape[-1])


#: the preferences whose rows are nonnegative, for which :func:`_two_tasks` is exact (a subclass with others
#: takes the QPs)
_NONNEGATIVE = (UPGrad._preferences, DualProj._preferences)
