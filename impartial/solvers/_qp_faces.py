"""Face machinery of the QP solvers, and the fixed, sync-free schedules (CUDA, ``vmap``, ``torch.compile``).

A *face* of ``{x ≥ 0}`` (or of the simplex) fixes the variables off a *working set* ``F`` at zero.  Every method
of :mod:`._qp` is built from the minimisers of the objective on faces:

- :func:`face_minimisers` solves every face of a small problem at once (enumeration: a strictly convex QP's
  optimum minimises its own face, and is the one face minimiser that is both feasible and dual feasible);
- :func:`as_step` is one iteration of the primal active-set method (Nocedal & Wright, *Numerical
  Optimization*, §16.5): minimise on ``F`` (one masked, batched Cholesky), walk towards that minimiser until
  the first variable hits zero (the ratio test; hitting variables leave ``F``), and after a full step add
  *every* variable whose multiplier is negative.  The objective never increases, so it cannot cycle, and
  once ``F`` is the optimal support the face minimiser is the exact solution;
- :func:`interior_point` (Mehrotra's predictor-corrector) finds the support of large problems in a number
  of steps that does not grow with ``k``; active-set steps from there land on the exact face minimiser.

The fixed schedules run a set number of iterations with ``torch.where`` for every branch; converged
problems are fixed points.  The host-driven schedules of :mod:`._qp_host` reuse :func:`as_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: a multiplier below ``-TOL`` (relative to the normalised Gram matrix) puts its variable in the working set.
TOL = 1e-11
#: with the default iteration count, ``m`` problems of ``k`` variables are solved by enumerating all ``2ᵏ``
#: faces while ``m k 2ᵏ ≤ ENUM_WORK`` (UPGrad up to k = 8, one problem up to k = 10; on the host up to k = 9)
ENUM_WORK = 2**14
#: on the host the active set is faster from k = 10 on (one problem, one thread, min of 60-100 calls at d = 20 and
#: 1e4: DualProj 2.07 -> 0.71 ms, MGDA 1.92 -> 1.14, CAGrad 2.29 -> 1.38; at k = 9 enumerating is as fast or faster)
HOST_ENUM_K = 9
#: with the default iteration count, the fixed schedule gives problems of at least this many variables to
#: :func:`interior_point` and then :data:`POLISH` active-set iterations, instead of ``2k + 8`` of them
IPM_K = 24
#: interior-point iterations of the fixed schedule
IPM_ITERS = 30
#: active-set iterations after the interior point (the first lands on the face minimiser of its support)
POLISH = 8

# A face solver maps the working set [..., m, k] to (x̂ [..., m, k], multiplier offset μ [..., m, 1], exact
# [..., m, 1] bool): x̂ is the face minimiser where exact, else a point of lower objective on that face.
Face = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def enumerates(k: int, m: int, iters: int | None, host: bool = False) -> bool:
    """Whether the faces are enumerated (a shape rule: no sync); ``host``: for the host-driven schedule."""
    return iters is None and m * k * 2**k <= ENUM_WORK and (not host or k <= HOST_ENUM_K)


def default_iters(k: int) -> int:
    """The fixed iteration count of the active-set loop for ``k`` variables (a shape, not a value: no sync)."""
    return 2 * k + 8


def all_faces(k: int, like: Tensor) -> Tensor:
    """All ``2ᵏ`` supports as a ``[2ᵏ, k]`` 0/1 matrix in ``like``'s dtype (row ``r`` has bit ``j`` of ``r``).

    Kept per ``(k, dtype, device)`` by :func:`kept_constant` (seven ops a call at the sizes that enumerate).
    """
    return kept_constant(_FACES, (k, like.dtype, like.device), lambda: _faces(k, like.dtype, like.device))


def kept_constant(cache: dict, key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``cache[key]``, made by ``make()`` the first time: a constant tensor that small calls would otherwise
    rebuild with several ops each time.  Not kept under ``torch.compile`` (made in the graph), nor where made as
    a FakeTensor or an inference tensor, which must not outlive their mode."""
    if torch.compiler.is_compiling():
        return make()
    value = cache.get(key)
    if value is None:
        value = make()
        if type(value) is Tensor and not value.is_inference():  # no FakeTensor, no inference tensor (autograd)
            cache[key] = value
    return value


#: :func:`all_faces` made so far (k ≤ 10 enumerates: at most a few kB each)
_FACES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _faces(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r = torch.arange(2**k, device=device).unsqueeze(-1)
    bit = 2 ** torch.arange(k, device=device)
    return ((r // bit) % 2).to(dtype)


def chol_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves (faster than ``torch.cholesky_solve`` on batches, CPU)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True)


def plus_diag(A: Tensor, diag: Tensor) -> Tensor:
    """``A + diag_embed(diag)`` for a freshly made ``A`` (added in place: one ``k × k`` pass, not three)."""
    A.diagonal(dim1=-2, dim2=-1).add_(diag)
    return A


def face_minimisers(H: Tensor, F: Tensor, rhs: Tensor) -> Tensor:
    """``(H_FF)⁻¹ rhs_F`` on every face ``F`` ``[n, k]`` at once: ``rhs`` ``[..., m, k, r]`` → ``[..., m, n, k, r]``."""
    A = plus_diag(H.unsqueeze(-3) * (F.unsqueeze(-1) * F.unsqueeze(-2)), 1 - F)  # [..., n, k, k]
    L, _ = torch.linalg.cholesky_ex(A)  # positive definite (prepare's ridge): no check, no sync
    m, k, r = rhs.shape[-3:]
    # the m problems' right-hand sides become columns: one solve per face, not one per face and problem
    R = rhs.movedim(-3, -2).reshape(*rhs.shape[:-3], 1, k, m * r) * F.unsqueeze(-1)  # [..., n, k, m r]
    X = chol_solve(L, R)
    return X.reshape(*X.shape[:-1], m, r).movedim(-2, -4)  # [..., m, n, k, r]


def quadratic(H: Tensor, c: Tensor, X: Tensor) -> Tensor:
    """``½ xᵀHx + cᵀx`` for candidates ``X`` ``[..., m, n, k]`` of the problems ``c`` ``[..., m, k]``.

    Returns ``[..., m, n]``.
    """
    # one H (the host's rows): a plain [m n, k] × [k, k] product; broadcasting a [1, k, k] runs a slow bmm
    HX = X @ (H if H.ndim == 2 else H.unsqueeze(-3))
    return (HX.mul_(0.5).add_(c.unsqueeze(-2)) * X).sum(-1)


def simplex_point(sol: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, μ)`` on a face from ``sol = H_FF⁻¹ [1, c]`` (``[..., k, 2]``): ``x = μa − b``, ``μ = (1 + 1ᵀb)/1ᵀa``."""
    a, b = sol[..., 0], sol[..., 1]
    mu = (1 + b.sum(-1, keepdim=True)) / a.sum(-1, keepdim=True)
    return mu * a - b, mu


def pick_feasible(X: Tensor, f: Tensor) -> Tensor:
    """The candidate ``X[..., m, n, k]`` of least score ``f`` ``[..., m, n]`` among the feasible (``X ≥ 0``) ones.

    Feasibility allows round-off (``-1e-12`` relative to the candidate's largest entry), then clamps.
    """
    tol = 1e-12 * X.abs().amax(-1).clamp(min=1.0)
    feasible = X.amin(-1) >= -tol
    f = torch.where(feasible, f, torch.full_like(f, torch.inf))
    best = f.argmin(-1, keepdim=True)  # [..., m, 1]
    return X.gather(-2, best.unsqueeze(-1).expand(*best.shape[:-1], 1, X.shape[-1])).squeeze(-2).clamp(min=0.0)


def masked_solve(H: Tensor, free: Tensor, rhs: Tensor) -> Tensor:
    """``x`` with ``x_F = (H_FF)⁻¹ rhs_F`` and ``x_j = 0`` off the free set, for each problem.

    ``H`` ``[..., k, k]`` (positive definite, shared by the ``m`` problems), ``free`` ``[..., m, k]`` (bool),
    ``rhs`` ``[..., m, k, r]``.  The fixed variables get an identity row, so one batched Cholesky serves all
    supports at once.
    """
    f = free.to(H.dtype)
    A = plus_diag(H.unsqueeze(-3) * (f.unsqueeze(-1) * f.unsqueeze(-2)), 1 - f)
    L, _ = torch.linalg.cholesky_ex(A)  # _ex: no error check, hence no host sync; A is positive definite
    return chol_solve(L, rhs * f.unsqueeze(-1))


def as_step(
    grad: Callable[[Tensor], Tensor],
    face: Face,
    x: Tensor,
    free: Tensor,
    objective: Callable[[Tensor], Tensor] | None = None,
    simplex: bool = False,
    scale: Tensor | None = None,
    breakpoints: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One active-set iteration (see the module docstring): ``(x, free, settled [..., m])``.

    ``grad(x)`` is the objective's gradient ``[..., m, k]``; the multipliers of the bounds ``x ≥ 0`` are
    ``grad(x̂) − μ`` at a face minimiser.  ``x`` must be feasible and zero off ``free``.  Variables enter the
    working set only after a full step to an *exact* face minimiser (see :data:`Face`); ``settled`` marks the
    problems where that step found no negative multiplier: ``x`` satisfies the KKT conditions.  ``scale``
    (``[..., 1, k]``) multiplies the multipliers before that test (``1/√diag H``: each task's own units).

    With ``objective`` (``[..., m, k] → [..., m]``), the step is a *projected search*: the best of the points
    ``max(x + t p, 0)`` at every breakpoint ``t ≤ 1`` of the path and at ``t = 1`` (``simplex``: scaled back
    onto it), which is never worse than the plain ratio test (its first breakpoint, feasible as it is) and
    drops many variables at once.  Where the face has no minimiser (not exact) the breakpoints past 1 are
    candidates too: the optimum is on the face's boundary, and a majoriser step would only creep towards it.
    ``breakpoints`` (host only: reads a value) keeps only as many breakpoints as the most blocked problem has.
    """
    xh, mu, exact = face(free)
    p = xh - x
    block = free & (p < 0)
    # ratio test: the largest step in [0, 1] keeping x + t p ≥ 0 on the free set
    ratio = torch.where(block, x / torch.where(block, -p, torch.ones_like(p)), torch.full_like(p, torch.inf))
    full = ratio.amin(-1, keepdim=True) >= 1.0
    if objective is None:
        t = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        hit = block & (ratio <= t)
        x = torch.where(hit, torch.zeros_like(x), (x + t * p).clamp(min=0.0))
        if simplex:  # back onto 1ᵀx = 1 exactly: an ill-conditioned face solve leaves it off by round-off
            x = x / x.sum(-1, keepdim=True)
    else:
        # candidate steps: every breakpoint, and 1; pick the best point of the projected path.  Past 1 only on
        # a face without a minimiser (not exact): the optimum is then on its boundary, so go on to it
        T = torch.where(exact & (ratio > 1.0), 1.0, ratio)
        if breakpoints:  # host: only the most blocking variables' breakpoints (the others' are 1, or ∞ → 1)
            T = T.topk(max(int(block.sum(-1).amax()), 1), -1, largest=False).values
        T = torch.cat([torch.where(T.isinf(), 1.0, T), torch.ones_like(T[..., :1])], -1).unsqueeze(-1)
        X = (x.unsqueeze(-2) + T * p.unsqueeze(-2)).clamp(min=0.0)  # [..., m, k, k]
        if simplex:
            X = X / X.sum(-1, keepdim=True)
        best = objective(X).argmin(-1, keepdim=True)  # [..., m, 1]
        t = T.squeeze(-1).gather(-1, best)
        hit = block & (ratio <= t)
        x = torch.where(hit, 0.0, X.gather(-2, best.unsqueeze(-1).expand(*best.shape, x.shape[-1])).squeeze(-2))
    free = free & ~hit
    # a full step lands on the face minimiser: now every negative multiplier joins the working set
    lam = grad(x) - mu
    enter = ((lam if scale is None else lam * scale) < -TOL) & full & exact
    settled = (full & exact).squeeze(-1) & ~enter.any(-1)
    return x, free | enter, settled


def active_set(
    grad: Callable[[Tensor], Tensor],
    face: Face,
    x: Tensor,
    free: Tensor,
    iters: int,
    objective: Callable[[Tensor], Tensor] | None = None,
    simplex: bool = False,
    scale: Tensor | None = None,
) -> Tensor:
    """``iters`` fixed iterations of :func:`as_step`, batched, with no host sync."""
    for _ in range(iters):
        x, free, _ = as_step(grad, face, x, free, objective, simplex, scale)
    return x


def _newton(
    L: Tensor, rd: Tensor, rc: Tensor, y: Tensor, z: Tensor, e: Tensor, side: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One Newton direction ``(Δy, Δz, Δν)`` of :func:`interior_point` (``side``: ``(M⁻¹e, eᵀy − 1)`` on the simplex).

    ``Ĥ Δy − Δz − Δν e = −rd``, ``z Δy + y Δz = −rc``, ``eᵀΔy = −rp`` ⇒ ``(Ĥ + Z/Y) Δy = −rd − rc/y + Δν e``.
    """
    dy = chol_solve(L, (-rd - rc / y).unsqueeze(-1)).squeeze(-1)
    dnu = torch.zeros_like(y[..., :1])
    if side is not None:
        a, rp = side
        dnu = (-rp - (e * dy).sum(-1, keepdim=True)) / (e * a).sum(-1, keepdim=True)
        dy = dy + dnu * a
    return dy, (-rc - z * dy) / y, dnu


def interior_point(H: Tensor, c: Tensor, simplex: bool, iters: int = IPM_ITERS) -> tuple[Tensor, Tensor]:
    """``(x, support)`` of ``min ½ xᵀHx + cᵀx`` s.t. ``x ≥ 0`` (and ``1ᵀx = 1`` if ``simplex``), by ``iters``
    steps of Mehrotra's predictor-corrector method, batched over ``c``'s rows.

    Runs on the Jacobi-scaled variables ``y = x ⊙ √diag H`` (unit curvature each, whatever the task
    gradients' norms), from ``y = z = 1`` (the simplex: ``y`` on the scaled constraint).  Each step factors
    ``Ĥ + diag(z/y)`` once per problem and solves with it twice (predictor, corrector), each step cut to 0.99
    of the way to the boundary.  ``support`` is ``y > z`` (strict complementarity), which the active set
    polishes.
    """
    k = c.shape[-1]
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
        M = plus_diag(H.unsqueeze(-3).expand(*y.shape, k).clone(), z / y)
        L, _ = torch.linalg.cholesky_ex(M)  # positive definite: no check, no sync
        # the simplex's M⁻¹e and primal residual eᵀy − 1
        side = (
            (chol_solve(L, e.expand_as(c).unsqueeze(-1)).squeeze(-1), (e * y).sum(-1, keepdim=True) - 1)
            if simplex
            else None
        )

        mu = (y * z).sum(-1, keepdim=True) / k
        dy, dz, _ = _newton(L, rd, y * z, y, z, e, side)  # predictor (affine scaling)
        t = torch.minimum(longest(y, dy), longest(z, dz))
        sigma = (((y + t * dy) * (z + t * dz)).sum(-1, keepdim=True) / k / mu) ** 3
        dy, dz, dnu = _newton(L, rd, y * z + dy * dz - sigma * mu, y, z, e, side)  # corrector, centred
        t = 0.99 * torch.minimum(longest(y, dy), longest(z, dz))
        y, z, nu = y + t * dy, z + t * dz, nu + t * dnu
    return y / h, y > z
