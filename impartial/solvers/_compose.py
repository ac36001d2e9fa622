"""Composition of solvers: apply them in turn to the task gradients, then sum.

``Compose(a, b, c)`` maps ``J → a.apply(J) → b.apply(·) → c.apply(·)`` and returns the sum of the final task
gradients (the torchmoo convention the paper uses, e.g. ``GradNorm`` then ``PCGrad``).  When every member is
a Gram-space solver the composition stays in Gram space: with mixing matrices ``M₁, M₂, …`` computed on the
successive Grams ``G_{i+1} = M_i G_i M_iᵀ``, the total mixing matrix is ``… M₂ M₁`` and ``w = 1ᵀ(… M₂ M₁)``:
one pass to form ``G``, ``k × k`` products, one pass to combine.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._base import GramSolver, Solver, _check_jacobian, combine, gram, mix

__all__ = ["Compose"]


class Compose(GramSolver):
    """Apply ``solvers`` in turn to the task gradients; the direction is the sum of the last ones.

    ``gram_space`` is true (and :meth:`weights` / :meth:`mixing` exist) exactly when every member is a
    Gram-space solver.

    >>> import torch
    >>> from impartial.solvers import Mean, Sum
    >>> Compose(Mean(), Sum())(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    tensor([1., 2.])
    """

    def __init__(self, *solvers: Solver) -> None:
        if not solvers:
            raise ValueError("Compose needs at least one solver")
        for i, s in enumerate(solvers):
            if not isinstance(s, Solver):
                raise TypeError(f"Compose: argument {i} is a {type(s).__name__}, not a Solver")
        self.solvers = tuple(solvers)
        self.gram_space = all(s.gram_space for s in solvers)

    def _require_gram(self) -> None:
        if not self.gram_space:
            names = [type(s).__name__ for s in self.solvers if not s.gram_space]
            raise TypeError(f"Compose has members that need coordinates ({', '.join(names)}); it has no Gram-space form")

    def _mixing(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        self._require_gram()
        total = None
        for s in self.solvers:
            M = s._mixing(G, losses=losses)
            G = M @ G @ M.mT
            total = M if total is None else M @ total
        return total

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return self._mixing(G, losses=losses).sum(-2)

    def weights(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        self._require_gram()
        return super().weights(G, losses=losses)

    def mixing(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        self._require_gram()
        return super().mixing(G, losses=losses)

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, "Compose")
        if self.gram_space:
            return combine(self._weights(gram(J), losses=losses), J)
        return self._apply(J, losses=losses, **context).sum(-2)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        if self.gram_space:
            return mix(self._mixing(gram(J), losses=losses), J)
        for s in self.solvers:
            J = s.apply(J, losses=losses, **context)
        return J

    def state_dict(self) -> dict[str, Any]:
        return {str(i): s.state_dict() for i, s in enumerate(self.solvers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {str(i) for i in range(len(self.solvers))}:
            raise ValueError(f"Compose of {len(self.solvers)} solvers got state for members {sorted(state)}")
        for i, s in enumerate(self.solvers):
            s.load_state_dict(state[str(i)])

    def reset(self) -> None:
        for s in self.solvers:
            s.reset()

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.solvers))})"
