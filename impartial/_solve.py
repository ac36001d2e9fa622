"""The solve step of :func:`impartial.backward`: a block's task gradients ``J`` → one direction (and, for a
block with blocks below it, the resolved rows), rescaled to the plain sum's norm when ``keep_norm``.

Sibling blocks with the same tasks and size (the MVAE's experts: every ``mu`` and ``logvar``) are solved as
one batched problem ``[n_blocks, k, d]`` when the solver is stateless and deterministic (:data:`_BATCHABLE`):
one solver call instead of one per block, the same numbers up to round-off.  A stateful or random solver
(GradNorm, Nash-MTL's warm start, PCGrad's permutations) is called once per block, in block order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _distributed as _dist
from . import solvers as _solvers
from .graph._blocks import Block
from .solvers import Solver, combine, gram
from .solvers._base import _LOW, mix

#: solvers whose weights are a pure function of ``(G, losses)`` (no state, no random draws): a batch of
#: blocks is then exactly a batch of problems.  Exact types: a subclass may add state.
_BATCHABLE = tuple(getattr(_solvers, n) for n in ("Sum", "Mean", "IMTLG", "MGDA", "CAGrad", "UPGrad",
                                                  "DualProj", "AlignedMTL", "ConFIG"))


class _Solving:
    """Mixin of :class:`impartial._backward._Run`: ``block_J`` and ``solve`` (uses its ``tasks``, ``group``,
    ``per_sample`` and ``keep_norm``)."""

    def block_J(self, b: Block, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The solver's ``J`` for block ``b`` from its task gradients ``rows`` ``[k_b, *shape]`` (``[k_b, numel]``,
        or ``[B, k_b, numel/B]`` per sample; views, no copy) and the context of coordinate solvers."""
        kb, shape = rows.shape[0], rows.shape[1:]
        act = b.tensor if b.leaf is None else None  # a coordinate solver's ``inputs``: activations only
        if self.per_sample and b.leaf is None:
            if len(shape) == 0:
                raise ValueError(f"per_sample=True: block {b.name!r} is a scalar and has no batch dim")
            B = shape[0]
            # one sample per problem: inputs [B, 1, F]
            return rows.reshape(kb, B, -1).transpose(0, 1), {} if act is None else {
                "inputs": act.detach().reshape(B, 1, -1)}
        # J's rows are the [B, F] block gradients, batch-major
        return rows.reshape(kb, -1), {} if act is None else {
            "inputs": act.detach().reshape(shape[0] if len(shape) else 1, -1)}

    def solve(self, solver: Solver, Js: list[Tensor], ts: Sequence[int], ctx: dict[str, Tensor] | None,
              need_rows: bool = False, G: Tensor | None = None,
              local: bool = False) -> tuple[list[Tensor], Tensor | None, tuple]:
        """Directions of the pieces ``Js`` (``[..., k, d_p]`` each; ``J`` is their concatenation), resolved rows
        (when ``need_rows``; one piece) and ``(G, weights, keep_norm scale)``, with ``J``'s batch dims.

        Gram-space solvers cost two passes over ``J`` (the Gram matrix, the direction ``wᵀJ``), and one more for
        ``keep_norm`` (the plain sum, whose norm is taken directly: ``sqrt(1ᵀG1)`` would lose half the digits
        where the tasks nearly cancel).
        """
        losses = torch.stack([self.tasks.outs[i].detach() for i in ts])
        if self.group is not None:  # the full-batch losses: the mean of the ranks' means
            losses = _dist.all_mean(losses, self.group)
        losses = losses.expand(Js[0].shape[:-1])
        if G is None:
            G = sum(gram(J) for J in Js)
        w = R = None
        if solver.gram_space:  # piece by piece: G = Σ_p J_p J_pᵀ, d_p = wᵀ J_p
            if need_rows:
                M = solver.mixing(G, losses=losses)
                w, R = M.sum(-2), mix(M, Js[0])
            else:
                w = solver.weights(G, losses=losses)
            ds = [combine(w, J) for J in Js]
        else:
            J = Js[0] if len(Js) == 1 else torch.cat(Js, dim=-1)
            if need_rows:
                R = solver.apply(J, losses=losses, **(ctx or {}))
                d = R.sum(-2)
            else:
                d = solver(J, losses=losses, **(ctx or {}))
            ds = list(d.split([J.shape[-1] for J in Js], dim=-1))
        if not self.keep_norm:
            scale = torch.ones(G.shape[:-2], dtype=G.dtype, device=G.device)
        else:
            sums = [J.sum(-2) for J in Js]
            sq = torch.stack([_sq_norm(sums, G.dtype), _sq_norm(ds, G.dtype)])
            if local:  # sums over coordinates: add the ranks' (the 1/W² of both cancels in the ratio)
                sq = _dist.all_sum(sq, self.group)
            plain, norm = sq.sqrt().unbind(0)
            # torch.where: a zero direction stays zero (no 0/0).
            pos = norm > 0
            scale = torch.where(pos, plain / torch.where(pos, norm, 1.0), 0.0)
            if solver.gram_space:  # the directions are fresh products (wᵀJ): scale them in place, no new buffer
                ds = [d.mul_(scale.unsqueeze(-1).to(d.dtype)) for d in ds]
            else:
                ds = [d * scale.unsqueeze(-1).to(d.dtype) for d in ds]
            if R is not None:
                R = R * scale[..., None, None].to(R.dtype)
        return ds, R, (G, w, scale)


def batchable(solvers: list[Solver]) -> bool:
    """Whether sibling blocks may share one solver call (one stateless, deterministic solver for all)."""
    return len(solvers) == 1 and type(solvers[0]) in _BATCHABLE


def _sq_norm(pieces: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The squared norm ``[...]`` of the concatenation of ``pieces`` ``[..., d_p]``, combined in ``dtype``."""
    # the norm in the pieces' own dtype (float32 norms of 1e6 entries are accurate to ~1e-7 and 10x faster
    # than an upcast); half precision in float32, where a sum of squares would overflow
    return sum(torch.linalg.vector_norm(p, dim=-1, dtype=torch.float32 if p.dtype in _LOW else None).to(dtype).pow(2)
               for p in pieces)
