"""``impartial.backward``: a drop-in for ``sum(losses).backward()`` that resolves task conflicts where they meet.

Three steps (see ``DESIGN.md``, "The picture"):

1. **Trace** the graphs of the losses and find the blocks (:mod:`impartial.graph`).
2. **Per-task gradients at each block**, all rows in one batched backward (``is_grads_batched``); the
   parameters of one task only (heads) get their task's gradient in the same pass.  Where vmap cannot run an
   op, a loop over tasks replaces it and the :class:`Report` says so.
3. **Solve, then continue**: the solver maps the block's ``J [k, numel]`` to one direction (rescaled to the
   norm of the plain sum when ``keep_norm``), and a single backward from all block edges and ``also`` terms
   writes the shared parameters' gradients.

The last backward seeds block ``b`` with ``σ_b = d_b − a_b`` where ``d_b`` is its direction and ``a_b`` what
reaches it from the seeds of blocks above it (zero for a top-level block), so that exactly ``d_b`` leaves
every block.  Where some task also reaches a shared parameter on a path through no block (possible with
``shared_params`` or marked blocks that do not cover every path), the last backward seeds every task loss
too and ``σ_b = d_b − Σ_i J_b[i]``: the same gradients, with the heads traversed once more.

Every autograd call is ``torch.autograd.grad``; ``.grad`` is written only at the end, so every error (bad
input, freed graph, non-finite task gradient) leaves ``.grad`` untouched.  Post-accumulate-grad hooks on
the parameters do not run (tensor hooks do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import solvers as _solvers
from ._engine import _Engine
from ._report import BlockReport, Report, cosine
from .graph._blocks import Block, _find
from .graph._trace import Losses, Params, _as_losses, _as_params, _bits, _build
from .solvers import Solver, combine, gram
from .solvers._base import mix

__all__ = ["backward", "Report"]


def backward(losses: Losses, shared_params: Params = None, *,
             solver: Solver | str | Sequence[Solver] | None = None,
             block: str | Sequence[Tensor] = "auto", also: Sequence[Tensor] = (), per_sample: bool = False,
             keep_norm: bool = True, retain_graph: bool = False) -> Report:
    """Backpropagate ``losses`` (one scalar per task), resolving their conflicts where their gradients meet.

    - ``losses``: scalar tensors (a list, a dict name → loss, or a 1-D tensor), one per task.
    - ``shared_params``: the parameters whose gradients are resolved (None: inferred, the leaves that two
      or more tasks reach); ``named_parameters()`` gives readable names in errors and the report.  Every
      other leaf gets its plain gradient.
    - ``solver``: a :class:`~impartial.solvers.Solver` (default ``IMTLG()``), its name, or one solver per
      block (a stateful solver shared by several blocks would mix their states).
    - ``block``: ``"auto"`` (the blocks of :func:`impartial.graph.find_blocks`), ``"params"`` (solve on the
      shared parameters' own gradients, k vector-Jacobian products in one batched call), or a list of
      activations to use as blocks.
    - ``also``: terms added plainly, never tasks (a KL, a regulariser).
    - ``per_sample``: a block's leading dim is the batch: B problems of size ``k × numel/B``.  A block that
      is a parameter (read directly by several tasks) is solved as one problem.
    - ``keep_norm``: rescale each block's direction to the norm of the plain sum (per sample).
    - ``retain_graph``: as in torch.  The backward through the shared parameters frees the graph; with
      ``block="params"`` the graph is not freed early but released with the losses.

    Gradients accumulate into ``.grad``.  With k = 1 this is a plain backward.
    Solvers get ``losses=`` (the detached losses of the block's tasks, ``[B, k_b]`` when per-sample).
    Coordinate solvers (GradDrop) also get ``inputs=``, the block's activation, at marked blocks; at automatic
    blocks autograd keeps no handle on the activation, so they run without it (GradDrop's form without the
    input sign).  Errors name the loss or parameter and leave every ``.grad`` untouched.

    >>> from impartial.solvers import Sum
    >>> enc, x = torch.nn.Linear(3, 4), torch.randn(8, 3)
    >>> z = enc(x)
    >>> report = backward([z.sum(), z.pow(2).sum()], enc.parameters(), solver=Sum(), keep_norm=False)
    >>> report.blocks[0].name, enc.weight.grad.shape
    ('AddmmBackward0 [8, 4]', torch.Size([4, 3]))
    """
    tasks = _as_losses(losses, "losses")
    extra = _as_losses(also, "also", offset=len(tasks.outs), allow_empty=True)
    params = _as_params(shared_params)
    solvers = [_as_solver(s) for s in solver] if isinstance(solver, (list, tuple)) else [_as_solver(solver)]
    if isinstance(block, str) and block not in ("auto", "params"):
        raise ValueError(f"block must be 'auto', 'params' or a list of tensors, got {block!r}")
    if per_sample and isinstance(block, str) and block == "params":
        raise ValueError("per_sample=True needs activation blocks (parameters have no batch dim); use block='auto'")
    g = _build(tasks, extra, params)
    run = _Run(g, tasks, extra, retain_graph, solvers=solvers, per_sample=per_sample, keep_norm=keep_norm)
    mode = block if isinstance(block, str) else "explicit"
    if g.k == 1:  # nothing to resolve: a plain backward
        _find(g, tasks, explicit=[])
        run.blocks_pass()
    elif mode == "params":
        run.check_solvers(1)
        run.params_pass()
    else:
        _find(g, tasks, explicit=None if mode == "auto" else list(block))
        run.check_solvers(len(g.blocks))
        run.blocks_pass()
    run.write()
    name = repr(solvers[0]) if len(solvers) == 1 else f"[{', '.join(map(repr, solvers))}]"
    return Report(mode, name, tuple(tasks.names), tuple(extra.names), tuple(run.reports), run.fallback)


def _as_solver(solver: Solver | str | None) -> Solver:
    if solver is None:
        return _solvers.IMTLG()
    if isinstance(solver, str):
        return _solvers.get(solver)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver or its name, got {type(solver).__name__}")
    return solver


@dataclass
class _Run(_Engine):
    """One call: the passes of ``block="params"`` and of the blocks, and the solve at each block."""

    #: one solver for every block, or one per block (stateful solvers keep one state per block)
    solvers: list[Solver] = field(default_factory=list)
    per_sample: bool = False
    keep_norm: bool = True
    reports: list[BlockReport] = field(default_factory=list)

    def check_solvers(self, n_blocks: int) -> None:
        if len(self.solvers) > 1 and len(self.solvers) != n_blocks:
            raise ValueError(f"{len(self.solvers)} solvers were given, one per block, but there are {n_blocks} "
                             "blocks (see impartial.graph.find_blocks)")

    # -- block="params" --------------------------------------------------------------------------------------
    def params_pass(self) -> None:
        """Per-task gradients of every leaf in one batched call; solve on the shared ones, concatenated."""
        g, k = self.g, self.g.k
        shared = [n for n in g.nodes if n in g.shared]
        others = [n for n in g.nodes if n in g.leaves and n not in g.shared and g.mask(n) & g.task_bits]
        eye = torch.eye(k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        also = self.also_grads(retain=True)
        inputs = [g.leaves[n] for n in shared + others]

        def compute() -> list[Tensor]:
            # retain: a loop may have to recompute (vmap failure, 0 × inf), so this pass cannot free the graph.
            res = self.grad(self.tasks.outs, inputs, seeds, rows=k, onehot=k, retain=True)
            return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if r is None else r
                    for p, r in zip(inputs, res)]

        mask = 0
        for n in shared:
            mask |= g.mask(n) & g.task_bits
        ts = _bits(mask)  # tasks that reach no shared parameter take no part in the solve
        sel = slice(None) if len(ts) == k else list(ts)  # a slice: no copy of the k rows
        G = None

        def named(res: list[Tensor]) -> list[tuple[list[str | None], Tensor]]:
            nonlocal G
            out = []
            if shared:  # the Gram's diagonal is finite iff the rows are (it is needed anyway)
                G = sum(gram(r[sel].reshape(len(ts), -1)) for r in res[:len(shared)])
                out.append(([f"the gradient of {self.tasks.names[i]!r} w.r.t. the shared parameters" for i in ts],
                            G.diagonal().isfinite()))
            return out + [([f"the gradient of {self.tasks.names[i]!r} w.r.t. {g.name(n)!r}" if i in g.tasks(n)
                            else None for i in range(k)], r) for n, r in zip(others, res[len(shared):])]

        rows = self.checked(compute, named, self.tasks.outs, inputs, seeds, k, k)
        for n, r in zip(others, rows[len(shared):]):
            self.add(n, r.sum(0))
        if shared:
            # per-parameter pieces of J: a Gram-space solver never needs them concatenated
            Js = [r[sel].reshape(len(ts), -1) for r in rows[:len(shared)]]
            ds, _, rep = self.solve(self.solvers[0], Js, ts, None, G=G)
            D = sum(J.shape[-1] for J in Js)
            self.reports.append(BlockReport(f"{len(shared)} shared parameters [{D}]", (D,),
                                            tuple(self.tasks.names[i] for i in ts), *rep))
            for n, piece in zip(shared, ds):
                self.add(n, piece.reshape(g.leaves[n].shape))
        for n, a in also:
            self.add(n, a)

    def also_grads(self, retain: bool) -> list[tuple[Node, Tensor]]:
        """The plain gradient of the ``also`` terms, per leaf."""
        if not self.extra.outs:
            return []
        leaves = [n for n in self.g.nodes if n in self.g.leaves and self.g.mask(n) >> self.g.k]
        out = self.grad(self.extra.outs, [self.g.leaves[n] for n in leaves],
                        [torch.ones_like(a) for a in self.extra.outs], retain=retain)
        return [(n, a) for n, a in zip(leaves, out) if a is not None]

    # -- block="auto" and marked blocks ------------------------------------------------------------------------
    def blocks_pass(self) -> None:
        """A batched per-task pass per block (top-down), a solve at each, then one backward from all blocks."""
        g, blocks = self.g, self.g.blocks
        leaf_blocks = {b.edge.node for b in blocks if b.leaf is not None}
        in_block = 0
        for b in blocks:
            for i in b.tasks:
                in_block |= 1 << i
        heads: dict[int, list[Node]] = {}  # block index -> the single-task leaves its pass also returns
        plain = False  # some task reaches a leaf on a path through no block: seed every loss at the end
        for n in g.nodes:
            if n not in g.leaves or n in leaf_blocks:
                continue
            t, raw = g.mask(n) & g.task_bits, g.raw.get(n, 0)
            if raw and (g.above.get(n, 0) or bin(t).count("1") > 1):  # a raw path past or beside a block
                plain = True
            elif raw and t & in_block:
                i = _bits(t)[0]
                heads.setdefault(next(j for j, b in enumerate(blocks) if i in b.tasks), []).append(n)
        if plain:
            heads = {}
        has_below = {a for b in blocks for a in b.above}
        corr: dict[int, Tensor] = {}  # block -> [k, *shape]: resolved minus incoming task gradients
        sigma: dict[int, Tensor] = {}
        for j, b in enumerate(blocks):
            ts = list(b.tasks)
            kb, arrival = len(ts), bool(b.above) and not plain
            eye = torch.eye(kb + arrival, kb, dtype=torch.float64)
            outs = [self.tasks.outs[i] for i in ts]
            seeds = [eye[:, c].to(o.dtype) for c, o in enumerate(outs)]
            for a in b.above:
                if blocks[a].leaf is None and a in corr:
                    outs.append(blocks[a].edge)
                    s = corr[a][ts]
                    seeds.append(torch.cat([s, sigma[a][None]]) if arrival else s)
            head = heads.get(j, [])
            target = b.leaf if b.leaf is not None else b.edge
            inputs = [target] + [g.leaves[n] for n in head]

            def heads_of(res: list) -> list[tuple[Node, int, Tensor]]:
                """(leaf, its task's row, batched gradient) of the single-task leaves."""
                return [(n, ts.index(_bits(g.mask(n) & g.task_bits)[0]), r)
                        for n, r in zip(head, res[1:]) if r is not None]

            G = ctx = None

            def named(res: list) -> list[tuple[list[str | None], Tensor]]:
                nonlocal G, ctx
                J, ctx = self.block_J(b, res[0][:kb])
                G = gram(J)  # its diagonal is finite iff the rows are (and the solve needs it anyway)
                out = [([f"the gradient of {self.tasks.names[i]!r} at block {b.name!r}" for i in ts],
                        G.diagonal(dim1=-2, dim2=-1).isfinite().reshape(-1, kb).all(0))]
                for n, c, r in heads_of(res):  # only its task's row: the others are zeros
                    out.append(([f"the gradient of {self.tasks.names[ts[c]]!r} w.r.t. {g.name(n)!r}"], r[c:c + 1]))
                return out

            res = self.checked(lambda: self.grad(outs, inputs, seeds, rows=kb + arrival, onehot=kb), named,
                               outs, inputs, seeds, kb + arrival, kb)
            rows = res[0][:kb]
            hg = [(n, r[c]) for n, c, r in heads_of(res)]
            for n, r in hg:
                self.add(n, r)
            solver = self.solvers[j % len(self.solvers)]
            J, _ = self.block_J(b, rows)
            (d,), R, rep = self.solve(solver, [J], ts, ctx, need_rows=j in has_below, G=G)
            d = d.reshape(rows.shape[1:])
            if R is not None:
                R = (R.transpose(0, 1) if J.ndim == 3 else R).reshape(rows.shape)
            self.reports.append(BlockReport(b.name, tuple(rows.shape[1:]), tuple(self.tasks.names[i] for i in ts),
                                            *rep, above=b.above))
            if R is not None:
                full = torch.zeros((g.k, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
                full[ts] = R - rows
                corr[j] = full
            base = rows.sum(0) if plain else (res[0][kb] if arrival else None)
            sigma[j] = d if base is None else d - base
            if b.leaf is not None:
                self.add(b.edge.node, sigma[j])
        outs = [blocks[j].edge for j in sigma if blocks[j].leaf is None]
        seeds = [sigma[j] for j in sigma if blocks[j].leaf is None]
        seeded = range(g.k) if plain else [i for i in range(g.k) if not in_block >> i & 1]
        outs += [self.tasks.outs[i] for i in seeded] + self.extra.outs
        seeds += [torch.ones_like(self.tasks.outs[i]) for i in seeded] + [torch.ones_like(a) for a in self.extra.outs]
        leaves = [n for n in g.nodes if n in g.leaves and g.mask(n)]
        if outs and leaves:
            for n, r in zip(leaves, self.grad(outs, [g.leaves[n] for n in leaves], seeds, retain=self.retain_graph)):
                self.add(n, r)

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
              need_rows: bool = False, G: Tensor | None = None) -> tuple[list[Tensor], Tensor | None, tuple]:
        """Directions of the pieces ``Js`` (``[..., k, d_p]`` each; ``J`` is their concatenation), resolved rows
        (when ``need_rows``; one piece) and the report's values (cosine, weights, keep_norm scale)."""
        losses = torch.stack([self.tasks.outs[i].detach() for i in ts]).expand(Js[0].shape[:-1])
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
        scale = torch.ones(G.shape[:-2], dtype=G.dtype, device=G.device)
        if self.keep_norm:
            plain = sum(J.sum(-2).to(G.dtype).pow(2).sum(-1) for J in Js).sqrt()
            norm = sum(d.to(G.dtype).pow(2).sum(-1) for d in ds).sqrt()
            # torch.where: a zero direction stays zero (no 0/0).
            scale = torch.where(norm > 0, plain / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                torch.zeros_like(norm))
            ds = [d * scale.unsqueeze(-1).to(d.dtype) for d in ds]
            if R is not None:
                R = R * scale[..., None, None].to(R.dtype)
        return ds, R, (cosine(G.sum(0) if G.ndim == 3 else G), w, scale)
