"""The semantics of ``impartial.backward`` at marked blocks, as a plain loop with tensor hooks.

For blocks ``b₁, b₂, …`` in top-down order (a block comes before every block below it): task ``i``'s gradient
at block ``b`` is computed by a backward of loss ``i`` alone in which every block above ``b`` *replaces* the
gradient arriving there by its resolved row for task ``i``.  The solver's rows at ``b`` (rescaled to the norm
of the plain sum when ``keep_norm``) are its resolved rows.  The parameters' gradients are the sum over tasks of
one such backward with every block replaced, plus the plain gradient of the ``also`` terms.  No batching, no
graph tracing, no bookkeeping of corrections: one hook-replaced backward per (block, task).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from impartial.solvers import Solver, Status


def keep_norm_scale(J: Tensor, d: Tensor, w: tuple[Tensor, bool]) -> Tensor:
    """``keep_norm``'s factor for direction ``d`` of task gradients ``J`` with weights and solver verdict ``w``
    (:func:`_weights`): the plain sum's norm over the direction's, or 0 when the block is Pareto-stationary, i.e.
    the solver says STATIONARY or ``d`` is shorter than ``τ · Σ|w_i| · max_j ‖g_j‖`` with ``τ = 64 k ε + 1e-9``
    (impartial/_solve.py, docs/backward.md)."""
    weights, stationary = w
    eps = torch.finfo(torch.float32 if J.dtype in (torch.float16, torch.bfloat16) else J.dtype).eps
    tau = 64 * J.shape[0] * eps + 1e-9
    n = d.norm()
    if stationary or n <= tau * weights.abs().sum() * J.norm(dim=1).max():
        return torch.zeros((), dtype=J.dtype)
    return J.sum(0).norm() / n


def _weights(solver: Solver, J: Tensor, losses: Tensor) -> tuple[Tensor, bool]:
    """The solver's weights on ``J`` (ones for a solver that has none) and whether it says STATIONARY, from a copy
    (a stateful solver's own state does not advance)."""
    if not solver.gram_space:
        return torch.ones(J.shape[0], dtype=J.dtype), False
    sol = copy.deepcopy(solver).solve(J @ J.T, losses=losses)
    return sol.weights.to(J.dtype), bool((sol.status == int(Status.STATIONARY)).any())


def _reachable(loss: Tensor, t: Tensor) -> bool:
    return torch.autograd.grad(loss, t, retain_graph=True, allow_unused=True)[0] is not None


def _grad_with(loss: Tensor, inputs: Sequence[Tensor], replace: dict[int, tuple[Tensor, Tensor]]) -> list[Tensor]:
    """``autograd.grad(loss, inputs)`` where the gradient at each block tensor is replaced."""
    handles = [t.register_hook(lambda g, r=r: r) for t, r in replace.values()]
    try:
        out = torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True, materialize_grads=True)
    finally:
        for h in handles:
            h.remove()
    # an input that is itself a replaced block passes on its replacement (torch captures an input that a further
    # input lies below before its hooks run, so the capture alone would give the gradient before the replacement)
    return [replace[id(t)][1] if id(t) in replace else o for t, o in zip(inputs, out)]


def backward_ref(
    tasks: Sequence[Tensor],
    blocks: Sequence[Tensor],
    params: Sequence[Tensor],
    solver: Solver | Sequence[Solver],
    also: Sequence[Tensor] = (),
    keep_norm: bool = True,
) -> list[Tensor]:
    """The gradients of ``params`` that ``impartial.backward(tasks, block=blocks, …)`` writes.

    ``solver``: one for every block, or one per block (in the order of ``blocks``).  Each solver is called
    once, with ``losses=`` the detached losses of its block's tasks.  ``params`` may hold activations too:
    their gradient is the one this call passes through them.
    """
    solvers = list(solver) if isinstance(solver, Sequence) else [solver] * len(blocks)
    resolved: list[dict[int, Tensor]] = []  # per block: task -> resolved row
    for j, b in enumerate(blocks):
        ts = [i for i, t in enumerate(tasks) if _reachable(t, b)]
        rows = []
        for i in ts:
            replace = {id(blocks[a]): (blocks[a], resolved[a][i]) for a in range(j) if i in resolved[a]}
            rows.append(_grad_with(tasks[i], [b], replace)[0])
        J = torch.stack(rows).reshape(len(ts), -1)
        losses = torch.stack([tasks[i] for i in ts]).detach()
        w = _weights(solvers[j], J, losses)
        R = solvers[j].apply(J, losses=losses)
        if keep_norm:
            R = R * keep_norm_scale(J, R.sum(0), w)
        resolved.append({i: R[c].reshape(b.shape) for c, i in enumerate(ts)})
    total = [torch.zeros_like(p) for p in params]
    for i, t in enumerate(tasks):
        replace = {id(b): (b, resolved[a][i]) for a, b in enumerate(blocks) if i in resolved[a]}
        for acc, g in zip(total, _grad_with(t, params, replace)):
            acc += g
    for a in also:
        for acc, g in zip(
            total, torch.autograd.grad(a, list(params), retain_graph=True, allow_unused=True, materialize_grads=True)
        ):
            acc += g
    return total


def params_ref(
    tasks: Sequence[Tensor],
    shared: Sequence[Tensor],
    params: Sequence[Tensor],
    solver: Solver,
    also: Sequence[Tensor] = (),
    keep_norm: bool = True,
) -> list[Tensor]:
    """The gradients of ``params`` that ``impartial.backward(tasks, shared, block="params", …)`` writes: the
    solver's direction on ``J`` (row ``i``: task ``i``'s gradient of all ``shared``, flattened) for the shared
    parameters, the plain gradient of the tasks for every other tensor in ``params``; plus the ``also`` terms."""

    def grads(loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
        return list(
            torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True, materialize_grads=True)
        )

    J = torch.stack([torch.cat([g.reshape(-1) for g in grads(t, shared)]) for t in tasks])
    losses = torch.stack(list(tasks)).detach()
    w = _weights(solver, J, losses)
    d = solver(J, losses=losses)
    if keep_norm:
        d = d * keep_norm_scale(J, d, w)
    by_id = {id(p): piece.reshape(p.shape) for p, piece in zip(shared, d.split([p.numel() for p in shared]))}
    total = [by_id[id(p)].clone() if id(p) in by_id else torch.zeros_like(p) for p in params]
    for t in tasks:
        for acc, p, g in zip(total, params, grads(t, params)):
            if id(p) not in by_id:
                acc += g
    for a in also:
        for acc, g in zip(total, grads(a, params)):
            acc += g
    return total


def backward_ref_direct(
    tasks: Sequence[Tensor],
    blocks: Sequence[Tensor],
    params: Sequence[Tensor],
    solver: Solver,
    also: Sequence[Tensor] = (),
    keep_norm: bool = True,
) -> list[Tensor]:
    """``nested="direct"``, the paper's reference hooks: a block solves only the task gradients that reach it on
    paths through no block above (those blocks' gradients cut to zero), and what arrives through the blocks above
    passes it unchanged.  The parameters' gradients: one backward of the summed losses in which each block's
    incoming gradient ``g`` becomes ``g − Σ_i direct_i + d`` (its direct part replaced by its direction)."""
    directions: list[Tensor] = []
    direct_sums: list[Tensor] = []
    for j, b in enumerate(blocks):
        ts = [i for i, t in enumerate(tasks) if _reachable(t, b)]
        cut = {id(blocks[a]): (blocks[a], torch.zeros_like(blocks[a])) for a in range(j)}
        rows = [_grad_with(tasks[i], [b], cut)[0] for i in ts]
        J = torch.stack(rows).reshape(len(ts), -1)
        w = _weights(solver, J, None)  # type: ignore[arg-type]
        d = solver(J)
        if keep_norm:
            d = d * keep_norm_scale(J, d, w)
        directions.append(d.reshape(b.shape))
        direct_sums.append(J.sum(0).reshape(b.shape))
    handles = [b.register_hook(lambda g, s=s, d=d: g - s + d) for b, s, d in zip(blocks, direct_sums, directions)]
    try:
        out = torch.autograd.grad(
            sum(tasks) + sum(also, torch.zeros(())),
            list(params),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    finally:
        for h in handles:
            h.remove()
    return list(out)
