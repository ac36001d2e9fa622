"""Composition of solvers: apply them in turn to the task gradients, then sum.

``Compose(a, b, c)`` maps ``J → a.apply(J) → b.apply(·) → c.apply(·)`` and returns the sum of the final task
gradients (the torchmoo convention the paper uses, e.g. ``GradNorm`` then ``PCGrad``).  When every member is
a Gram-space solver the composition stays in Gram space: with mixing matrices ``M₁, M₂, …`` computed on the
successive Grams ``G_{i+1} = M_i G_i M_iᵀ``, the total mixing matrix is ``… M₂ M₁`` and ``w = 1ᵀ(… M₂ M₁)``:
one pass to form ``G``, ``k × k`` products, one pass to combine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, Solver, _check_gram, _check_jacobian, solve_dtype

__all__ = ["Compose"]


class Compose(GramSolver):
    """Apply ``solvers`` in turn to the task gradients; the direction is the sum of the last ones.

    Its capabilities follow the members: ``gram_space`` (and :meth:`solve` / :meth:`weights` /
    :meth:`mixing`) exactly when every member is Gram-space, ``stateless`` / ``deterministic`` when every
    member is.  The precision of ``J`` reaches every member; the status of a solve is the worst of the
    members' (their maximum), and so is the residual.  :meth:`for_block` composes the members' own blocks.

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
        self.stateless = all(s.stateless for s in solvers)
        self.deterministic = all(s.deterministic for s in solvers)

    def for_block(self, key: int) -> Solver:
        """The composition of every member's solver for block ``key`` (itself when stateless); the per-block
        state lives in the members, so their :meth:`state_dict` carries it."""
        if self.stateless:
            return self
        return Compose(*(s.for_block(key) for s in self.solvers))

    def _require_gram(self) -> None:
        if not self.gram_space:
            names = [type(s).__name__ for s in self.solvers if not s.gram_space]
            raise TypeError(
                f"Compose has members that need coordinates ({', '.join(names)}); it has no Gram-space form"
            )

    def solve(
        self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None, mixing: bool = False
    ) -> Solution:
        self._require_gram()
        _check_gram(G, "Compose")
        # no sanitising here: each member's solve sees the non-finite problems itself (NaN mixing matrices carry
        # them on), marks them NONFINITE and leaves its kept state for them as it was
        precision = G.dtype if precision is None else precision
        return self._solve(G.to(solve_dtype(G.dtype)), losses=losses, precision=precision, mixing=mixing)

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        total = status = residual = None
        for s in self.solvers:
            assert isinstance(s, GramSolver)
            sol = s.solve(G, losses=losses, precision=precision, mixing=True)
            M = sol.mixing
            assert M is not None
            G = M @ G @ M.mT
            G = (G + G.mT) * 0.5  # symmetric for the next member (M G Mᵀ is, up to round-off)
            total = M if total is None else M @ total
            status = sol.status if status is None else torch.maximum(status, sol.status)
            residual = sol.residual if residual is None else torch.maximum(residual, sol.residual)
        assert total is not None and status is not None and residual is not None
        return Solution(total.sum(-2), status, residual, total if mixing else None)

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        if self.gram_space:
            return super().__call__(J, losses=losses, **context)
        _check_jacobian(J, "Compose")
        return self._apply(J, losses=losses, **context).sum(-2)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        if self.gram_space:
            return super()._apply(J, losses=losses, **context)
        for s in self.solvers:
            J = s.apply(J, losses=losses, **context)
        return J

    def _state_dict(self) -> dict[str, Any]:
        return {str(i): s.state_dict() for i, s in enumerate(self.solvers)}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {str(i) for i in range(len(self.solvers))}:
            raise ValueError(f"Compose of {len(self.solvers)} solvers got state for members {sorted(state)}")
        for i, s in enumerate(self.solvers):
            s.load_state_dict(state[str(i)])

    def _reset(self) -> None:
        for s in self.solvers:
            s.reset()

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.solvers))})"
