"""Registry rows for the QP solvers: MGDA, CAGrad, UPGrad, DualProj (see registry.py).

They are exact active-set solvers on the Gram matrix of the perturbed gradients ``[J, √δ·diag(‖g_i‖)]``,
``δ = 1e-12`` (see ``impartial/solvers/_qp.py``), so their tolerances are set by that perturbation, not by
an iteration budget: 1e-8 relative to the largest entry of ``J`` for MGDA, more where noted.
"""

from __future__ import annotations

from impartial.solvers import MGDA, CAGrad, DualProj, UPGrad
from reference.qp import dualproj_ref, mgda_ref, upgrad_ref
from registry import SolverInfo

_TOL = 1e-8
_TOL_CAGRAD = 1e-4
_TOL_CONE = 1e-6
# When 0 is in the hull of the gradients (an antiparallel pair, a zero row, k > d) the paper's g_w/‖g_w‖ is 0/0
# and CAGrad's direction is fixed by the 1e-12 perturbation of _qp at the √δ level.
_CAGRAD_REF = (
    "on inputs with 0 in the hull the reference's bisection and the solver select different optimal "
    "points (seen: 4% apart); tests/test_cagrad.py checks the reference to 1e-8 elsewhere"
)

ROWS: list[SolverInfo] = [
    # ref_tol √δ: where 0 lies on the hull's boundary (k > d) the ridge of _qp.prepare moves the min-norm point by
    # O(√δ) (a dev-profile draw with k = 53, d = 32 differed from Wolfe's algorithm by 2.3e-7 of max|J|)
    SolverInfo("MGDA", MGDA, {}, k1=lambda g: g, reference=mgda_ref, tol=_TOL, ref_tol=_TOL_CONE),
    # k = 1: d = g₀ + c‖g₀‖ g/‖g‖ = (1 + c) g (no rescale, as in the paper's Algorithm 1).  The invariants hold
    # to ~1e-5 where 0 is in the hull (seen: 2.7e-6 for permutation), hence tol 1e-4.
    SolverInfo("CAGrad", CAGrad, {"reference": _CAGRAD_REF}, k1=lambda g: 1.4 * g, tol=_TOL_CAGRAD),
    SolverInfo(
        "CAGrad(c=1)",
        lambda: CAGrad(c=1.0),
        {
            "reference": _CAGRAD_REF,
            "compile": "same code path as the default row, which claims it",
            "vmap": "same code path as the default row, which claims it",
        },
        k1=lambda g: 2 * g,
        tol=_TOL_CAGRAD,
    ),
    # Tolerance 1e-6 = √δ: when the dual cone {x : Jx ≥ 0} is degenerate (only 0, or lower-dimensional), the
    # δ-perturbation opens it by O(√δ) and the projection moves that much (seen: 3.7e-8 with 7 tasks in 2-D,
    # true answer 0).  Elsewhere the agreement with the reference is ~1e-11.
    SolverInfo("UPGrad", UPGrad, {}, k1=lambda g: g, reference=upgrad_ref, tol=_TOL_CONE, ref_tol=_TOL_CONE),
    SolverInfo("DualProj", DualProj, {}, k1=lambda g: g, reference=dualproj_ref, tol=_TOL_CONE, ref_tol=_TOL_CONE),
]
