"""The two solver abstractions and the Gram-space plumbing they share.

A *solver* maps the task gradients of one block, ``J`` of shape ``[..., k, d]`` (``k`` tasks, ``d``
coordinates, any leading batch dims), to one update direction ``[..., d]``.  Most methods are *linear in
J*: the direction is ``wᵀJ`` with weights ``w = f(G)`` that depend only on the Gram matrix ``G = J Jᵀ``
``[..., k, k]``.  Those subclass :class:`GramSolver` and implement ``_weights``; the whole call then costs
one pass over ``J`` to form ``G`` (:func:`gram`), an ``O(k³)`` problem on ``G`` (run in float64 for float32
and lower inputs) and one pass to combine (:func:`combine`).  The few methods that need coordinates
(GradDrop) subclass :class:`Solver` and implement ``_apply`` on ``J`` directly.  Solvers whose numerical
cut-offs (ranks, stationarity) must follow the input's precision subclass :class:`_PrecisionGramSolver`.

Composition (see :class:`~impartial.solvers.Compose`) needs more than a direction: every solver also maps
the task gradients to *new* task gradients whose sum is its direction.  For a Gram-space solver that map is
a ``k × k`` *mixing matrix* ``M`` (new task gradients ``M J``, new Gram ``M G Mᵀ``); a weighting method's
mixing matrix is ``diag(w)``, PCGrad's is its projection coefficients.

Extra context a few methods need is passed by keyword: ``losses`` ``[..., k]`` (the current task losses,
used by loss-based GradNorm) and, for GradDrop, ``inputs`` (the block's input activations).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Solver", "GramSolver", "Solution", "Status", "gram", "combine", "solve_dtype"]

_LOW = (torch.float16, torch.bfloat16)


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ``k × k`` work runs in: float64 for float32 and lower, else ``dtype`` itself."""
    if dtype in _LOW or dtype == torch.float32:
        return torch.float64
    return dtype


def _check_jacobian(J: Tensor, who: str) -> None:
    if not isinstance(J, Tensor):
        raise TypeError(f"{who}: expected a tensor J of shape [..., k, d], got {type(J).__name__}")
    if J.ndim < 2:
        raise ValueError(f"{who}: expected J of shape [..., k, d] (at least 2 dims), got shape {tuple(J.shape)}")
    if not J.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point J, got {J.dtype}")
    if J.shape[-2] == 0:
        raise ValueError(f"{who}: J has k = 0 task gradients; at least one is needed")


def _check_gram(G: Tensor, who: str) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{who}: expected a tensor G of shape [..., k, k], got {type(G).__name__}")
    if G.ndim < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"{who}: expected a square Gram matrix G of shape [..., k, k], got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point G, got {G.dtype}")
    if G.shape[-1] == 0:
        raise ValueError(f"{who}: G has k = 0 tasks; at least one is needed")


class Status(enum.IntEnum):
    """How a solve ended, per problem (a tensor of these codes, read only when reported: no host sync)."""

    #: solved to the method's documented tolerance
    OK = 0
    #: Pareto-stationary: the exact direction is 0 (e.g. 0 lies in the convex hull of the task gradients)
    STATIONARY = 1
    #: the iteration budget ended before the residual met the method's tolerance
    NOT_CONVERGED = 2
    #: the input had a NaN or an infinity; the weights are NaN
    NONFINITE = 3


class Solution(NamedTuple):
    """The result of :meth:`GramSolver.solve` for a batch of problems ``[...]``."""

    #: ``[..., k]``: the direction is ``wᵀJ``
    weights: Tensor
    #: ``[...]`` int codes of :class:`Status`
    status: Tensor
    #: ``[...]`` the method's optimality residual (relative; 0 for closed forms)
    residual: Tensor
    #: ``[..., k, k]`` the mixing matrix (new task gradients ``M J``) when asked for, else None
    mixing: Tensor | None = None


def _ok(w: Tensor) -> tuple[Tensor, Tensor]:
    """Status and residual of a closed-form solve: OK where the weights are finite, NONFINITE elsewhere."""
    finite = w.isfinite().all(-1)
    status = torch.where(finite, int(Status.OK), int(Status.NONFINITE)).to(torch.int8)
    return status, torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)


#: chunk length of the chunked float32 Gram (4 KiB per row: a [k, c] chunk stays in L1/L2 for k < 16)
_CHUNK = 1024


def _chunked(J: Tensor) -> bool:
    """Whether :func:`gram` forms ``J Jᵀ`` by chunks of ``d``: decided by the static shape and dtype alone.

    For float32 with a few tasks (``2 < k < 16``) and a large ``J`` (``k d ≥ 6e5``) one ``sgemm`` with
    ``k`` rows streams ``J`` several times (measured 1.7 to 6 passes at ``k = 5 … 15``); a batch of
    ``[k, 1024] × [1024, k]`` products summed over the chunks takes about one.  Elsewhere (float64, one or
    two tasks, ``k ≥ 16``, small ``J``, leading batch dims) the single matmul is as fast or faster.
    """
    k, d = J.shape[-2], J.shape[-1]
    return J.ndim == 2 and J.dtype == torch.float32 and 2 < k < 16 and k * d >= 600_000


def gram(J: Tensor) -> Tensor:
    """``G = J Jᵀ`` ``[..., k, k]`` of task gradients ``J`` ``[..., k, d]``, in :func:`solve_dtype`.

    One pass over ``J``.  Float32 and half-precision inputs are accumulated in float32 (half precision is
    cast first); a large float32 ``J`` with a few tasks is summed over chunks of ``d`` (see :func:`_chunked`),
    still in float32.
    """
    if J.dtype in _LOW:
        # float32 accumulation: a bf16 dot product of 1e6 terms would lose all its digits.
        J = J.float()
    if _chunked(J):
        k, d = J.shape
        n = d // _CHUNK
        blocks = J[:, : n * _CHUNK].view(k, n, _CHUNK).transpose(0, 1)  # [n, k, c]: a view, no copy
        G = torch.bmm(blocks, blocks.mT).sum(0)
        if n * _CHUNK < d:
            rest = J[:, n * _CHUNK:]
            G = torch.addmm(G, rest, rest.T)
        return G.to(torch.float64)
    return (J @ J.mT).to(solve_dtype(J.dtype))


def combine(w: Tensor, J: Tensor) -> Tensor:
    """The direction ``wᵀJ`` ``[..., d]`` for weights ``w`` ``[..., k]`` and ``J`` ``[..., k, d]``."""
    if J.dtype in _LOW:
        return (w.float().unsqueeze(-2) @ J.float()).squeeze(-2).to(J.dtype)
    return (w.to(J.dtype).unsqueeze(-2) @ J).squeeze(-2)


def mix(M: Tensor, J: Tensor) -> Tensor:
    """New task gradients ``M J`` ``[..., k, d]`` for a mixing matrix ``M`` ``[..., k, k]``."""
    if J.dtype in _LOW:
        return (M.float() @ J.float()).to(J.dtype)
    return M.to(J.dtype) @ J


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """The checkpointable part of a solver's randomness: its generator's state (none for the global RNG)."""
    return {"generator": generator.get_state()} if generator is not None else {}


def _load_rng_state(solver: Any, generator: torch.Generator | None, state: dict[str, Any]) -> None:
    unknown = set(state) - {"generator"}
    if unknown:
        raise ValueError(f"{type(solver).__name__}: unexpected state keys {sorted(unknown)}")
    if "generator" in state:
        if generator is None:
            raise ValueError(f"{type(solver).__name__} draws from the global RNG; it cannot load a generator state")
        generator.set_state(state["generator"])


class Solver(ABC):
    """A gradient-conflict solver: task gradients ``J [..., k, d]`` → one direction ``[..., d]``.

    Subclasses implement :meth:`_apply` (new task gradients whose sum is the direction).  Hyperparameters are
    constructor arguments; mutable state is explicit (:meth:`state_dict` / :meth:`load_state_dict`).
    """

    #: whether the direction depends on ``J`` only through ``G = J Jᵀ`` (then ``weights`` exists).
    gram_space: bool = False
    #: whether the solver keeps nothing between calls (then one instance may serve any number of blocks, and
    #: it may be given by name)
    stateless: bool = True
    #: whether equal inputs give equal outputs (no random draws)
    deterministic: bool = True

    @property
    def batchable(self) -> bool:
        """Whether a batch of independent problems may share one call (stateless and deterministic)."""
        return self.stateless and self.deterministic

    def for_block(self, key: int) -> Solver:
        """The solver that serves problem ``key`` (block ``key`` of :func:`impartial.backward`): itself for a
        stateless solver; a stateful one keeps a separate state per key, included in its ``state_dict``."""
        return self

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        """The update direction ``[..., d]`` for task gradients ``J`` ``[..., k, d]``."""
        _check_jacobian(J, type(self).__name__)
        return self.apply(J, losses=losses, **context).sum(-2)

    def apply(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        """The task gradients after this method, ``[..., k, d]``; their sum is the direction."""
        _check_jacobian(J, type(self).__name__)
        return self._apply(J, losses=losses, **context)

    @abstractmethod
    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]:
        """Mutable state (EMAs, learned weights, RNG-free counters); empty for stateless solvers."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, but got state with keys {sorted(state)}")

    def reset(self) -> None:
        """Forget mutable state (a no-op for stateless solvers)."""

    def _hparams(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"


class GramSolver(Solver):
    """A solver whose direction is ``wᵀJ`` with weights ``w = f(G)`` of the Gram matrix alone.

    Subclasses implement :meth:`_weights` (``G`` arrives in :func:`solve_dtype`) and, where the method
    produces new task gradients other than ``diag(w) J`` (PCGrad, GradVac), :meth:`_mixing`.
    """

    gram_space = True

    def solve(self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None,
              mixing: bool = False) -> Solution:
        """Weights, status and residual (and the mixing matrix when ``mixing``) for ``G = J Jᵀ`` ``[..., k, k]``;
        ``precision`` is the dtype of the ``J`` that ``G`` came from (None: ``G.dtype``)."""
        _check_gram(G, type(self).__name__)
        if isinstance(self, _PrecisionGramSolver):  # interim: its own _solve(G, low) predates this protocol
            w = self._solve(G.to(solve_dtype(G.dtype)), (precision or G.dtype) != torch.float64)
            return Solution(w, *_ok(w), torch.diag_embed(w) if mixing else None)
        return self._solve(G.to(solve_dtype(G.dtype)), losses=losses, precision=precision or G.dtype, mixing=mixing)

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        """The override point of :meth:`solve` (``G`` in :func:`solve_dtype`): by default the weights (or the mixing
        matrix) of a closed-form method, status OK where finite.  Iterative methods return their own status."""
        if mixing:
            M = self._mixing(G, losses=losses)
            w = M.sum(-2)
        else:
            M, w = None, self._weights(G, losses=losses)
        return Solution(w, *_ok(w), M)

    def weights(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        """Weights ``w`` ``[..., k]`` such that the direction is ``wᵀJ`` for ``G = J Jᵀ`` ``[..., k, k]``."""
        _check_gram(G, type(self).__name__)
        return self._weights(G.to(solve_dtype(G.dtype)), losses=losses)

    def mixing(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        """Mixing matrix ``M`` ``[..., k, k]``: the method's new task gradients are ``M J``, and ``w = 1ᵀM``."""
        _check_gram(G, type(self).__name__)
        return self._mixing(G.to(solve_dtype(G.dtype)), losses=losses)

    @abstractmethod
    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor: ...

    def _mixing(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return torch.diag_embed(self._weights(G, losses=losses))

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, type(self).__name__)
        return combine(self._weights(gram(J), losses=losses), J)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        return mix(self._mixing(gram(J), losses=losses), J)


class _PrecisionGramSolver(GramSolver):
    """A Gram-space solver whose numerical cut-offs follow the precision of its input.

    ``_weights`` always receives ``G`` in float64, which hides whether ``J`` (or a user's ``G``) was float32:
    a float32 Gram carries ~1e-7 relative noise, so rank and stationarity cut-offs must be looser.  Every
    entry point routes through :meth:`_solve` with ``low`` set from the input dtype.
    """

    @abstractmethod
    def _solve(self, G: Tensor, low: bool) -> Tensor: ...

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        return self._solve(G, G.dtype != torch.float64)

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, type(self).__name__)
        return combine(self._solve(gram(J), J.dtype != torch.float64), J)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        return mix(torch.diag_embed(self._solve(gram(J), J.dtype != torch.float64)), J)

    def weights(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        _check_gram(G, type(self).__name__)
        return self._solve(G.to(solve_dtype(G.dtype)), G.dtype != torch.float64)

    def mixing(self, G: Tensor, *, losses: Tensor | None = None) -> Tensor:
        return torch.diag_embed(self.weights(G, losses=losses))
