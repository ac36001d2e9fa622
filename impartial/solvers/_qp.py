"""Batched small quadratic programs on a Gram matrix: the machinery MGDA, CAGrad, UPGrad and DualProj share.

Two problem shapes, each solved for many right-hand sides at once (``m`` problems per Gram matrix):

- :func:`nonneg_qp`: ``min_x ½ xᵀHx + cᵀx`` s.t. ``x ≥ 0`` (UPGrad's and DualProj's ``v ≥ u`` with ``v = u + x``);
- :func:`simplex_qp`: the same on the simplex ``x ≥ 0, 1ᵀx = 1`` (MGDA's min-norm point).

**Method.** A primal active-set method (Nocedal & Wright, *Numerical Optimization*, §16.5) on a *working
set* ``F`` of free variables: each iteration minimises the objective on the face ``{x_j = 0, j ∉ F}`` (one
masked, batched Cholesky solve), walks from the current feasible ``x`` towards that face minimiser until the
first variable hits zero (the ratio test; hitting variables leave ``F``), and when the step is full, adds
*every* variable whose multiplier is negative.  The objective never increases, so the method cannot cycle
between faces, and once ``F`` is the optimal support the face minimiser is the exact solution: an exact
method, not a first-order approximation.  The batch runs a fixed number of iterations (``iters``, or by
default ``2k + 8`` for the mid sizes that are neither enumerated nor given to the interior point, below;
converged problems are fixed points), with ``torch.where`` for every branch: no host sync.

**Large problems: interior point, then the active set.**  From ``k ≥`` :data:`IPM_K` (default ``iters``) a
fixed number of Mehrotra predictor-corrector steps (:func:`interior_point`; their count does not grow with
``k``) find the support, and :data:`POLISH` active-set iterations from there land on the exact face
minimiser.  The ``2k + 8`` active-set iterations from a cold start made UPGrad O(k⁵) at large k.

**Small problems: enumeration.**  For ``m k 2ᵏ ≤`` :data:`ENUM_WORK` (UPGrad up to ``k = 8``, a single problem
up to ``k = 10``) every face's minimiser is computed in one batched Cholesky and the feasible one of least
objective is taken.  The optimum minimises the objective on its own face, so this is the exact solution
too, in ~15 ATen ops instead of ``2k + 8`` iterations of ~40 (measured 3–16× faster, 1 thread).

**Conditioning.** :func:`prepare` divides ``G`` by its largest diagonal entry (the solutions are scale-free,
so inputs from 1e-10 to 1e15 behave alike), projects the tasks' correlation matrix onto the PSD cone
(``eigh``; a float32 Gram has negative round-off eigenvalues) and adds ``δ = 1e-12`` to its diagonal.  The
solvers thus solve *exactly* the problem of the slightly perturbed gradients ``[J, √δ·diag(‖g_i‖)]`` (a
zero gradient is perturbed as if it had the largest norm): every face system is positive definite (a plain
Cholesky, no pivoting), rank-deficient, duplicate and zero rows need no special case, among equivalent
optimal weights the perturbation picks one, and the direction moves by ``O(δ)`` relative to each task
(by up to ``O(√δ) = 1e-6`` where the feasible cone or the hull is degenerate, e.g. 0 on its boundary).
Known limit: where the dual cone is *nearly* {0} (k > d), the projections are combinations with huge
weights and the shift grows with them: 7.5e-5 of the largest gradient on one UPGrad input (k = 26,
d = 9, rank 9), against 1e-6 elsewhere.  Every method here (enumeration, active set, interior point) solves
the same perturbed problem, so they agree with each other there, not with the unperturbed projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["check_iters", "prepare", "masked_solve", "active_set", "nonneg_qp", "simplex_qp", "default_iters",
           "enumerates", "all_faces", "face_minimisers", "pick_feasible", "quadratic", "REG", "TOL",
           "ENUM_WORK"]

#: relative Tikhonov term added to the normalised Gram matrix (see the module docstring).
REG = 1e-12
#: a multiplier below ``-TOL`` (relative to the normalised Gram matrix) puts its variable in the working set.
TOL = 1e-11


#: with the default iteration count, ``m`` problems of ``k`` variables are solved by enumerating all ``2ᵏ``
#: faces while ``m k 2ᵏ ≤ ENUM_WORK`` (UPGrad up to k = 8, one problem up to k = 10).  Measured, 1 thread:
#: 9–16× faster than the active set for k ≤ 6, 3× (UPGrad) and 2–9× (one problem) at the limit, slower beyond.
ENUM_WORK = 2**14


def enumerates(k: int, m: int, iters: int | None) -> bool:
    """Whether :func:`nonneg_qp` / :func:`simplex_qp` enumerate the faces (a shape rule: no sync)."""
    return iters is None and m * k * 2**k <= ENUM_WORK


def all_faces(k: int, like: Tensor) -> Tensor:
    """All ``2ᵏ`` supports as a ``[2ᵏ, k]`` 0/1 matrix in ``like``'s dtype (row ``r`` has bit ``j`` of ``r``)."""
    r = torch.arange(2**k, device=like.device).unsqueeze(-1)
    bit = 2 ** torch.arange(k, device=like.device)
    return ((r // bit) % 2).to(like.dtype)


def chol_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves (measured 1.2× to 7× faster than ``torch.cholesky_solve`` on
    batches of k × k systems for k = 16…256, one CPU thread; equal below)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True)


def _plus_diag(A: Tensor, diag: Tensor) -> Tensor:
    """``A + diag_embed(diag)`` for a freshly made ``A`` (added in place: one ``k × k`` pass, not three)."""
    A.diagonal(dim1=-2, dim2=-1).add_(diag)
    return A


def face_minimisers(H: Tensor, F: Tensor, rhs: Tensor) -> Tensor:
    """``(H_FF)⁻¹ rhs_F`` on every face ``F`` ``[n, k]`` at once.

    ``rhs`` ``[..., m, k, r]`` → ``[..., m, n, k, r]`` (zero off each face).
    """
    A = _plus_diag(H.unsqueeze(-3) * (F.unsqueeze(-1) * F.unsqueeze(-2)), 1 - F)  # [..., n, k, k]
    L, _ = torch.linalg.cholesky_ex(A)  # positive definite (prepare's ridge): no check, no sync
    m, k, r = rhs.shape[-3:]
    # the m problems' right-hand sides become columns: one solve per face, not one per face and problem
    R = rhs.movedim(-3, -2).reshape(*rhs.shape[:-3], 1, k, m * r) * F.unsqueeze(-1)  # [..., n, k, m r]
    X = chol_solve(L, R)
    return X.reshape(*X.shape[:-1], m, r).movedim(-2, -4)  # [..., m, n, k, r]


def quadratic(H: Tensor, c: Tensor, X: Tensor) -> Tensor:
    """``½ xᵀHx + cᵀx`` for candidates ``X`` ``[..., m, n, k]`` of the problems ``c`` ``[..., m, k]`` → ``[..., m, n]``."""
    return ((X @ H.unsqueeze(-3)) * X).sum(-1) / 2 + (X * c.unsqueeze(-2)).sum(-1)


def _simplex_point(sol: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, μ)`` on a face from ``sol = H_FF⁻¹ [1, c]`` (``[..., k, 2]``): ``x = μa − b``, ``μ = (1 + 1ᵀb)/1ᵀa``."""
    a, b = sol[..., 0], sol[..., 1]
    mu = (1 + b.sum(-1, keepdim=True)) / a.sum(-1, keepdim=True)
    return mu * a - b, mu


def pick_feasible(X: Tensor, f: Tensor) -> Tensor:
    """The candidate ``X[..., m, n, k]`` of least objective ``f`` ``[..., m, n]`` among the feasible (``X ≥ 0``) ones.

    Feasibility allows round-off (``-1e-12`` relative to the candidate's largest entry), then clamps.
    """
    tol = 1e-12 * X.abs().amax(-1).clamp(min=1.0)
    feasible = X.amin(-1) >= -tol
    f = torch.where(feasible, f, torch.full_like(f, torch.inf))
    best = f.argmin(-1, keepdim=True)  # [..., m, 1]
    return X.gather(-2, best.unsqueeze(-1).expand(*best.shape[:-1], 1, X.shape[-1])).squeeze(-2).clamp(min=0.0)


#: with the default iteration count, problems of at least this many variables run :func:`interior_point`
#: and then :data:`POLISH` active-set iterations from its support, instead of ``2k + 8`` active-set
#: iterations.  Measured (1 thread, against the active set): about equal at k = 20–32 (the interior point's
#: 30 steps cost ~6 ms of dispatch); k = 64: UPGrad 5×, DualProj 3×, MGDA 2× faster; k = 256: DualProj 21×,
#: MGDA 12×.
IPM_K = 24
#: interior-point iterations (Mehrotra's predictor-corrector) from the fixed start on the normalised problems of
#: :func:`prepare`: a cap found by testing, like ``2k + 8``.  With the polish, on randn / correlated / low-rank /
#: mixed-norm inputs with zero and antiparallel rows, k = 24…100: 30 steps agree with 3 × (2k + 8) active-set
#: iterations to 1e-10 of the largest gradient; 22 left MGDA 1e-5 off, 14 left UPGrad 7e-8 off.
IPM_ITERS = 30
#: active-set iterations after the interior point: the first lands on the exact face minimiser when the
#: interior point's support is right; the others correct a support that round-off left ambiguous
POLISH = 8


def check_iters(who: str, iters: int | None) -> None:
    """Reject a negative iteration count, naming the solver."""
    if iters is not None and iters < 0:
        raise ValueError(f"{who}: iters must be ≥ 0, got {iters}")


def default_iters(k: int) -> int:
    """The fixed iteration count of the active-set loop for ``k`` variables (a shape, not a value: no sync)."""
    return 2 * k + 8


def prepare(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(H, s)``: the normalised, regularised Gram matrix ``H`` ``[..., k, k]`` and the scale ``s = max diag G``.

    With ``D = diag(G/s)^½`` (zero rows: ``D_j = 1``), ``H = D (PSD(C) + δ I) D`` where ``C`` is the
    correlation matrix of the task gradients.  Working on ``C`` makes the PSD fix and ``δ`` relative to each
    task's own norm, so tasks whose norms differ by 1e4 are treated as accurately as equal ones.
    """
    s = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))  # torch.where: no host sync on the all-zero case
    H = G / s[..., None, None]
    diag = H.diagonal(dim1=-2, dim2=-1)
    D = torch.where(diag > 0, diag, torch.ones_like(diag)).sqrt()
    C = H / (D.unsqueeze(-1) * D.unsqueeze(-2))
    lam, V = torch.linalg.eigh((C + C.mT) / 2)
    C = (V * lam.clamp(min=0).unsqueeze(-2)) @ V.mT
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    C = (C + C.mT) / 2 + REG * eye
    return C * (D.unsqueeze(-1) * D.unsqueeze(-2)), s


def masked_solve(H: Tensor, free: Tensor, rhs: Tensor) -> Tensor:
    """``x`` with ``x_F = (H_FF)⁻¹ rhs_F`` and ``x_j = 0`` off the free set, for each problem.

    ``H`` ``[..., k, k]`` (positive definite, shared by the ``m`` problems), ``free`` ``[..., m, k]`` (bool),
    ``rhs`` ``[..., m, k, r]``.  The fixed variables get an identity row, so one batched Cholesky serves all
    supports at once.
    """
    f = free.to(H.dtype)
    A = _plus_diag(H.unsqueeze(-3) * (f.unsqueeze(-1) * f.unsqueeze(-2)), 1 - f)
    L, _ = torch.linalg.cholesky_ex(A)  # _ex: no error check, hence no host sync; A is positive definite
    return chol_solve(L, rhs * f.unsqueeze(-1))


# A face solver maps the working set [..., m, k] to (x̂ [..., m, k], multiplier offset μ [..., m, 1], exact
# [..., m, 1] bool): x̂ is the face minimiser where exact, else a point of lower objective on that face.
Face = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def active_set(grad: Callable[[Tensor], Tensor], face: Face, x: Tensor, free: Tensor, iters: int,
               objective: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The primal active-set loop (see the module docstring), ``iters`` fixed iterations, batched.

    ``grad(x)`` is the objective's gradient ``[..., m, k]``; the multipliers of the bounds ``x ≥ 0`` are
    ``grad(x̂) − μ`` at a face minimiser.  ``x`` must be feasible and zero off ``free``.  Variables enter
    the working set only after a full step to an *exact* face minimiser (see :data:`Face`).

    With ``objective`` (``[..., m, k] → [..., m]``; bound constraints only), the step is a *projected
    search*: the best of the points ``max(x + t p, 0)`` at every breakpoint ``t ≤ 1`` of the path, which is
    never worse than the plain ratio test (its first breakpoint) and drops many variables at once.
    """
    for _ in range(iters):
        xh, mu, exact = face(free)
        p = xh - x
        block = free & (p < 0)
        # ratio test: the largest step in [0, 1] keeping x + t p ≥ 0 on the free set
        ratio = torch.where(block, x / torch.where(block, -p, torch.ones_like(p)), torch.full_like(p, torch.inf))
        full = ratio.amin(-1, keepdim=True) >= 1.0
        if objective is None:
            t = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        else:
            # candidate steps: every breakpoint (clamped to 1); pick the best point of the projected path
            T = ratio.clamp(max=1.0).unsqueeze(-1)  # [..., m, k, 1]
            X = (x.unsqueeze(-2) + T * p.unsqueeze(-2)).clamp(min=0.0)  # [..., m, k, k]
            best = objective(X).argmin(-1, keepdim=True)  # [..., m, 1]
            t = T.squeeze(-1).gather(-1, best)
        hit = block & (ratio <= t)
        x = torch.where(hit, torch.zeros_like(x), (x + t * p).clamp(min=0.0))
        free = free & ~hit
        # a full step lands on the face minimiser: now every negative multiplier joins the working set
        lam = grad(x) - mu
        free = free | ((lam < -TOL) & full & exact)
    return x


def interior_point(H: Tensor, c: Tensor, simplex: bool, iters: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, support)`` of ``min ½ xᵀHx + cᵀx`` s.t. ``x ≥ 0`` (and ``1ᵀx = 1`` if ``simplex``), by ``iters``
    steps of Mehrotra's predictor-corrector method, batched over ``c``'s rows.

    Runs on the Jacobi-scaled variables ``y = x ⊙ √diag H`` (unit curvature each, whatever the task
    gradients' norms), from ``y = z = 1`` (the simplex: ``y`` on the scaled constraint).  Each step factors
    ``Ĥ + diag(z/y)`` once per problem and solves with it twice (predictor, corrector), each step cut to 0.99
    of the way to the boundary.  The residuals of stationarity and of ``1ᵀx = 1`` shrink with the steps.
    ``support`` is ``y > z`` (strict complementarity), which :func:`nonneg_qp` / :func:`simplex_qp` polish.
    """
    k = c.shape[-1]
    iters = IPM_ITERS if iters is None else iters
    h = H.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2)  # [..., 1, k], > 0 (prepare's ridge)
    H = H / (h.mT * h)
    c = c / h
    e = 1 / h  # the simplex constraint on y: eᵀy = 1
    ones = torch.ones_like(c)
    y = ones / (e * k).sum(-1, keepdim=True) if simplex else ones  # the simplex: eᵀy = 1
    z = torch.ones_like(c)
    nu = torch.zeros_like(c[..., :1])

    def longest(v: Tensor, dv: Tensor) -> Tensor:  # largest t ≤ 1 keeping v + t dv ≥ 0
        neg = dv < 0
        return torch.where(neg, v / torch.where(neg, -dv, ones), 2 * ones).amin(-1, keepdim=True).clamp(max=1.0)

    for _ in range(iters):
        rd = y @ H + c - z - nu * e  # stationarity residual (ν = 0 without the simplex)
        M = _plus_diag(H.unsqueeze(-3).expand(*y.shape, k).clone(), z / y)
        L, _ = torch.linalg.cholesky_ex(M)  # positive definite: no check, no sync
        if simplex:
            a = chol_solve(L, e.expand_as(c).unsqueeze(-1)).squeeze(-1)  # M⁻¹e
            rp = (e * y).sum(-1, keepdim=True) - 1

        def newton(rc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            # Ĥ Δy − Δz − Δν e = −rd,  z Δy + y Δz = −rc,  eᵀΔy = −rp  ⇒  (Ĥ + Z/Y) Δy = −rd − rc/y + Δν e
            dy = chol_solve(L, (-rd - rc / y).unsqueeze(-1)).squeeze(-1)
            dnu = torch.zeros_like(nu)
            if simplex:
                dnu = (-rp - (e * dy).sum(-1, keepdim=True)) / (e * a).sum(-1, keepdim=True)
                dy = dy + dnu * a
            return dy, (-rc - z * dy) / y, dnu

        mu = (y * z).sum(-1, keepdim=True) / k
        dy, dz, _ = newton(y * z)  # predictor (affine scaling)
        t = torch.minimum(longest(y, dy), longest(z, dz))
        sigma = (((y + t * dy) * (z + t * dz)).sum(-1, keepdim=True) / k / mu) ** 3
        dy, dz, dnu = newton(y * z + dy * dz - sigma * mu)  # corrector, centred
        t = 0.99 * torch.minimum(longest(y, dy), longest(z, dz))
        y, z, nu = y + t * dy, z + t * dz, nu + t * dnu
    return y / h, y > z


def nonneg_qp(H: Tensor, c: Tensor, iters: int | None = None) -> Tensor:
    """``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` for each row of ``c`` ``[..., m, k]``; ``H`` ``[..., k, k]``.

    ``H`` comes from :func:`prepare`.

    Starts from ``x = 0`` with every variable in the working set: the first ratio test then drops, in one
    step, all variables the unconstrained minimiser wants negative.  Returns ``x`` ``[..., m, k]``.

    For small ``m k 2ᵏ`` (:func:`enumerates`, default ``iters``) all ``2ᵏ`` faces are solved at once
    instead, and the feasible face minimiser of least objective is returned: the optimum is the minimiser of
    its own face (``H`` is positive definite), so this is exact, with no iteration at all.
    """
    k = H.shape[-1]
    if enumerates(k, c.shape[-2], iters):
        X = -face_minimisers(H, all_faces(k, H), c.unsqueeze(-1)).squeeze(-1)  # [..., m, 2ᵏ, k]
        # at a face minimiser xᵀHx = −cᵀx, so the objective is ½ cᵀx
        return pick_feasible(X, 0.5 * (X * c.unsqueeze(-2)).sum(-1))

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zero = torch.zeros_like(c[..., :1])
        exact = torch.ones_like(zero, dtype=torch.bool)
        return -masked_solve(H, free, c.unsqueeze(-1)).squeeze(-1), zero, exact

    m = c.shape[-2]
    # the projected search costs m k³ an iteration: only where that is cheap
    search = (lambda X: quadratic(H, c, X)) if m * k**3 <= 2**24 else None
    if iters is None and k >= IPM_K:
        x, free = interior_point(H, c, simplex=False)
        return active_set(lambda x: x @ H + c, face, torch.where(free, x, 0.0), free, POLISH, search)
    x = torch.zeros_like(c)
    return active_set(lambda x: x @ H + c, face, x, torch.ones_like(c, dtype=torch.bool),
                      default_iters(k) if iters is None else iters, search)


def simplex_qp(H: Tensor, c: Tensor, iters: int | None = None) -> Tensor:
    """``argmin_{x ≥ 0, 1ᵀx = 1} ½ xᵀHx + cᵀx`` for each row of ``c`` ``[..., m, k]``; ``H`` [..., k, k].

    ``H`` comes from :func:`prepare`.

    On a face ``F`` the minimiser is ``x = μ a − b`` with ``a = H_FF⁻¹ 1``, ``b = H_FF⁻¹ c`` and
    ``μ = (1 + 1ᵀb) / 1ᵀa`` (``F`` is never empty: the ratio test cannot zero all of a point summing to 1).
    Starts at the best vertex.  Returns ``x`` ``[..., m, k]``.  For small ``m k 2ᵏ``
    (:func:`enumerates`, default ``iters``) every nonempty face is solved at once and the best feasible face
    minimiser returned (exact).
    """
    k = H.shape[-1]
    ones = torch.ones_like(c)
    if enumerates(k, c.shape[-2], iters):
        F = all_faces(k, H)[1:]  # nonempty supports
        X, _ = _simplex_point(face_minimisers(H, F, torch.stack([ones, c], dim=-1)))  # [..., m, n, k]
        return pick_feasible(X, quadratic(H, c, X))

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, mu = _simplex_point(masked_solve(H, free, torch.stack([ones, c], dim=-1)))
        return x, mu, torch.ones_like(mu, dtype=torch.bool)

    if iters is None and k >= IPM_K:
        x, free = interior_point(H, c, simplex=True)
        free = free | (x == x.amax(-1, keepdim=True))  # never empty (x sums to 1): the largest entry is in it
        x = torch.where(free, x, 0.0)
        return active_set(lambda x: x @ H + c, face, x / x.sum(-1, keepdim=True), free, POLISH)
    vertex = (0.5 * H.diagonal(dim1=-2, dim2=-1).unsqueeze(-2) + c).argmin(-1)
    x = (torch.arange(k, device=c.device) == vertex.unsqueeze(-1)).to(c.dtype)  # one_hot would sync
    return active_set(lambda x: x @ H + c, face, x, x > 0, default_iters(k) if iters is None else iters)
