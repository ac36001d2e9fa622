"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232; reference code
TorchJD).  The dual cone ``{x : J x ≥ 0}`` holds the directions that conflict with no task.  By their
Proposition 1 the projection of ``Jᵀu`` onto it is ``Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv``: a small QP on the
Gram matrix, solved here for all projections at once by :mod:`._qp` (``v = u + x``, ``x ≥ 0``): exactly,
by enumerating the faces for small problems (UPGrad up to k = 8, DualProj up to k = 10), beyond by the
batched active-set method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver
from ._qp import check_iters, nonneg_qp, prepare

__all__ = ["UPGrad", "DualProj", "project_weights"]


def project_weights(G: Tensor, U: Tensor, iters: int | None = None) -> Tensor:
    """``V`` ``[..., m, k]`` with ``V_i = argmin_{v ≥ U_i} vᵀGv``: ``Jᵀ V_i`` is the projection of ``Jᵀ U_i``.

    ``G`` ``[..., k, k]``, ``U`` ``[..., m, k]``.  KKT: ``v ≥ u``, ``G v ≥ 0``, ``(G v)_j (v_j − u_j) = 0``.
    """
    H, _ = prepare(G)
    # c = H u: the objective ½(u + x)ᵀH(u + x) in x, up to a constant
    return U + nonneg_qp(H, U @ H, iters)


class _DualCone(GramSolver):
    """What UPGrad and DualProj share: the iteration cap of their box QPs."""

    def __init__(self, *, iters: int | None = None) -> None:
        check_iters(type(self).__name__, iters)
        self.iters = iters

    def _hparams(self) -> dict[str, Any]:
        return {} if self.iters is None else {"iters": self.iters}


class UPGrad(_DualCone):
    r"""The mean of the task gradients, each projected onto the dual cone of all of them.

    .. math::  d = \frac{1}{k} \sum_i \pi_J(g_i), \quad \pi_J(g_i) = J^\top v_i, \quad
               v_i = \arg\min_{v \ge e_i} v^\top G v, \qquad w = \tfrac{1}{k} \textstyle\sum_i v_i .

    Quinton & Rey 2024 (UPGrad with TorchJD's default mean preference, ``U = I/k``).  Non-conflicting:
    ``J d ≥ 0``.  The ``k`` box QPs share ``G`` and run as one batch.  TorchJD solves each one with
    ``quadprog`` on the CPU after regularising ``G``; we solve them exactly (see :mod:`._qp`).
    ``k = 1`` returns the gradient.

    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> UPGrad()(J)
    tensor([0.2500, 0.7500])
    """

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        k = G.shape[-1]
        U = torch.eye(k, dtype=G.dtype, device=G.device).expand(*G.shape[:-2], k, k)
        return project_weights(G, U, self.iters).mean(-2)


class DualProj(_DualCone):
    r"""The mean gradient projected onto the dual cone of the task gradients.

    .. math::  d = \pi_J(\bar g) = J^\top w, \qquad w = \arg\min_{v \ge \mathbf{1}/k} v^\top G v .

    Quinton & Rey 2024 (DualProj with the mean preference).  Non-conflicting: ``J d ≥ 0``; equals the
    mean when no task conflicts with it.  ``k = 1`` returns the gradient.

    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> DualProj()(J)
    tensor([0.0000, 0.5000])
    """

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        k = G.shape[-1]
        u = torch.full_like(G[..., :1, :], 1.0 / k)
        return project_weights(G, u, self.iters).squeeze(-2)
