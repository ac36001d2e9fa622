"""Registry rows for the weighting solvers: IMTLG, NashMTL, FairGrad, AlignedMTL, ConFIG (see registry.py)."""

from __future__ import annotations

from impartial.solvers import IMTLG, AlignedMTL, ConFIG, FairGrad, NashMTL
from reference.weighting import aligned_ref, config_ref, fairgrad_ref, imtlg_ref, nash_ref
from registry import STATEFUL_VMAP, SolverInfo

# FairGrad's direction scales as c^{(1−α)/(1+α)} under J → cJ: the paper's α-fair utilities w^{-1/α} fix the scale.
_FAIR_SCALE = "A(cJ) = c^{(1−α)/(1+α)} A(J): the α-fair utilities w^{-1/α} fix the scale (not 1-homogeneous)"


def _fair_k1(alpha: float):
    return lambda g: g.norm() ** ((1 - alpha) / (1 + alpha)) * g / g.norm()


# Nash-MTL and FairGrad stop where the utility equations hold to a relative 1e-9 (_bargain._RESIDUAL); near
# Pareto-stationary tasks (k > d) the weights grow to ~1e5 and their terms cancel in the direction, so two solves
# of the same problem (rotated, permuted) can differ by more than 1e-9 of it: 3e-8 seen on a thorough-profile draw
# (NashMTL, k = 41, d = 16, weights up to 3.2e5, both solves at residual 0)
_TOL_BARGAIN = 1e-7

# IMTLG and ConFIG on rank-deficient inputs (k > d): round-off is amplified by the kept part of C's spectrum
# (down to rtol = 1e-10 of its top).  Under permutation, seen on 3,000 random inputs: 7e-9 (IMTLG), 1.1e-8
# (ConFIG); against the reference, 1.0e-9 (ConFIG, a thorough-profile draw).
_TOL_EQUAL = 1e-7

ROWS: list[SolverInfo] = [
    SolverInfo("IMTLG", IMTLG, {}, k1=lambda g: g, reference=imtlg_ref, tol=_TOL_EQUAL, ref_tol=1e-9),
    SolverInfo("NashMTL", NashMTL, {}, k1=lambda g: g, reference=nash_ref, tol=_TOL_BARGAIN, ref_tol=1e-7),
    # Reusing kept weights between solves: every claim that starts from a fresh solver still holds.
    SolverInfo(
        "NashMTL(update_weights_every=3)",
        lambda: NashMTL(update_weights_every=3),
        {"vmap": STATEFUL_VMAP},
        k1=lambda g: g,
        reference=nash_ref,
        tol=_TOL_BARGAIN,
        ref_tol=1e-7,
    ),
    SolverInfo(
        "FairGrad",
        FairGrad,
        {"homogeneous": _FAIR_SCALE},
        k1=_fair_k1(1.0),
        reference=fairgrad_ref(1.0),
        tol=_TOL_BARGAIN,
        ref_tol=1e-7,
    ),
    SolverInfo(
        "FairGrad(alpha=2)",
        lambda: FairGrad(alpha=2.0),
        {"homogeneous": _FAIR_SCALE},
        k1=_fair_k1(2.0),
        reference=fairgrad_ref(2.0),
        tol=_TOL_BARGAIN,
        ref_tol=1e-7,
    ),
    SolverInfo(
        "FairGrad(alpha=0.5,update_weights_every=2)",
        lambda: FairGrad(alpha=0.5, update_weights_every=2),
        {"homogeneous": _FAIR_SCALE, "vmap": STATEFUL_VMAP},
        k1=_fair_k1(0.5),
        reference=fairgrad_ref(0.5),
        tol=_TOL_BARGAIN,
        ref_tol=1e-7,
    ),
    SolverInfo("AlignedMTL", AlignedMTL, {}, k1=lambda g: g, reference=aligned_ref, tol=1e-9, ref_tol=1e-8),
    SolverInfo("ConFIG", ConFIG, {}, k1=lambda g: g, reference=config_ref, tol=_TOL_EQUAL, ref_tol=1e-8),
]
