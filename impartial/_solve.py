"""The solve at each block: its task gradients ``J`` → one direction (and, for a block with blocks below it, the
resolved rows), rescaled to the plain sum's norm when ``keep_norm``, with the solver's status.

Each block has its own solver state: where one solver instance serves several blocks, block ``j`` is served by
``solver.for_block(j)`` (a stateful solver keeps one state per block, as ``torch.optim`` keeps one per parameter);
a solver that serves one block (or one given per block) is used itself.  Sibling blocks with the same tasks and
size (the MVAE's experts: every ``mu`` and ``logvar``) are solved as one batched problem ``[n_blocks, k, d]``
when the solver is :attr:`~impartial.solvers.Solver.batchable` (stateless and deterministic): one solver call
instead of one per block, the same numbers up to round-off.

**Pareto-stationary blocks.**  A direction shorter than ``τ · Σ_i |w_i| · max_j ‖g_j‖`` (``τ = 64 k ε + 10⁻⁹``,
``ε`` the machine epsilon of the dtype ``wᵀJ`` is summed in: ``J``'s, float32 for half precision) is noise of the
solve at the problem's scale: the exact direction is 0 (MGDA with a zero task, UPGrad with exactly opposed tasks).
Such a block, or one whose solver says :attr:`Status.STATIONARY`, has status STATIONARY in the report, and with
``keep_norm`` it passes 0 (rescaling noise to the plain sum's norm would point anywhere).  The rule is
scale-invariant, so float32 and float64 runs agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _distributed as _dist
from ._call import Call
from ._checks import Blame, Check, said
from ._plan import Plan
from .graph._blocks import Block
from .solvers import Solution, Solver, Status, combine, gram
from .solvers._gram import _LOW, mix, sync_free

__all__ = ["Solved", "block_gram", "solve_level", "solve_pieces", "rescale"]


@dataclass
class Solved:
    """One block's result: its direction (block shape), its resolved rows (``[k_b, *shape]``, when a block below
    needs them) and the report values."""

    d: Tensor
    R: Tensor | None
    G: Tensor
    w: Tensor | None
    scale: Tensor
    status: Tensor


def _local(call: Call, b: Block) -> bool:
    """Whether the block's rows are this rank's coordinates of the task gradients (an activation block under a
    process group, not per sample): its Gram is then the sum over the ranks."""
    return call.group is not None and b.leaf is None and not call.per_sample


def block_J(call: Call, b: Block, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The solver's ``J`` for block ``b`` from its task gradients ``rows`` ``[k_b, *shape]`` (``[k_b, numel]``, or
    ``[B, k_b, numel/B]`` per sample; views, no copy) and the context of coordinate solvers (marked blocks)."""
    kb, shape = rows.shape[0], rows.shape[1:]
    act = b.tensor
    if call.per_sample and b.leaf is None:
        if len(shape) == 0:
            raise ValueError(f"per_sample=True: block {b.name!r} is a scalar and has no batch dim")
        B = shape[0]
        ctx = {} if act is None else {"inputs": act.detach().reshape(B, 1, -1)}
        return rows.reshape(kb, B, -1).transpose(0, 1), ctx
    ctx = {} if act is None else {"inputs": act.detach().reshape(shape[0] if len(shape) else 1, -1)}
    return rows.reshape(kb, -1), ctx


def block_gram(call: Call, plan: Plan, j: int, rows: Tensor) -> tuple[Tensor, Check]:
    """Block ``j``'s Gram (kept for the solve) and the check of its rows: the diagonal of ``G`` is finite iff the rows
    are (the solve needs ``G`` anyway)."""
    b = plan.blocks[j]
    J, _ = block_J(call, b, rows)
    G = gram(J)
    if _local(call, b):  # the rows are this rank's coordinates: the full-batch Gram is Σ_r G_r / W²
        G = _dist.all_sum(G, call.group) / _dist.world(call.group) ** 2
    names = call.tasks.names
    blame: list[Blame | None] = [(i, said("the gradient of {!r} at block {!r}", names[i], b.name)) for i in b.tasks]
    return G, Check(
        G.diagonal(dim1=-2, dim2=-1).isfinite().reshape(-1, len(b.tasks)).all(0),
        blame,
        lambda r: bool(rows[r].isfinite().all()),
    )


def block_solver(call: Call, plan: Plan, j: int) -> Solver:
    """The solver of block ``j``: the one given for it; where one instance serves several blocks, its per-block
    child (:meth:`Solver.for_block`), so that no two blocks share a state."""
    given = call.solvers[0] if len(call.solvers) == 1 else call.solvers[j]
    serves = sum(s is given for s in call.solvers) if len(call.solvers) > 1 else len(plan.blocks)
    return given.for_block(j) if serves > 1 else given


def _rows(call: Call, plan: Plan, j: int) -> bool:
    """Whether block ``j``'s resolved rows are needed: a block below it sees them (``nested="resolved"``)."""
    return call.nested == "resolved" and j in plan.has_below


def solve_level(
    call: Call, plan: Plan, lvl: list[int], rows: dict[int, Tensor], grams: dict[int, Tensor]
) -> dict[int, Solved]:
    """The solves of the blocks of one level; sibling blocks with the same tasks and size share one solver call
    when the solver allows it."""
    blocks, one = plan.blocks, call.solvers[0]
    groups: dict[tuple, list[int]] = {}
    for j in lvl:
        b, r = blocks[j], rows[j]
        batch = len(call.solvers) == 1 and one.batchable and not call.per_sample
        key = (b.tasks, r[0].numel(), r.dtype, _local(call, b), _rows(call, plan, j)) if batch else (j,)
        groups.setdefault(key, []).append(j)
    out: dict[int, Solved] = {}
    for js in groups.values():
        if len(js) == 1:
            j = js[0]
            b, r = blocks[j], rows[j]
            J, ctx = block_J(call, b, r)
            solver = block_solver(call, plan, j)
            (d,), R, s = solve_pieces(call, solver, [J], b.tasks, ctx, _rows(call, plan, j), grams[j], _local(call, b))
            if R is not None:
                R = (R.transpose(0, 1) if J.ndim == 3 else R).reshape(r.shape)
            out[j] = Solved(d.reshape(r.shape[1:]), R, s.G.sum(0) if s.G.ndim == 3 else s.G, s.w, s.scale, s.status)
            continue
        J = torch.stack([rows[j].reshape(rows[j].shape[0], -1) for j in js])  # [n_blocks, k_b, numel]
        b0 = blocks[js[0]]
        (d,), R, s = solve_pieces(
            call,
            one,
            [J],
            b0.tasks,
            None,
            _rows(call, plan, js[0]),
            torch.stack([grams[j] for j in js]),
            _local(call, b0),
        )
        for m, j in enumerate(js):
            shape = rows[j].shape
            out[j] = Solved(
                d[m].reshape(shape[1:]),
                None if R is None else R[m].reshape(shape),
                s.G[m],
                None if s.w is None else s.w[m],
                s.scale[m],
                s.status[m],
            )
    return out


@dataclass
class _Solution:
    G: Tensor
    w: Tensor | None
    scale: Tensor
    status: Tensor


def solve_pieces(
    call: Call,
    solver: Solver,
    Js: list[Tensor],
    ts: Sequence[int],
    ctx: dict[str, Tensor] | None,
    need_rows: bool,
    G: Tensor,
    local: bool = False,
) -> tuple[list[Tensor], Tensor | None, _Solution]:
    """Directions of the pieces ``Js`` (``[..., k, d_p]`` each; ``J`` is their concatenation, ``G`` its Gram),
    the resolved rows (when ``need_rows``; one piece), and the Gram, weights, ``keep_norm`` scale and status."""
    losses = torch.stack([call.tasks.outs[i] for i in ts]).detach()
    if call.group is not None:  # the full-batch losses: the mean of the ranks' means
        losses = _dist.all_mean(losses, call.group)
    losses = losses.expand(Js[0].shape[:-1])
    w = R = None
    if solver.gram_space:  # piece by piece: G = Σ_p J_p J_pᵀ, d_p = wᵀ J_p
        sol = solver.solve(G, losses=losses, precision=Js[0].dtype, mixing=need_rows)  # type: ignore[attr-defined]
        w, status = sol.weights, sol.status.to(torch.int8)
        if need_rows:
            R = mix(sol.mixing, Js[0])
        if call.keep_norm:  # the direction and the plain sum in one pass over J: weights [w; 1]
            both = [combine2(w, J) for J in Js]
            ds, sums = [b[..., 0, :] for b in both], [b[..., 1, :] for b in both]
        else:
            ds, sums = [combine(w, J) for J in Js], []
    else:
        J = Js[0] if len(Js) == 1 else torch.cat(Js, dim=-1)
        if need_rows:
            R = solver.apply(J, losses=losses, **(ctx or {}))
            d = R.sum(-2)
        else:
            d = solver(J, losses=losses, **(ctx or {}))
        ds = list(d.split([J.shape[-1] for J in Js], dim=-1))
        sums = [J.sum(-2) for J in Js] if call.keep_norm else []
        status = torch.zeros(G.shape[:-2], dtype=torch.int8, device=G.device)
    ds, R, scale, status = rescale(call, ds, R, G, w, status, local, Js[0].dtype, lambda c: _sq_norm(sums, c))
    return ds, R, _Solution(G, w, scale, status)


def rescale(
    call: Call,
    ds: list[Tensor],
    R: Tensor | None,
    G: Tensor,
    w: Tensor | None,
    status: Tensor,
    local: bool,
    dtype: torch.dtype,
    plain_sq: Callable[[Tensor], Tensor],
) -> tuple[list[Tensor], Tensor | None, Tensor, Tensor]:
    """Mark Pareto-stationary blocks (see the module docstring) and apply ``keep_norm`` to the directions ``ds``
    (fresh products when ``w`` is given: scaled in place) and the resolved rows ``R``.  ``plain_sq(c)``: the
    squared norm of ``c`` times the plain sum of the task gradients."""
    norms = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # ‖g_i‖
    top = norms.amax(-1)
    terms = (w.abs().sum(-1) if w is not None else G.shape[-1]) * top  # the problem's scale: Σ|w_i| max‖g_j‖
    # ε of the dtype the direction is summed in (half precision is combined in float32)
    tau = 64 * G.shape[-1] * torch.finfo(torch.float32 if dtype in _LOW else dtype).eps + 1e-9
    if not call.keep_norm and w is not None and not local and _clearly_moving(G, w, terms, tau, dtype):
        return ds, R, torch.ones_like(top), status  # no block is near stationary: nothing to mark, nothing to scale
    # norms in a safe range: every piece times c ≈ 1/max‖g_i‖ (a power of two; the ratio below cancels it)
    c = torch.where(top > 0, torch.exp2(-torch.floor(torch.log2(torch.where(top > 0, top, 1.0)))), 1.0)
    both = torch.stack([_sq_norm(ds, c)] + ([plain_sq(c)] if call.keep_norm else []))
    if local:  # sums over coordinates: add the ranks' (the 1/W² of every term cancels in the ratio)
        both = _dist.all_sum(both, call.group)
    dn = both[0].sqrt() / c
    stationary = (dn <= tau * terms) | (status == int(Status.STATIONARY))
    status = torch.where(stationary & (status == int(Status.OK)), int(Status.STATIONARY), status).to(torch.int8)
    if not call.keep_norm:
        return ds, R, torch.ones_like(dn), status
    plain = both[1].sqrt() / c
    # torch.where: no host sync; a stationary block passes 0
    scale = torch.where(stationary, 0.0, plain / torch.where(stationary | (dn == 0), 1.0, dn))
    fresh = w is not None
    ds = [d.mul_(scale.unsqueeze(-1).to(d.dtype)) if fresh else d * scale.unsqueeze(-1).to(d.dtype) for d in ds]
    if R is not None:
        R = R * scale[..., None, None].to(R.dtype)
    return ds, R, scale, status


def _clearly_moving(G: Tensor, w: Tensor, terms: Tensor, tau: float, dtype: torch.dtype) -> bool:
    """Whether every direction ``wᵀJ`` is, by its Gram alone, far above :func:`rescale`'s stationarity level
    ``τ Σ|w_i| max‖g_j‖``; read on the host, so on plain CPU tensors outside any trace only (else False).

    ``wᵀGw`` is off by at most ``ε_G (Σ|w_i| ‖g_i‖)²`` where ``ε_G`` bounds the relative error of ``G``'s entries
    (1e-4 for a float32 or half precision ``J``, 100× float32's accumulated error; 1e-12 for float64), so
    ``wᵀGw > 4 (ε_G + τ²) terms²`` proves ``‖d‖ > τ terms`` without a pass over the direction.  Near the level
    (and for ``keep_norm``, whose scale needs ``‖d‖`` to full precision) the direction's own norm is taken.
    """
    if sync_free(G, w):
        return False
    eps_g = 1e-12 if dtype == torch.float64 else 1e-4
    quad = torch.linalg.vecdot(w.to(G.dtype), (G @ w.to(G.dtype).unsqueeze(-1)).squeeze(-1))
    return bool((quad > 4 * (eps_g + tau * tau) * terms * terms).all())


def rescale_pieces(
    call: Call, ds: list[Tensor], G: Tensor, sol: Solution, dtype: torch.dtype, plain_sq: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor], Tensor, Tensor]:
    """:func:`rescale` of one problem solved in one process whose direction is the pieces ``ds`` (no resolved rows):
    the flat rescaled pieces, the ``keep_norm`` scale and the status."""
    flat, _, scale, status = rescale(
        call, [d.reshape(-1) for d in ds], None, G, sol.weights, sol.status.to(torch.int8), False, dtype, plain_sq
    )
    return flat, scale, status


def combine2(w: Tensor, J: Tensor) -> Tensor:
    """``[..., 2, d]``: the direction ``wᵀJ`` and the plain sum ``1ᵀJ``, from one product (one pass over ``J``)."""
    W = torch.stack([w, torch.ones_like(w)], dim=-2)  # [..., 2, k]
    if J.dtype in _LOW:
        return (W.float() @ J.float()).to(J.dtype)
    return W.to(J.dtype) @ J


def _sq_norm(pieces: list[Tensor], c: Tensor) -> Tensor:
    """The squared norm ``[...]`` of ``c ×`` the concatenation of ``pieces`` ``[..., d_p]``, in ``c``'s dtype."""
    out = torch.zeros_like(c)
    for p in pieces:
        q = p.float() if p.dtype in _LOW else p
        out = out + torch.linalg.vector_norm(q * c.unsqueeze(-1).to(q.dtype), dim=-1).to(c.dtype).pow(2)
    return out
