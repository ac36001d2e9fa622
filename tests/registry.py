"""The solver registry: one row per solver, declaring the invariants it claims.

Each generic test in ``test_contract.py`` expands over the rows that claim its invariant, so a new solver gets
every check by adding one row (in ``rows/``).  Claims:

- ``k1``: for k = 1 the output is ``k1(g)`` (the gradient, up to the solver's documented scale);
- ``permutation``: permuting tasks (and their losses) leaves the direction unchanged;
- ``homogeneous``: ``A(cJ) = c A(J)`` for ``c > 0``;
- ``rotation``: ``A(J R) = A(J) R`` for orthogonal ``R`` (Gram-space solvers);
- ``batched``: ``A(J)[b] = A(J[b])`` for a batch of independent blocks;
- ``vmap``: ``torch.func.vmap(A)(J) = A(J)`` (proof of a hot path with no host sync or value branch);
- ``compile``: runs under ``torch.compile(fullgraph=True)``;
- ``gram_path``: ``weights(J Jᵀ)ᵀ J = A(J)`` and ``1ᵀ mixing(G) = weights(G)``;
- ``checkpoint``: a fresh solver loaded with ``state_dict()`` continues exactly like the original;
- ``reference``: equals the plain loop in ``reference/`` that transcribes the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from impartial.solvers import Solver

ALL_CLAIMS = frozenset({"k1", "permutation", "homogeneous", "rotation", "batched", "vmap", "compile", "checkpoint",
                        "gram_path", "reference"})


@dataclass(frozen=True)
class SolverInfo:
    id: str
    make: Callable[[], Solver]
    claims: frozenset[str]
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
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = self.claims - ALL_CLAIMS
        if unknown:
            raise ValueError(f"{self.id}: unknown claims {sorted(unknown)}")
        if "k1" in self.claims and self.k1 is None:
            raise ValueError(f"{self.id}: claims k1 but gives no k1 function")
        if "reference" in self.claims and self.reference is None:
            raise ValueError(f"{self.id}: claims reference but gives no reference loop")

    def __str__(self) -> str:
        return self.id


def rows() -> list[SolverInfo]:
    from rows import basic, projection, qp, weighting

    return [*basic.ROWS, *projection.ROWS, *qp.ROWS, *weighting.ROWS]


def claiming(claim: str) -> list[SolverInfo]:
    return [r for r in rows() if claim in r.claims]
