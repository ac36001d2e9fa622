"""PCGrad: project each task gradient off the gradients it conflicts with, in coefficient space.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020
(Algorithm 1).  Every projected gradient is a combination of the original ones, ``g_i^PC = Σ_j W_ij g_j``,
so the whole method runs on the ``k × k`` coefficients ``W`` and the Gram matrix: the inner products it
needs are ``g_i^PC · g_p = (W G)_ip`` and ``‖g_p‖² = G_pp``.  Tasks are independent of each other (each
projects against the *original* gradients), so round ``r`` moves every task against its ``r``-th partner at
once: ``k − 1`` batched rounds of ``O(k²)`` work, equal to the sequential loop for the same orders.

:func:`random_orders` (one random order of the other tasks per task) is shared with GradVac.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver

__all__ = ["PCGrad", "partner_indices", "project_conflicts", "random_orders"]


def random_orders(
    batch_shape: tuple[int, ...], k: int, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """For each task, a uniformly random order of the *other* tasks: ``[*batch_shape, k, k - 1]`` (int64).

    Row ``i`` lists the tasks ``j ≠ i``; each batch element and each task get an independent draw.  Drawn
    as the argsort of uniform keys with the diagonal pushed last (one batched op: no Python loop, and it
    traces under ``torch.compile`` when ``generator`` is None).
    """
    where = generator.device if generator is not None else device
    keys = torch.rand(*batch_shape, k, k, generator=generator, device=where, dtype=torch.float64)
    keys = keys + 2.0 * torch.eye(k, dtype=torch.float64, device=where)  # keys < 1: self sorts last
    return keys.argsort(dim=-1)[..., : k - 1].to(device if device is not None else where)


def partner_indices(orders: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Gather / scatter indices of every round's partners at once, for orders ``[..., k, k − 1]``:
    ``cols`` ``[..., k − 1, k, 1]`` (task i's partner in round r) and ``rows`` ``[..., k − 1, k, k]`` (that
    index repeated along a row, to gather the partner's row of ``G``)."""
    cols = orders.mT.unsqueeze(-1)
    return cols, cols.expand(*cols.shape[:-1], k)


def project_conflicts(G: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's coefficients ``W`` ``[..., k, k]`` (projected gradients ``W J``) for given partner orders.

    ``G`` ``[..., k, k]`` is the Gram matrix, ``orders`` ``[..., k, k - 1]`` the order in which each task
    visits the others (see :func:`random_orders`).  Start from ``W = I``; in round ``r`` every task ``i``
    with partner ``p = orders[i, r]`` does ``W[i] -= min((W G)[i, p], 0) / G[p, p] · e_p``.  A zero partner
    (``G[p, p] = 0``) is skipped: it cannot conflict.  Sync-free: ``k - 1`` fixed rounds, ``torch.where``.
    """
    k = G.shape[-1]
    W = torch.eye(k, dtype=G.dtype, device=G.device) + torch.zeros_like(G)  # zeros_like: batched under vmap
    # Everything that does not depend on W is taken for all rounds at once (round r reads column r):
    # 1/‖g_p‖² of every partner, 0 for a zero partner (torch.where: no NaN, no host sync), and the indices.
    norm2 = G.diagonal(dim1=-2, dim2=-1).unsqueeze(-2).expand_as(G).gather(-1, orders)  # [..., k, k - 1]
    inv = torch.where(norm2 > 0, -1.0 / torch.where(norm2 > 0, norm2, 1.0), 0.0).mT  # [..., k - 1, k]
    cols, rows = partner_indices(orders, k)
    for r in range(k - 1):
        dot = (W * G.gather(-2, rows[..., r, :, :])).sum(-1)  # g_i^PC · g_p
        W = W.scatter_add(-1, cols[..., r, :, :], (dot.clamp(max=0.0) * inv[..., r, :]).unsqueeze(-1))
    return W


class PCGrad(GramSolver):
    r"""Projecting conflicting gradients: each ``g_i`` loses its component along every ``g_j`` it conflicts with.

    For each task ``i``, in a random order of the other tasks ``j`` (Yu et al., NeurIPS 2020, Alg. 1):

    .. math::  g_i^{PC} \leftarrow g_i^{PC} - \frac{\min(g_i^{PC}\cdot g_j,\ 0)}{\|g_j\|^2}\, g_j,
               \qquad d = \sum_i g_i^{PC}.

    Choices where implementations disagree, following the paper: the direction is the **sum** of the
    projected gradients (Pytorch-PCGrad defaults to their mean); a task never projects on itself (some
    implementations shuffle it in, which changes the result once ``g_i^{PC} · g_i < 0``); projections are
    onto the **original** ``g_j``.  Each task draws its own order (:func:`random_orders`) anew at every call,
    from ``generator`` (reproducible; its state is checkpointed by :meth:`state_dict`) or from the global RNG
    when it is None, which is the form ``torch.compile`` can trace.  A zero ``g_j`` is skipped; all-zero
    input gives 0.  ``k = 1`` returns the gradient; for ``k = 2`` the direction conflicts with neither task.
    Gram-space: the mixing matrix is the coefficient matrix ``W`` (:func:`project_conflicts`, which takes
    the orders explicitly: the form to use under ``torch.func.vmap``, where a random draw needs
    ``randomness=``).  It matches the sequential loop for the same orders to round-off.

    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> PCGrad()(J)  # g1 → (0.5, 0.5), g2 → (0, 1)
    tensor([0.5000, 1.5000])
    """

    deterministic = False

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def _draw_orders(self, G: Tensor) -> Tensor:
        return random_orders(tuple(G.shape[:-2]), G.shape[-1], self.generator, G.device)

    def _mixing(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return project_conflicts(G, self._draw_orders(G))

    def _hparams(self) -> dict[str, Any]:
        return {"generator": self.generator} if self.generator is not None else {}
