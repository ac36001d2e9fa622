"""Batched small quadratic programs on a Gram matrix: the machinery MGDA, CAGrad, UPGrad and DualProj share.

Two problem shapes, each solved for many right-hand sides at once (``m`` problems per Gram matrix):

- :func:`nonneg_qp`: ``min_x ½ xᵀHx + cᵀx`` s.t. ``x ≥ 0`` (UPGrad's and DualProj's ``v ≥ u`` with ``v = u + x``);
- :func:`simplex_qp`: the same on the simplex ``x ≥ 0, 1ᵀx = 1`` (MGDA's min-norm point).

**Conditioning.** :func:`prepare` divides ``G`` by its largest diagonal entry (the solutions are scale-free,
so inputs from 1e-10 to 1e15 behave alike), sets the eigenvalues of the tasks' correlation matrix that the
input's precision cannot tell from zero to zero (:func:`cutoff`), and adds ``δ = 1e-12`` to its diagonal.
The solvers thus solve *exactly* the problem of the slightly perturbed gradients ``[J, √δ·diag(‖g_i‖)]`` (a
zero gradient is perturbed as if it had the largest norm): every face system is positive definite,
rank-deficient, duplicate and zero rows need no special case, and the direction moves by ``O(δ)`` relative
to each task (by up to ``O(√δ) = 1e-6`` where the feasible cone or the hull is degenerate, e.g. 0 on its
boundary).

**Methods** (:mod:`._qp_faces`, :mod:`._qp_host`).  Small problems enumerate every face (exact, no
iteration).  Otherwise, on the CPU outside any trace (:func:`._qp_host.on_host`), box QPs run accelerated
projected gradient until the KKT residual is at round-off, and the problems where it stalls run exact
active-set iterations until they settle; simplex QPs take the affine hull's minimiser where it is feasible
and run the active set from the centre of the simplex elsewhere.
Elsewhere (CUDA, ``vmap``, ``torch.compile``) a fixed, sync-free schedule runs: an interior point then
active-set iterations for ``k ≥ IPM_K``, ``2k + 8`` active-set iterations below.  Both return the KKT
residual (:func:`nonneg_residual`, :func:`simplex_residual`), which the solvers report as their status:
above :data:`RESIDUAL_TOL` a problem did not converge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._qp_faces import (
    IPM_K,
    POLISH,
    Face,
    active_set,
    all_faces,
    as_step,
    chol_solve,
    default_iters,
    enumerates,
    face_minimisers,
    interior_point,
    masked_solve,
    pick_feasible,
    quadratic,
    simplex_point,
)
from ._qp_host import COMPACT_K, compact_solve, host_active_set, host_iters, projected_gradient, residual
from ._qp_prepare import (
    PG_ITERS,
    PG_TOL,
    REG,
    RESIDUAL_TOL,
    Prepared,
    check_iters,
    cutoff,
    min_norm,
    prepare,
    status,
    zero_direction,
)

__all__ = [
    "Prepared",
    "prepare",
    "cutoff",
    "min_norm",
    "nonneg_qp",
    "simplex_qp",
    "nonneg_residual",
    "simplex_residual",
    "status",
    "zero_direction",
    "check_iters",
    "REG",
    "RESIDUAL_TOL",
]


def nonneg_residual(H: Tensor, c: Tensor, x: Tensor) -> Tensor:
    """The KKT residual ``[..., m]`` of ``x ≥ 0`` for ``min ½ xᵀHx + cᵀx`` (on the Jacobi-scaled variables)."""
    h = H.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2)
    return residual((x @ H + c) / h, x * h)


def simplex_residual(H: Tensor, c: Tensor, x: Tensor) -> Tensor:
    """The KKT residual ``[..., m]`` of ``x`` on the simplex: ``λ = Hx + c − μ1`` with ``μ = xᵀ(Hx + c)``."""
    g = x @ H + c
    return residual(g - (g * x).sum(-1, keepdim=True), x)


def nonneg_qp(H: Tensor, c: Tensor, iters: int | None = None, host: bool = False) -> tuple[Tensor, Tensor]:
    """``(x, r)``: ``x = argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` for each row of ``c`` ``[..., m, k]`` and its KKT residual.

    ``H`` ``[..., k, k]`` comes from :func:`prepare`; ``host`` selects the host-driven schedule (see the module
    docstring).  ``iters`` (default: by size) caps the active-set iterations and turns off enumeration, the
    interior point and projected gradient: the active set then starts from ``x = 0`` with every variable in
    the working set, so its first ratio test drops all variables the unconstrained minimiser wants negative.
    """
    k, m = H.shape[-1], c.shape[-2]
    if enumerates(k, m, iters, host):
        X = -face_minimisers(H, all_faces(k, H), c.unsqueeze(-1)).squeeze(-1)  # [..., m, 2ᵏ, k]
        x = pick_feasible(X, _dual_infeasibility(H, c, X, scale=_units(H)))
    elif host:
        return _nonneg_host(H, c, iters)
    else:
        x = _nonneg_fixed(H, c, iters)
    return x, nonneg_residual(H, c, x)


def _dual_infeasibility(
    H: Tensor, c: Tensor, X: Tensor, mu: Tensor | None = None, scale: Tensor | None = None
) -> Tensor:
    """``max_j −λ_j`` ``[..., m, n]`` of face minimisers ``X`` ``[..., m, n, k]``: ``λ = Hx + c − μ``, times ``scale``.

    A face minimiser is primal feasible (``x ≥ 0``) and dual feasible (``λ ≥ 0``) only at the optimum, so the
    enumeration picks by this, not by the objective: a multiplier ``ε`` short of the optimum costs the objective
    only ``~ε²/2`` (5e-19 at ``ε`` = 1e-9, far below its round-off), which cannot tell the faces apart.
    """
    if scale is not None:  # ``[..., 1, k]``: scale the columns of H and c, not the [..., m, n, k] product
        H, c = H * scale, c * scale
    lam = (X @ (H if H.ndim == 2 else H.unsqueeze(-3))).add_(c.unsqueeze(-2))  # one H: one plain product
    if mu is not None:
        lam.sub_(mu)
    return lam.amin(-1).neg_()


def _nonneg_face(H: Tensor, c: Tensor, host: bool = False) -> Face:
    # on the host one shared H is solved on the largest free set only (free [n, k] there); below COMPACT_K
    # the gathers cost more than the smaller Cholesky saves
    solve = compact_solve if host and H.ndim == 2 and c.ndim == 2 and H.shape[-1] >= COMPACT_K else masked_solve

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zero = torch.zeros_like(c[..., :1])
        return -solve(H, free, c.unsqueeze(-1)).squeeze(-1), zero, torch.ones_like(zero, dtype=torch.bool)

    return face


def _units(H: Tensor) -> Tensor:
    """``1/√diag H`` ``[..., 1, k]``: a box QP's multipliers in each task's own units (see :func:`nonneg_residual`)."""
    return H.diagonal(dim1=-2, dim2=-1).rsqrt().unsqueeze(-2)


def _nonneg_fixed(H: Tensor, c: Tensor, iters: int | None) -> Tensor:
    k, m = H.shape[-1], c.shape[-2]
    # the projected search costs m k³ an iteration: only where that is cheap
    search = (lambda X: quadratic(H, c, X)) if m * k**3 <= 2**24 else None
    face, grad = _nonneg_face(H, c), lambda x: x @ H + c
    if iters is None and k >= IPM_K:
        x, free = interior_point(H, c, simplex=False)
        return active_set(grad, face, torch.where(free, x, 0.0), free, POLISH, search, scale=_units(H))
    return active_set(
        grad,
        face,
        torch.zeros_like(c),
        torch.ones_like(c, dtype=torch.bool),
        default_iters(k) if iters is None else iters,
        search,
        scale=_units(H),
    )


def _nonneg_host(H: Tensor, c: Tensor, iters: int | None) -> tuple[Tensor, Tensor]:
    k = H.shape[-1]
    if iters is None:
        x, r = projected_gradient(H, c, PG_ITERS, PG_TOL)
        todo = r > PG_TOL
        if not bool(todo.any()):
            return x, r
        free = x > 0
    else:
        x, free = torch.zeros_like(c), torch.ones_like(c, dtype=torch.bool)
        todo = torch.ones_like(c[..., 0], dtype=torch.bool)
    rows = todo.reshape(-1).nonzero().squeeze(-1)
    x = x.reshape(-1, k).clone()
    step_for = _row_steps(H, c, rows, lambda H, c: _nonneg_face(H, c, host=True), search=iters is not None)
    x[rows] = host_active_set(step_for, x[rows], free.reshape(-1, k)[rows], host_iters(k) if iters is None else iters)
    x = x.reshape(c.shape)
    return x, nonneg_residual(H, c, x)


def _row_steps(H: Tensor, c: Tensor, rows: Tensor, make_face, simplex: bool = False, search: bool = True):
    """Steps of :func:`._qp_faces.as_step` on chosen rows of the flattened problems ``c`` ``[..., m, k]``.

    One Gram matrix: the rows share it (they are the ``m`` problems of one call).  Several: each row takes
    its own as a batch of one problem.  The step is a projected search where it costs at most ``2²⁴`` and
    ``search`` (off after projected gradient: from its support the face minimiser is a full step or one ratio
    test away, and the search's candidates cost ~20% of the solve; the same answers, measured).
    """
    k, m = H.shape[-1], c.shape[-2]
    Hb, cf = H.reshape(-1, k, k), c.reshape(-1, k)

    def step_for(idx: Tensor):
        g = rows[idx]
        if Hb.shape[0] == 1:
            Hr, cr, squeeze = Hb[0], cf[g], False
        else:
            Hr, cr, squeeze = Hb[torch.div(g, m, rounding_mode="floor")], cf[g].unsqueeze(-2), True
        n = cr.shape[0]
        objective = (lambda X: quadratic(Hr, cr, X)) if search and n * k**3 <= 2**24 else None
        face, scale = make_face(Hr, cr), None if simplex else _units(Hr)

        def step(x: Tensor, free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            if squeeze:
                x, free = x.unsqueeze(-2), free.unsqueeze(-2)
            x, free, settled = as_step(lambda x: x @ Hr + cr, face, x, free, objective, simplex, scale, True)
            if squeeze:
                return x.squeeze(-2), free.squeeze(-2), settled.squeeze(-1)
            return x, free, settled

        return step

    return step_for


def simplex_qp(H: Tensor, c: Tensor, iters: int | None = None, host: bool = False) -> tuple[Tensor, Tensor]:
    """``(x, r)``: ``argmin_{x ≥ 0, 1ᵀx = 1} ½ xᵀHx + cᵀx`` for each row of ``c`` ``[..., m, k]``, and its residual.

    On a face ``F`` the minimiser is ``x = μ a − b`` with ``a = H_FF⁻¹ 1``, ``b = H_FF⁻¹ c`` and
    ``μ = (1 + 1ᵀb) / 1ᵀa`` (``F`` is never empty: the ratio test cannot zero all of a point summing to 1).
    Small problems enumerate every nonempty face; the host schedule starts at the centre of the simplex with
    every variable free (the affine-hull minimiser is often the answer), the fixed one at the best vertex.
    """
    k = H.shape[-1]
    ones = torch.ones_like(c)
    if enumerates(k, c.shape[-2], iters, host):
        F = all_faces(k, H)[1:]  # nonempty supports
        X, mu = simplex_point(face_minimisers(H, F, torch.stack([ones, c], dim=-1)))  # [..., m, n, k]
        x = pick_feasible(X, _dual_infeasibility(H, c, X, mu))
        x = x / x.sum(-1, keepdim=True)  # pick_feasible clamps round-off negatives (−1.3e-12 seen) off the sum
    elif host:
        x = _simplex_host(H, c, iters)
    else:
        x = _simplex_fixed(H, c, iters)
    return x, simplex_residual(H, c, x)


def _simplex_host(H: Tensor, c: Tensor, iters: int | None) -> Tensor:
    """The host schedule of :func:`simplex_qp`: the affine hull's minimiser where it is feasible, else the
    active set from the centre on the other problems.

    With every variable free the minimiser of the hull ``1ᵀx = 1`` satisfies ``Hx + c = μ1``: where it is
    also ``≥ 0`` it is the solution (every bound multiplier is 0).  That is the usual case for task
    gradients far from collinear, and costs one Cholesky and no search.
    """
    k = H.shape[-1]
    ones = torch.ones_like(c)
    x = c.new_full(c.shape, 1.0 / k)
    todo = torch.ones_like(c[..., 0], dtype=torch.bool)
    if iters is None:
        L, info = torch.linalg.cholesky_ex(H)  # positive definite after prepare's ridge: info is 0
        hull, _ = simplex_point(chol_solve(L.unsqueeze(-3), torch.stack([ones, c], dim=-1)))
        todo = (hull.amin(-1) < 0) | (info != 0).unsqueeze(-1)
        if not bool(todo.any()):
            return hull
        x = torch.where(todo.unsqueeze(-1), x, hull)
    rows = todo.reshape(-1).nonzero().squeeze(-1)
    x = x.reshape(-1, k).clone()
    step_for = _row_steps(H, c, rows, _simplex_face, simplex=True)
    x[rows] = host_active_set(
        step_for, x[rows], ones.reshape(-1, k)[rows] > 0, host_iters(k) if iters is None else iters
    )
    return x.reshape(c.shape)


def _simplex_face(H: Tensor, c: Tensor) -> Face:
    ones = torch.ones_like(c)

    def face(free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, mu = simplex_point(masked_solve(H, free, torch.stack([ones, c], dim=-1)))
        return x, mu, torch.ones_like(mu, dtype=torch.bool)

    return face


def _simplex_fixed(H: Tensor, c: Tensor, iters: int | None) -> Tensor:
    k = H.shape[-1]
    if iters is None and k >= IPM_K:
        x, free = interior_point(H, c, simplex=True)
        free = free | (x == x.amax(-1, keepdim=True))  # never empty (x sums to 1): the largest entry is in it
        x = torch.where(free, x, 0.0)
        return active_set(
            lambda x: x @ H + c, _simplex_face(H, c), x / x.sum(-1, keepdim=True), free, POLISH, simplex=True
        )
    vertex = (0.5 * H.diagonal(dim1=-2, dim2=-1).unsqueeze(-2) + c).argmin(-1)
    x = (torch.arange(k, device=c.device) == vertex.unsqueeze(-1)).to(c.dtype)  # one_hot would sync
    return active_set(
        lambda x: x @ H + c, _simplex_face(H, c), x, x > 0, default_iters(k) if iters is None else iters, simplex=True
    )
