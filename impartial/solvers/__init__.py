"""Gradient-conflict solvers: task gradients ``J [..., k, d]`` → one update direction ``[..., d]``.

Gram-space solvers (most of them) also expose ``solve(G)`` (weights, status, residual), ``weights(G)`` and
``mixing(G)`` for ``G = J Jᵀ``; see :mod:`impartial.solvers._base` for the protocol (precision, status,
capabilities, state per block) and :class:`Compose` for chaining methods.
"""

from __future__ import annotations

from typing import Any

from ._aligned import AlignedMTL
from ._base import GramSolver, Solution, Solver, Status, combine, gram, solve_dtype
from ._cagrad import CAGrad
from ._compose import Compose
from ._config import ConFIG
from ._graddrop import GradDrop
from ._gradnorm import NSGD, GradNorm
from ._gradvac import GradVac
from ._imtlg import IMTLG
from ._mgda import MGDA
from ._nash import FairGrad, NashMTL
from ._pcgrad import PCGrad
from ._simple import Mean, Random, Sum
from ._upgrad import DualProj, UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "NSGD",
    "AlignedMTL",
    "CAGrad",
    "Compose",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramSolver",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Random",
    "Solution",
    "Solver",
    "Status",
    "Sum",
    "UPGrad",
    "combine",
    "get",
    "gram",
    "solve_dtype",
]

_BY_NAME: dict[str, type[Solver]] = {
    cls.__name__.lower(): cls
    for cls in (
        Sum,
        Mean,
        PCGrad,
        GradVac,
        IMTLG,
        MGDA,
        CAGrad,
        NSGD,
        GradNorm,
        GradDrop,
        UPGrad,
        DualProj,
        NashMTL,
        AlignedMTL,
        ConFIG,
        FairGrad,
        Random,
    )
}
_BY_NAME.update(
    {
        "imtl-g": IMTLG,
        "imtl_g": IMTLG,
        "nash-mtl": NashMTL,
        "nash_mtl": NashMTL,
        "rlw": Random,
        "aligned-mtl": AlignedMTL,
        "aligned_mtl": AlignedMTL,
        "mgda-ub": MGDA,
        "mgda_ub": MGDA,
    }
)


def get(name: str, **kwargs: Any) -> Solver:
    """A solver by name (case-insensitive, e.g. ``"imtlg"``, ``"IMTL-G"``, ``"pcgrad"``), built with ``kwargs``.

    Its ``stateless`` attribute says whether it keeps state between calls (``"gradnorm"``, ``"nsgd"``,
    ``"gradvac"`` do): such a solver must be built once and kept, not looked up again at every step.

    >>> get("IMTL-G")
    IMTLG()
    """
    try:
        cls = _BY_NAME[name.lower()]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in set(_BY_NAME.values())))
        raise ValueError(f"unknown solver {name!r}; known solvers: {known}") from None
    return cls(**kwargs)
