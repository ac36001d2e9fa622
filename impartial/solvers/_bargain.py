"""Nash-MTL and FairGrad: bargaining weights from one damped-Newton solve on the cosine matrix of ``G``.

Both methods ask for weights ``β > 0`` whose direction ``d = βᵀJ`` gives every task the utility
``g_i·d = (Gβ)_i = β_i^{-1/α}`` (α-fair allocation; ``α = 1`` is the Nash bargaining solution).  That is the
stationarity condition of the strictly convex

    F(β) = ½ βᵀGβ − Σ_i φ(β_i),   φ(x) = log x (α = 1),   φ(x) = x^{1−1/α} / (1 − 1/α) (α ≠ 1).

Substituting ``β_i = γ_i/‖g_i‖`` turns it into the same problem on the cosine matrix ``C`` (unit diagonal)
with ``φ`` weighted by ``c_i = ‖g_i‖^{-(1−1/α)}``: the conditioning no longer depends on the gradient norms.
Damped Newton steps (none for ``k = 1`` and for Nash at ``k = 2``, which have closed forms), each followed by
a search over a geometric grid of step sizes along ``γ ⊙ exp(tΔ/γ)``, which stays positive and matches the
Newton step to second order (so the final steps converge quadratically); ``F`` along it is a quadratic plus a
separable term, so all candidates are scored by a handful of batched ops.  On the CPU, outside
``torch.compile`` / ``vmap``, the steps stop once every problem is decided (:func:`bargain`); elsewhere a
fixed count runs, with no host sync.

``F`` has no minimiser exactly when some nonnegative combination of the task gradients vanishes (the tasks
are at a Pareto-stationary point: no direction improves them all).  Then ``γ`` runs off to infinity along
that combination; the certificate ``‖Σ v_i u_i‖`` with ``v = γ/Σγ`` and unit gradients ``u_i`` (never below
the distance of 0 to the hull of the ``u_i``) measures how close the tasks are to it.  The status is
STATIONARY where it is at most 1e-5 (1e-2 for a float32 ``J``), or where the utilities ``(Cγ)_i`` have fallen
below the rounding of ``Cγ`` itself (no solution can be told apart from none at ``G``'s precision); OK where
every utility equation holds to a relative 1e-9; else NOT_CONVERGED, with the last iterate as the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._base import Status, sync_free

__all__ = ["bargain"]

#: Newton steps of the sync-free schedule; the cap of the CPU loop, which stops at convergence
_ITERS = 32
_MAX_ITERS = 200
#: line-search step sizes 2^3 … 2^-10, and 0 (keep γ when no step lowers F: round-off reached)
_STEPS = [2.0**j for j in range(3, -11, -1)] + [0.0]
#: cap on log(γ_new/γ_i) in one step (e^40 ≈ 2e17): keeps exp finite on a wild step
_GROWTH = 40.0
#: Pareto-stationarity threshold on ‖Σ v_i u_i‖ (v on the simplex): float64 input, float32 and lower (whose
#: cosines carry ~1e-7 noise, i.e. ~3e-4 on a certificate, the square root of a quadratic form)
_STATIONARY = (1e-5, 1e-2)
#: relative residual of the utility equations (on the float64 G, whatever the input precision)
_RESIDUAL = 1e-9


class _Problem(NamedTuple):
    """The bargaining problem on the cosine matrix: ``C`` (zero rows made decoupled units), the weights ``c``
    ``[..., k, 1]`` of ``φ`` (None for Nash), ``1/‖g_i‖`` and the rows that bargain, and the common factor."""

    C: Tensor
    c: Tensor | None
    inv: Tensor
    nonzero: Tensor
    shift: Tensor


def _problem(G: Tensor, p: float) -> tuple[_Problem, Tensor]:
    """The problem on ``C`` and the start ``γ`` ``[..., k, 1]``."""
    k = G.shape[-1]
    n = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    nonzero = n > torch.finfo(G.dtype).tiny ** 0.5
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, n, 1.0), 0.0)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    # A zero gradient's utility is 0 whatever d is: it has no stake in the bargain.  Its row of C is made a
    # decoupled unit (its own γ converges on its own) and its weight is set to 0 at the end.
    C = torch.where(eye > 0, 1.0, G * inv.unsqueeze(-1) * inv.unsqueeze(-2))
    nz = nonzero.unsqueeze(-1)  # γ, c and the other per-task vectors are columns [..., k, 1]
    c: Tensor | None
    if p == 0:  # Nash: c ≡ 1 (every c_i = ‖g_i‖^0), the start is a common factor
        shift = torch.zeros_like(n[..., :1])
        c = None
        b = torch.ones_like(nz, dtype=G.dtype)
    else:
        logc = torch.where(nonzero, -p * torch.log(torch.where(nonzero, n, 1.0)), 0.0)
        # a common factor of c only rescales γ (by its 1/(2−p) power): remove it for the iteration's sake
        shift = (logc * nonzero).sum(-1, keepdim=True) / nonzero.sum(-1, keepdim=True).clamp_min(1)
        c = torch.exp(torch.where(nonzero, logc - shift, 0.0)).unsqueeze(-1)
        b = c ** (1 / (2 - p))
    # start: b_i = c_i^{1/(2−p)} (exact for C = I) times the best common factor for the tasks that bargain
    bz = b * nz
    bCb = (bz * (C @ bz)).sum(-2, keepdim=True)
    cbp = (
        nz.sum(-2, keepdim=True, dtype=G.dtype) if c is None else (torch.where(nz, c * b**p, 0.0)).sum(-2, keepdim=True)
    )
    tau = (cbp / bCb.clamp_min(1e-3 * k)) ** (1 / (2 - p))
    g = torch.where(nz, tau * b, b)
    if k == 2 and p == 0:  # Nash, two tasks: γ_1 = γ_2 = (1 + cos)^{-1/2} solves γ ⊙ Cγ = 1 exactly
        # (an antiparallel pair, cos = −1, has no solution: γ is left large and the checks say so)
        g = (1 + C[..., :1, 1:]).clamp_min(torch.finfo(G.dtype).eps).rsqrt().expand_as(g)
    return _Problem(C, c, inv, nonzero, shift), g


def _newton_step(P: _Problem, g: Tensor, p: float, steps: Tensor) -> Tensor:
    """One damped Newton step on ``F`` from ``γ`` ``[..., k, 1]``, the step size searched on a grid."""
    C, c = P.C, P.c
    one = torch.ones((), dtype=C.dtype, device=C.device)
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    Cg = C @ g
    # Newton system (C + diag h) Δ = −∇F = u − Cγ with u = c γ^{p−1} (the utilities γ asks for) and
    # h = (1 − p) u/γ, scaled by s = h^{-1/2} = γ a, a = ((1 − p) c γ^p)^{-1/2}: the matrix S C S + I has
    # eigenvalues ≥ 1 however large γ grows, and Δ/γ = a x for its solution x.  Nash: s = γ, a = 1.
    if c is None:
        s = g
        rhs = torch.addcmul(one, g, Cg, value=-1.0)  # s (u − Cγ) = 1 − γ Cγ
    else:
        w = c * g**p  # u γ
        a = ((1 - p) * w).rsqrt()
        s = g * a
        rhs = s * (w / g - Cg)
    x = torch.linalg.solve_ex(torch.addcmul(eye, s * C, s.mT), rhs)[0]  # _ex: no check, no sync
    # Line search, all candidates at once, over two paths written as γ_new = γ ⊙ exp(L), L = log(γ_new/γ):
    # - γ ⊙ exp(tΔ/γ): tangent Δ at t = 0 (a descent path) and equal to γ + tΔ to second order near the
    #   solution (quadratic convergence kept), but never leaves γ > 0, so a γ_i that must shrink by decades
    #   does so in one step; steps above 1 let γ run off fast along a Pareto-stationary combination;
    # - the plain Newton points γ + tΔ (a coordinate that would cross 0 is cut to 1% of itself): far from
    #   the solution neither path is uniformly better.
    # Each candidate's change of F is exact, with δ = γ ⊙ expm1(L) and no difference of large values:
    #   F(γ + δ) − F(γ) = (Cγ + ½Cδ)·δ − Σ c_i γ_i^p expm1(p L_i)/p     (Σ c_i L_i at p = 0)
    q = ((x if c is None else a * x) * steps).clamp_max(_GROWTH)  # [..., k, steps]
    q = torch.cat([q, torch.log1p(q.clamp_min(-0.99))], -1)  # L on both paths
    delta = g * torch.expm1(q)
    half = torch.add(Cg, C @ delta, alpha=0.5)
    # the decrease of F, −(F(γ + δ) − F(γ)), summed over the tasks: the best candidate has the largest
    gain = q if c is None else (w / p) * torch.expm1(p * q)
    best = torch.addcmul(gain, half, delta, value=-1.0).sum(-2, keepdim=True).argmax(-1, keepdim=True)
    return g + delta.gather(-1, best.expand_as(g))  # gather, not take_along_dim (which checks on the host)


def _measure(P: _Problem, g: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The relative residual of the utility equations ``(Cγ)_i = c_i γ_i^{p−1}`` (inf where it cannot be
    checked) and the stationarity certificate ``‖Σ v_i u_i‖``, ``v = γ/Σγ`` over the rows that bargain."""
    C, k = P.C, P.C.shape[-1]
    c = torch.ones_like(g) if P.c is None else P.c
    Cg = C @ g
    target = c * g ** (p - 1)
    # Cγ carries a rounding error of at most about k·eps·(|C|γ)_i, which can exceed a relative 1e-9 of a small
    # utility when γ is large and its terms cancel (nearly Pareto-stationary tasks): that part is not a miss.
    # But where it reaches a tenth of the utility, the equation cannot be checked at all.
    slack = 16 * k * torch.finfo(C.dtype).eps * (C.abs() @ g)
    residual = (((Cg - target).abs() - slack).clamp_min(0) / target).amax((-2, -1))
    residual = torch.where((slack <= 0.1 * target).all(-2).squeeze(-1), residual, torch.inf)
    gz = g * P.nonzero.unsqueeze(-1)
    cert = (gz * (C @ gz)).sum((-2, -1)).clamp_min(0).sqrt() / gz.sum((-2, -1))
    return residual, cert


def bargain(G: Tensor, p: float, low: bool, iters: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(β, status, residual)``: ``β ≥ 0`` with ``(Gβ)_i = β_i^{p−1}`` for ``p = 1 − 1/α`` (status OK), 0 at
    a Pareto-stationary ``G`` (STATIONARY; the residual is then the certificate), or the last iterate
    (NOT_CONVERGED).  Sync-free (:func:`sync_free`): ``iters`` (default 32) Newton steps.  On the CPU, not
    traced: steps until every problem has met its tolerance or its certificate (then one more, as the fixed
    schedule would polish it), at most ``iters`` (default 200)."""
    P, g = _problem(G, p)
    steps = torch.tensor(_STEPS, dtype=G.dtype, device=G.device)
    tol, threshold = _RESIDUAL, _STATIONARY[low]
    k = G.shape[-1]
    if k == 1 or (k == 2 and p == 0):  # closed forms: C = I, or the two-task formula
        pass
    elif sync_free(G):  # fixed count: no data-dependent stopping, so vmap / compile see one graph
        for _ in range(_ITERS if iters is None else iters):
            g = _newton_step(P, g, p, steps)
    else:
        done, budget = False, _MAX_ITERS if iters is None else iters
        while budget > 0:
            residual, cert = _measure(P, g, p)
            finished = bool(((residual <= tol) | (cert <= threshold) | residual.isinf()).all())  # host read: CPU
            if done and finished:
                break
            done, budget = finished, budget - 1
            g = _newton_step(P, g, p, steps)
    residual, cert = _measure(P, g, p)
    stationary = (cert <= threshold) | residual.isinf() | ~P.nonzero.any(-1)
    solved = residual <= tol
    status = torch.where(
        stationary, int(Status.STATIONARY), torch.where(solved, int(Status.OK), int(Status.NOT_CONVERGED))
    ).to(torch.int8)
    beta = g.squeeze(-1) * torch.exp(P.shift / (2 - p)) * P.inv
    beta = torch.where(stationary.unsqueeze(-1) | ~beta.isfinite(), 0.0, beta)
    return beta, status, torch.where(stationary, cert, residual)
