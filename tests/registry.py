"""The solver registry: one row per solver configuration; every invariant is claimed unless a reason says why not.

Each generic test in ``test_contract.py`` expands over the rows that claim its invariant, so a new solver gets
every check by adding one row (in ``rows/``).  A row's claims are :data:`ALL_CLAIMS` minus its ``skips``, a
``{claim: reason}`` dict (torch's ``OptimizerInfo`` pattern): nothing is left out without a stated reason.

- ``k1``: for k = 1 the output is ``k1(g)`` (the gradient, up to the solver's documented scale);
- ``permutation``: permuting tasks (and their losses) leaves the direction unchanged;
- ``homogeneous``: ``A(cJ) = c A(J)`` for ``c > 0``;
- ``rotation``: ``A(J R) = A(J) R`` for orthogonal ``R`` (Gram-space solvers);
- ``batched``: ``A(J)[b] = A(J[b])`` for a batch of independent blocks;
- ``vmap``: ``torch.func.vmap(A)(J) = A(J)`` (proof of a hot path with no host sync or value branch);
- ``compile``: runs under ``torch.compile(fullgraph=True)``;
- ``gram_path``: ``solve`` / ``weights`` / ``mixing`` on ``G = J Jᵀ`` (with the precision of ``J``) give the
  direction of ``A(J)`` and of ``apply``;
- ``checkpoint``: a fresh solver loaded with ``state_dict()`` continues exactly like the original, its
  per-block children included;
- ``reference``: equals the plain loop in ``reference/`` that transcribes the paper.

Every row, whatever its claims, is also held to the universal contract: finite output of the input's shape
and dtype on finite input, NaN (status NONFINITE) on non-finite input, capabilities that match behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from impartial.solvers import Solver

ALL_CLAIMS = frozenset(
    {
        "k1",
        "permutation",
        "homogeneous",
        "rotation",
        "batched",
        "vmap",
        "compile",
        "checkpoint",
        "gram_path",
        "reference",
    }
)

#: reasons shared by many rows
COORDINATES = "works on J's coordinates (not Gram-space): no rotation equivariance and no Gram path"
RANDOM_DRAW = (
    "draws at random: one batched draw differs from B small ones, a draw is tied to task positions, "
    "and a draw under vmap needs randomness=; the fixed-draw rows claim these"
)
GENERATOR = "dynamo cannot trace a torch.Generator: the global-RNG row claims compile"
STATEFUL_VMAP = (
    "stateful: the generic test keeps one solver outside vmap, whose state would capture batched "
    "tensors; the method's own test vmaps whole runs"
)


@dataclass(frozen=True)
class SolverInfo:
    id: str
    make: Callable[[], Solver]
    #: {claim: why this row does not make it}; the row claims every other invariant
    skips: Mapping[str, str] = field(default_factory=dict)
    #: expected output for k = 1, as a function of the single gradient g [d]
    k1: Callable[[Tensor], Tensor] | None = None
    #: plain loop transcribing the paper: J [k, d] float64 (and losses [k] or None) -> direction [d]
    reference: Callable[..., Tensor] | None = None
    #: relative tolerance of the invariants (iterative solvers: their stated tolerance)
    tol: float = 1e-9
    #: tolerance against the reference loop
    ref_tol: float = 1e-10
    needs_losses: bool = False
    #: extra keyword context the solver needs (e.g. GradDrop's inputs), as a function of J
    context: Callable[[Tensor], dict[str, Tensor]] | None = None
    #: the dtype the invariants are checked in (the inputs are cast to it)
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        unknown = set(self.skips) - ALL_CLAIMS
        if unknown:
            raise ValueError(f"{self.id}: skips unknown claims {sorted(unknown)}")
        if not all(isinstance(r, str) and r.strip() for r in self.skips.values()):
            raise ValueError(f"{self.id}: every skipped claim needs a reason")
        if "k1" in self.claims and self.k1 is None:
            raise ValueError(f"{self.id}: claims k1 but gives no k1 function")
        if "reference" in self.claims and self.reference is None:
            raise ValueError(f"{self.id}: claims reference but gives no reference loop")

    @property
    def claims(self) -> frozenset[str]:
        return ALL_CLAIMS - set(self.skips)

    def __str__(self) -> str:
        return self.id


def rows() -> list[SolverInfo]:
    from rows import basic, precision, projection, qp, weighting

    return [*basic.ROWS, *projection.ROWS, *qp.ROWS, *weighting.ROWS, *precision.ROWS]


def claiming(claim: str) -> list[SolverInfo]:
    return [r for r in rows() if claim in r.claims]
