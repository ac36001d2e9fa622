"""Host-driven schedules of the QP solvers: on the CPU, outside any trace, stop on the KKT residual.

The fixed schedules of :mod:`._qp_faces` exist for CUDA, ``vmap`` and ``torch.compile``, where reading a value
would stall the device or break the trace.  On the CPU a value costs nothing to read, so where nothing traces
the call (:func:`on_host`) the solvers stop as soon as each problem is solved, and drop solved problems from
the batch:

- :func:`projected_gradient`: accelerated projected gradient (FISTA, Beck & Teboulle 2009, restarted where
  the residual rises, O'Donoghue & Candès 2015) on the Jacobi-scaled box QP.  One ``m × k`` by ``k × k``
  product per iteration, shared by all problems: no factorisation.  It converges fast where the task
  gradients are far from collinear, and it is given up on problems whose residual stalls.
- :func:`host_active_set`: the exact active-set iterations of :func:`._qp_faces.as_step`, on the unsolved
  problems only, until each one settles (a full step to its face minimiser with no negative multiplier);
  from :data:`COMPACT_K` variables its face systems shrink to the largest free set (:func:`compact_solve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import mul

import torch
from torch import Tensor

from ._qp_faces import chol_solve

#: iterations between two residual checks of :func:`projected_gradient` (each check reads one value)
CHECK = 5
#: the active set solves faces by :func:`compact_solve` from this many variables on
COMPACT_K = 64
#: :func:`compact_solve` takes its problems in chunks of at most this many gathered entries (1 MB in float64)
CHUNK = 2**17


def on_host(*tensors: Tensor) -> bool:
    """Whether a solve may read values: every tensor is a plain CPU tensor, and nothing compiles or traces.

    ``vmap`` and ``torch.func`` transforms wrap their tensors (functorch wrappers), ``torch.compile`` traces
    with FakeTensors (a subclass) under ``is_compiling``; each of these gets the fixed, sync-free schedule.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    for t in tensors:
        if type(t) is not Tensor or t.device.type != "cpu":
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):  # vmap / grad / jvp wrappers
            return False
    return True


def residual(lam: Tensor, y: Tensor) -> Tensor:
    """The KKT residual ``[..., m]`` of ``y ≥ 0`` with multipliers ``lam`` (both ``[..., m, k]``, Jacobi-scaled):
    ``max(max(−λ)⁺ / (1 + |y|∞), max|y λ| / (1 + |y|∞)²)``, zero exactly at a KKT point."""
    s = 1 + y.abs().amax(-1)
    return torch.maximum((-lam).clamp(min=0).amax(-1) / s, (y * lam).abs().amax(-1) / (s * s))


def host_residual(lam: list[float], y: list[float]) -> float:
    """:func:`residual` of one problem read to the host (``k``-vectors as floats), for the direct paths that
    certify an answer in a few host reads."""
    s = 1 + max(map(abs, y))
    return max(max(0.0, -min(lam)) / s, max(map(abs, map(mul, y, lam))) / s**2)


def dot(x: list[float], y: list[float]) -> float:
    """``xᵀy`` of two host ``k``-vectors."""
    return sum(map(mul, x, y))


def _lmax(A: Tensor) -> Tensor:
    """An estimate ``[..., 1, 1]`` of the largest eigenvalue of the PSD ``A``: the Rayleigh quotient after 8
    power steps (a lower bound, close to ``λ``: a step up to ``2/λ`` still converges, and
    :func:`projected_gradient` backs off where it does not).  Unnormalised steps:
    ``λ ≤ k`` after the Jacobi scaling, so ``k⁸`` stays far from overflow.  Small ``A`` (where each op costs
    more than its flops) squares itself three times instead of taking eight steps."""
    k = A.shape[-1]
    # a start of distinct entries: the ones vector is orthogonal to sign-balanced eigenvectors (g, −g pairs)
    v = 1 + torch.arange(k, dtype=A.dtype, device=A.device).expand_as(A[..., :1, :]) / k
    if k <= 64:
        A8 = A @ A
        A8 = A8 @ A8
        v = v @ (A8 @ A8)
    else:
        for _ in range(8):
            v = v @ A
    return ((v @ A) * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp(min=1e-300)


def projected_gradient(H: Tensor, c: Tensor, iters: int, tol: float) -> tuple[Tensor, Tensor]:
    """``(x, r)``: ``argmin_{x ≥ 0} ½ xᵀHx + cᵀx`` for each row of ``c`` ``[..., m, k]``, and its residual ``[..., m]``.

    Projected gradient on ``y = x ⊙ √diag H`` with step ``1/L``, from ``y = 0``.  The residual is read after
    :data:`CHECK` iterations, then where the rate seen so far predicts ``tol`` (2 to ``4 CHECK`` iterations
    on): the loop ends when every problem has ``r ≤ tol`` or after ``iters`` iterations.  Where the worst
    residual falls less than a hundredfold in :data:`CHECK` iterations, the iterations turn into FISTA, one
    momentum for all problems (three ops an iteration: at small ``k`` each op costs more than its flops),
    restarted at a check where the worst residual rose; when even that does not cut the residual tenfold in
    ``4 CHECK`` iterations, or when, after ``k/2`` iterations, its rate needs more than ``k`` more (an exact
    active-set iteration costs about ``k`` of these), the loop gives up (ill-conditioned problems: the active
    set does better there).
    """
    k = H.shape[-1]
    h = H.diagonal(dim1=-2, dim2=-1).rsqrt()
    cs = c * h.unsqueeze(-2)
    x = torch.zeros_like(cs)
    r = (-cs).clamp(min=0).amax(-1)  # the residual at x = 0, which solves every problem with c ≥ 0
    seen = [(0, r.max().item())]
    if seen[0][1] <= tol:
        return x, r
    Hs = H * (h.unsqueeze(-1) * h.unsqueeze(-2))
    step = 1 / _lmax(Hs)
    # one iteration is z = y − step (y Hs + cs) = y M + b, then x = max(z, 0): one product and one clamp
    M = torch.eye(Hs.shape[-1], dtype=Hs.dtype, device=Hs.device) - step * Hs
    b = -step * cs
    y, t, fista, it, check = x, 1.0, False, 0, CHECK
    while seen[-1][1] > tol and it < iters:
        it += 1
        z = _affine(b, y, M)
        xn = z.clamp(min=0.0)
        if fista:
            tn = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = torch.lerp(x, xn, 1 + (t - 1) / tn)
            t = tn
        else:
            y = xn
        x = xn
        if it == check or it == iters:
            r = residual(_affine(cs, x, Hs), x)
            seen.append((it, r.max().item()))
            (i0, r0), (i1, r1) = seen[-2], seen[-1]
            if r1 <= tol:
                break
            if r1 > r0:
                t = 1.0
            if not r1 < 10 * r0:  # diverging (a step too long for an underestimated L), or NaN: back off
                step = step / 4
                M = torch.eye(Hs.shape[-1], dtype=Hs.dtype, device=Hs.device) - step * Hs
                b = -step * cs
                x = y = torch.zeros_like(cs)
                t = 1.0
                seen.append((it, seen[0][1]))
                check = it + CHECK
                continue
            rate = (max(r1, 1e-300) / max(r0, 1e-300)) ** (1 / (i1 - i0))
            fista = fista or rate > 0.4  # plain steps cut the residual less than a hundredfold in five
            if fista and len([s for s in seen if s[0] >= it - 4 * CHECK]) > 4 and r1 > 0.1 * seen[-5][1]:
                break
            # the iterations the current rate needs to reach tol
            ahead = math.log(max(tol, 1e-300) / max(r1, 1e-300)) / math.log(min(max(rate, 1e-3), 0.99))
            if fista and it >= k // 2 and ahead > k:
                break  # slower than the active set from here (one of its iterations costs ~k of these)
            # the next check where the current rate would reach tol (between 2 and 4 CHECK from here)
            check = it + min(max(math.ceil(ahead), 2), 4 * CHECK)
    return x * h.unsqueeze(-2), r


def _affine(b: Tensor, y: Tensor, M: Tensor) -> Tensor:
    """``b + y M``, fused where the shapes allow (one op per iteration counts at small ``k``)."""
    if M.ndim == 2 and y.ndim == 2:
        return torch.addmm(b, y, M)
    if M.ndim == 3 and y.ndim == 3:
        return torch.baddbmm(b, y, M)
    return b + y @ M


def compact_solve(H: Tensor, free: Tensor, rhs: Tensor) -> Tensor:
    """:func:`._qp_faces.masked_solve` for one shared ``H`` ``[k, k]``, on matrices of the largest free set only.

    ``free`` ``[n, k]`` (bool), ``rhs`` ``[n, k, r]``.  Each problem's free variables are gathered to the front
    (the rest of its ``f = max |F|`` slots get identity rows), so the batched Cholesky costs ``n f³``, not
    ``n k³``: where the supports are small (correlated tasks) that is a fraction.  Problems are taken in chunks
    of :data:`CHUNK` gathered entries, so the memory does not grow with ``n``.  Reads ``f``: host only.
    """
    n, k = free.shape
    size = free.sum(-1)
    f = int(size.max())
    rows = max(1, CHUNK // (max(f, 1) * k))  # memory: the gathered rows of H, [rows · f, k], are the largest buffer
    if n > rows:
        return torch.cat([compact_solve(H, free[i : i + rows], rhs[i : i + rows]) for i in range(0, n, rows)])
    order = torch.argsort((~free).to(torch.uint8), dim=-1, stable=True)[:, :f]  # free ones first
    on = torch.arange(f, device=free.device) < size.unsqueeze(-1)  # [n, f]: the slot holds a free variable
    # rows then columns: two plain gathers run ~3x faster than one advanced index [n, f, f]
    A = H.index_select(0, order.reshape(-1)).view(n, f, k).gather(-1, order.unsqueeze(-2).expand(n, f, f))
    A.masked_fill_(~(on.unsqueeze(-1) & on.unsqueeze(-2)), 0.0).diagonal(dim1=-2, dim2=-1).add_(~on)
    L, _ = torch.linalg.cholesky_ex(A)  # positive definite (prepare's ridge)
    b = rhs.gather(-2, order.unsqueeze(-1).expand(n, f, rhs.shape[-1])) * on.unsqueeze(-1)
    X = chol_solve(L, b)
    return torch.zeros_like(rhs).scatter_(-2, order.unsqueeze(-1).expand_as(X), X)


Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def host_active_set(step_for: Callable[[Tensor], Step], x: Tensor, free: Tensor, iters: int) -> Tensor:
    """Active-set iterations on rows ``x``, ``free`` ``[n, k]`` until each row settles (at most ``iters``).

    ``step_for(rows)`` gives the step (:func:`._qp_faces.as_step` on those rows' data) mapping their
    ``(x, free)`` to ``(x, free, settled)``; settled rows leave the batch.  Returns ``x``.
    """
    x, free = x.clone(), free.clone()
    todo = torch.arange(x.shape[0], device=x.device)
    for _ in range(iters):
        if todo.numel() == 0:
            break
        xs, fs, settled = step_for(todo)(x[todo], free[todo])
        x[todo], free[todo] = xs, fs
        todo = todo[~settled]
    return x


def host_iters(k: int) -> int:
    """The cap on host active-set iterations for ``k`` variables (each iteration adds or drops variables)."""
    return 4 * k + 16
