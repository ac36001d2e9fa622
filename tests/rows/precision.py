"""Float32 rows: the invariants where the input precision decides the cut-offs (see registry.py).

A float32 ``J`` has a float64 Gram (exact products for small ``J``), but its rank, stationarity and convergence
cut-offs are float32's: every entry point must see that precision (``solve(G, precision=J.dtype)``).  The
tolerances are float32's: the direction is combined in float32, and the cut-offs drop what float32 cannot
resolve.
"""

from __future__ import annotations

import torch

from impartial.solvers import IMTLG, NSGD, AlignedMTL, Compose, ConFIG, FairGrad, GradNorm, NashMTL, Sum
from registry import STATEFUL_VMAP, SolverInfo

_F32 = torch.float32
_REFERENCE = (
    "the float64 reference loops use float64 cut-offs; float32's (rank 1e-6, stationarity 1e-2) differ "
    "on purpose where they decide"
)
_ROTATION = (
    "rotating J rounds it in float32 (~6e-8), which can carry a singular value across the float32 rank or "
    "stationarity cut-off and change the direction (seen: IMTLG, 2.6e-4 at d = 2); the float64 row claims it"
)
_FAIR_SCALE = "A(cJ) = c^{(1−α)/(1+α)} A(J): the α-fair utilities w^{-1/α} fix the scale (not 1-homogeneous)"

ROWS: list[SolverInfo] = [
    SolverInfo("Sum[float32]", Sum, {"reference": _REFERENCE}, k1=lambda g: g, tol=1e-6, dtype=_F32),
    SolverInfo(
        "IMTLG[float32]", IMTLG, {"reference": _REFERENCE, "rotation": _ROTATION}, k1=lambda g: g, tol=1e-4, dtype=_F32
    ),
    SolverInfo(
        "ConFIG[float32]",
        ConFIG,
        {"reference": _REFERENCE, "rotation": _ROTATION},
        k1=lambda g: g,
        tol=1e-4,
        dtype=_F32,
    ),
    SolverInfo(
        "AlignedMTL[float32]",
        AlignedMTL,
        {"reference": _REFERENCE, "rotation": _ROTATION},
        k1=lambda g: g,
        tol=1e-4,
        dtype=_F32,
    ),
    SolverInfo(
        "NashMTL[float32]",
        NashMTL,
        {"reference": _REFERENCE, "rotation": _ROTATION},
        k1=lambda g: g,
        tol=1e-4,
        dtype=_F32,
    ),
    SolverInfo(
        "FairGrad(alpha=2)[float32]",
        lambda: FairGrad(alpha=2.0),
        {"reference": _REFERENCE, "homogeneous": _FAIR_SCALE, "rotation": _ROTATION},
        k1=lambda g: g.norm() ** (-1 / 3) * g / g.norm(),
        tol=1e-4,
        dtype=_F32,
    ),
    SolverInfo(
        "Compose(NSGD,IMTLG)[float32]",
        lambda: Compose(NSGD(), IMTLG()),
        {"reference": _REFERENCE, "vmap": STATEFUL_VMAP, "rotation": _ROTATION},
        k1=lambda g: g,
        tol=1e-4,
        dtype=_F32,
    ),
    SolverInfo(
        "GradNorm[float32]",
        GradNorm,
        {"reference": _REFERENCE, "vmap": STATEFUL_VMAP},
        k1=lambda g: g,
        needs_losses=True,
        tol=1e-5,
        dtype=_F32,
    ),
]
