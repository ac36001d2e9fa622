"""The baselines: :class:`Sum` (plain ``backward``), :class:`Mean`, and :class:`Random` weighting (RLW).

``Sum`` is ``w = 1`` (what ``sum(losses).backward()`` does); ``Mean`` is ``w = 1/k``.  ``Random`` is RLW
(Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022): each call draws
``w = softmax(ε)``, ``ε ~ N(0, I_k)``, independently for every batch element.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, _check_jacobian, combine, solve_dtype

__all__ = ["Mean", "Random", "Sum"]


class Sum(GramSolver):
    """The plain sum of task gradients, ``w = 1``: what ``sum(losses).backward()`` computes.

    >>> Sum()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    tensor([1., 2.])
    """

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return torch.ones_like(G[..., 0])

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, "Sum")
        return J.sum(-2)  # the weights need no Gram: one pass over J


class Mean(GramSolver):
    """The mean of task gradients, ``w = 1/k``.

    >>> Mean()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    tensor([0.5000, 1.0000])
    """

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return torch.full_like(G[..., 0], 1.0 / G.shape[-1])

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, "Mean")
        return J.mean(-2)  # the weights need no Gram: one pass over J


class Random(GramSolver):
    """Random loss weighting (RLW): ``w = softmax(ε)``, ``ε ~ N(0, I_k)``, drawn anew at every call.

    Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022.  Weights sum to 1, so k = 1 returns the gradient.  Pass a ``torch.Generator`` for
    reproducible draws; each batch element gets its own draw.  ``ε`` is drawn in :func:`solve_dtype` (float64
    for a float32 or half-precision ``J``, like every solver's ``k × k`` work), so a float32 and a float64 run
    with the same generator draw the same weights.  ``torch.compile`` cannot trace a ``torch.Generator``:
    compiled code uses ``generator=None`` (the global RNG, seeded by ``torch.manual_seed``).

    >>> g = torch.Generator().manual_seed(0)
    >>> Random(generator=g).weights(torch.eye(3)).sum().item()
    1.0
    """

    deterministic = False

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def _draw(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        eps = torch.randn(shape, generator=self.generator, dtype=dtype, device=device)
        return torch.softmax(eps, dim=-1)

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return self._draw(G.shape[:-1], G.dtype, G.device)

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, "Random")
        # the same draw as weights(J Jᵀ) (same shape and dtype), without forming the Gram
        return combine(self._draw(J.shape[:-1], solve_dtype(J.dtype), J.device), J)

    def _hparams(self) -> dict[str, Any]:
        return {"generator": self.generator}
