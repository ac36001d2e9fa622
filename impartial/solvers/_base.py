"""The solver protocol: what a solver maps, what it returns, what it declares and how it keeps state.

A *solver* maps the task gradients of one block, ``J`` of shape ``[..., k, d]`` (``k`` tasks, ``d``
coordinates, any leading batch dims of independent problems), to one update direction ``[..., d]``.  Most
methods are *linear in J*: the direction is ``wᵀJ`` with weights ``w = f(G)`` of the Gram matrix
``G = J Jᵀ`` ``[..., k, k]``.  Those subclass :class:`GramSolver`; a call costs one pass over ``J`` to form
``G`` (:func:`gram`), an ``O(k³)`` problem on ``G`` in :func:`solve_dtype`, and one pass to combine.  The few
methods that need coordinates (GradDrop) subclass :class:`Solver` and implement ``_apply`` on ``J``.

**Solutions.** :meth:`GramSolver.solve` returns a :class:`Solution`: the weights, a :class:`Status` per
problem (read only when reported: no host sync), the method's residual and, when asked, the *mixing matrix*
``M`` (new task gradients ``M J``; ``diag(w)`` for a weighting method, PCGrad's projection coefficients),
which :class:`~impartial.solvers.Compose` chains.  A direction that is 0 because the tasks are
Pareto-stationary says ``STATIONARY``; an iterative method that ran out of budget says ``NOT_CONVERGED``
(and returns its last iterate, never a silent 0).  ``weights``, ``mixing``, ``__call__`` and ``apply`` all
go through ``solve``; subclasses override ``_solve`` (or, for closed forms, ``_weights`` / ``_mixing``).

**Precision.** ``solve(G, precision=...)`` takes the dtype of the ``J`` that ``G`` came from: ``G`` is
float64 for a float32 ``J``, but rank and convergence cut-offs must follow the precision of ``J``.

**Non-finite input.** A problem whose ``G`` (or ``losses``) holds a NaN or an infinity gets NaN weights and
status ``NONFINITE``, for every solver and with no host sync; its kept state, if any, stays as it was.

**Capabilities.** ``gram_space`` (the direction depends on ``J`` only through ``G``), ``stateless`` (keeps
nothing between calls: safe to rebuild at every call and to share between blocks), ``deterministic`` (no
random draws) and the derived ``batchable`` (a batch of independent problems may share one call).

**State per block.** As ``torch.optim`` keeps state per parameter, a stateful solver keeps it per block:
``solver.for_block(key)`` returns the solver serving block ``key``, a child created at first use with fresh
state that shares the hyperparameters and the random generator (the draws form one sequence, as for one
solver).  A stateless solver returns itself.  A direct call on the parent uses the parent's own state.
``state_dict()`` holds the parent's state, the generator's once, and every child's under ``"blocks"``;
``load_state_dict`` into a freshly built solver restores them all, so training resumes bit-identically;
``reset()`` forgets them all.  Subclasses keep their per-problem state through ``_state_dict``,
``_load_state_dict`` and ``_reset``; a solver that draws stores its generator as ``self.generator``.

Extra context a few methods need is passed by keyword: ``losses`` ``[..., k]`` (the current task losses,
used by loss-based GradNorm) and, for GradDrop, ``inputs`` (the block's input activations).
"""

from __future__ import annotations

import copy
import operator
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ._gram import combine, gram, mix, solve_dtype, sync_free
from ._solution import (
    Solution,
    Status,
    _all_finite,
    _check_gram,
    _check_jacobian,
    _nonfinite,
    closed_form,
    is_low,
    keep_where,
    nonfinite_problems,
    weighting_solution,
)

__all__ = [
    "GramSolver",
    "Solution",
    "Solver",
    "Status",
    "closed_form",
    "combine",
    "gram",
    "is_low",
    "keep_where",
    "mix",
    "nonfinite_problems",
    "solve_dtype",
    "sync_free",
    "weighting_solution",
]


class Solver(ABC):
    """A gradient-conflict solver: task gradients ``J [..., k, d]`` → one direction ``[..., d]``.

    Subclasses implement :meth:`_apply` (new task gradients whose sum is the direction).  Hyperparameters are
    constructor arguments; mutable state is explicit (:meth:`state_dict`), kept per block (:meth:`for_block`).
    """

    #: whether the direction depends on ``J`` only through ``G = J Jᵀ`` (then ``solve`` and ``weights`` exist)
    gram_space: bool = False
    #: whether the solver keeps nothing between calls (then one instance may serve any number of blocks,
    #: and it may be rebuilt at every call, e.g. given by name)
    stateless: bool = True
    #: whether equal inputs give equal outputs (no random draws)
    deterministic: bool = True
    #: the generator of a solver that draws (None: the global RNG, or no draws); shared with its children
    generator: torch.Generator | None = None

    @property
    def batchable(self) -> bool:
        """Whether a batch of independent problems may share one call (stateless and deterministic)."""
        return self.stateless and self.deterministic

    def for_block(self, key: int) -> Solver:
        """The solver that serves block ``key``: itself when stateless, else a child with its own state, created
        at first use (same hyperparameters and generator, fresh state) and kept in :meth:`state_dict`."""
        key = operator.index(key)
        if self.stateless:
            return self
        blocks = self.__dict__.setdefault("_blocks", {})
        if key not in blocks:
            blocks[key] = self._spawn()
        return blocks[key]

    def _spawn(self) -> Solver:
        """A solver with this one's hyperparameters and generator, and fresh state."""
        child = copy.copy(self)
        child.__dict__.pop("_blocks", None)
        child._reset()
        return child

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        """The update direction ``[..., d]`` for task gradients ``J`` ``[..., k, d]``."""
        _check_jacobian(J, type(self).__name__)
        return self._apply(J, losses=losses, **context).sum(-2)

    def apply(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        """The task gradients after this method, ``[..., k, d]``; their sum is the direction."""
        _check_jacobian(J, type(self).__name__)
        return self._apply(J, losses=losses, **context)

    @abstractmethod
    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]:
        """The mutable state: per-problem state, the generator's state, and every block's (``"blocks"``)."""
        state = self._state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        blocks = self.__dict__.get("_blocks")
        if blocks:  # the children share the generator: its state is kept once, above
            state["blocks"] = {
                key: {n: v for n, v in child.state_dict().items() if n != "generator"} for key, child in blocks.items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the blocks' states included)."""
        state = dict(state)
        rng, blocks = state.pop("generator", None), state.pop("blocks", None)
        name = type(self).__name__
        if rng is not None and self.generator is None:
            raise ValueError(f"{name} draws from the global RNG (or not at all); it cannot load a generator state")
        if blocks and self.stateless:
            raise ValueError(
                f"{name} is stateless: it keeps no per-block state, but got some for blocks {sorted(blocks)}"
            )
        self._load_state_dict(state)
        self.__dict__.pop("_blocks", None)
        for key, child_state in (blocks or {}).items():
            self.for_block(key).load_state_dict(child_state)
        if rng is not None and self.generator is not None:
            self.generator.set_state(rng)

    def reset(self) -> None:
        """Forget all mutable state, the blocks' included (the generator is left as it is)."""
        self._reset()
        self.__dict__.pop("_blocks", None)

    def _state_dict(self) -> dict[str, Any]:
        """This solver's own per-problem state (tensors detached); empty when it keeps none."""
        return {}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got state with keys {sorted(state)}")

    def _reset(self) -> None:  # noqa: B027 -- a hook with a no-op default, overridden by stateful solvers
        """Forget this solver's own per-problem state."""

    def _hparams(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"


class GramSolver(Solver):
    """A solver whose direction is ``wᵀJ`` with weights ``w = f(G)`` of the Gram matrix alone.

    Subclasses override :meth:`_solve` (status and residual of their own), or, for a closed form,
    :meth:`_weights` and, where the new task gradients are not ``diag(w) J`` (PCGrad, GradVac), :meth:`_mixing`.
    """

    gram_space = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a closed form below a solver whose _solve computes the weights itself would never be called: say so now
        own = sorted({"_weights", "_mixing"} & set(vars(cls)))
        base = next(b for b in cls.__mro__ if "_solve" in vars(b))
        if own and base is not cls and base is not GramSolver:
            raise TypeError(
                f"{cls.__name__} overrides {' and '.join(own)}, which {base.__name__}._solve never calls "
                "(it computes the weights and the status itself): override _solve instead"
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> GramSolver:  # noqa: PYI034
        if cls is GramSolver:  # abstract, though every hook has a default: only its subclasses are methods
            raise TypeError("GramSolver is a base class: subclass it and override _solve (or _weights / _mixing)")
        return super().__new__(cls)

    def solve(
        self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None, mixing: bool = False
    ) -> Solution:
        """Weights, status and residual (and the mixing matrix when ``mixing``) for ``G = J Jᵀ`` ``[..., k, k]``;
        ``precision`` is the dtype of the ``J`` that ``G`` came from (None: ``G.dtype``)."""
        _check_gram(G, type(self).__name__)
        precision = G.dtype if precision is None else precision
        if G.dtype != solve_dtype(G.dtype):
            G = G.to(solve_dtype(G.dtype))
        if G.shape[:-2].numel() == 0:  # an empty batch (a shape, not a value): nothing to solve, no reduction to fail
            w = G.new_zeros(G.shape[:-1])
            code = torch.zeros(G.shape[:-2], dtype=torch.int8, device=G.device)
            return Solution(w, code, G.new_zeros(G.shape[:-2]), torch.zeros_like(G) if mixing else None)
        if not sync_free(G) and _all_finite(G) and (losses is None or _all_finite(losses)):
            # on the CPU, not traced, a host read is free: all finite (the usual case) needs no masking
            return self._solve(G, losses=losses, precision=precision, mixing=mixing)
        finite = G.isfinite().all(-1).all(-1)
        if losses is not None:
            finite = finite & losses.isfinite().all(-1)
            losses = torch.where(losses.isfinite(), losses, 1.0)
        # a non-finite problem is solved on the identity (no eigh failure, no sync), then its answer is NaN
        G = torch.where(finite[..., None, None], G, torch.eye(G.shape[-1], dtype=G.dtype, device=G.device))
        return _nonfinite(self._solve(G, losses=losses, precision=precision, mixing=mixing), finite)

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        """The override point of :meth:`solve` (``G`` finite, in :func:`solve_dtype`): by default the weights (or
        the mixing matrix) of a closed-form method, status OK.  Iterative methods return their own status."""
        if mixing:
            M = self._mixing(G, losses=losses)
            return closed_form(M.sum(-2), G, M)
        return closed_form(self._weights(G, losses=losses), G)

    def weights(self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None) -> Tensor:
        """Weights ``w`` ``[..., k]`` such that the direction is ``wᵀJ`` for ``G = J Jᵀ`` ``[..., k, k]``."""
        return self.solve(G, losses=losses, precision=precision).weights

    def mixing(self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None) -> Tensor:
        """Mixing matrix ``M`` ``[..., k, k]``: the method's new task gradients are ``M J``, and ``w = 1ᵀM``."""
        M = self.solve(G, losses=losses, precision=precision, mixing=True).mixing
        assert M is not None
        return M

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        if type(self)._mixing is GramSolver._mixing:
            raise NotImplementedError(f"{type(self).__name__} implements none of _solve, _weights and _mixing")
        return self._mixing(G, losses=losses).sum(-2)

    def _mixing(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return torch.diag_embed(self._weights(G, losses=losses))

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, type(self).__name__)
        return combine(self.solve(gram(J), losses=losses, precision=J.dtype).weights, J)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        M = self.solve(gram(J), losses=losses, precision=J.dtype, mixing=True).mixing
        assert M is not None
        return mix(M, J)
