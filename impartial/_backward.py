"""``impartial.backward``: a drop-in for ``sum(losses).backward()`` that resolves task conflicts where they meet.

Three steps (see ``DESIGN.md``, "The picture"):

1. **Trace** the graphs of the losses and find the blocks (:mod:`impartial.graph`).
2. **Per-task gradients at each block**, from one batched backward (``is_grads_batched``) or a loop of one
   backward per task, chosen by the graph's structure (:mod:`._engine`); the parameters of one task only
   (heads) get their task's gradient in the same pass.  Where vmap cannot run an op, the loop replaces the
   batched pass and the :class:`Report` says so.
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

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import solvers as _solvers
from . import _distributed as _dist
from ._engine import TASK_GRADS, NonFinite, _Engine
from ._report import BlockReport, Report
from .graph._blocks import Block, _find
from .graph._trace import Losses, Params, _as_losses, _as_params, _bits, _build, _Losses
from .solvers import Solver, combine, gram
from .solvers._base import mix

__all__ = ["backward", "Report"]


def backward(losses: Losses, shared_params: Params = None, *,
             solver: Solver | str | Sequence[Solver] | None = None,
             block: str | Sequence[Tensor] = "auto", also: Sequence[Tensor] = (), per_sample: bool = False,
             keep_norm: bool = True, retain_graph: bool = False, task_grads: str = "auto",
             nonfinite: str = "raise", process_group: Any = None) -> Report:
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
    - ``task_grads``: how the per-task gradients are computed at each block: ``"batched"`` (one vmapped
      backward, ``is_grads_batched``), ``"loop"`` (one backward per task, from its own loss), or ``"auto"``:
      the loop where the tasks' paths above the block are mostly disjoint (separate heads: each head is then
      traversed once, as in a plain backward, where a batched pass would run it on all k rows), the batched
      pass where they share most of it.  ``Report.blocks[i].task_grads`` says which ran (docs/backward.md).
    - ``nonfinite``: ``"raise"`` (a non-finite task gradient raises, naming the task, before any ``.grad`` is
      written) or ``"skip"``: such a task is dropped from the whole call (as if it had not been passed: no
      block, head or parameter receives its gradient), the others are resolved, and ``Report.skipped`` names
      it.  Stateful solvers are restored to their state before the call when a task is dropped.
    - ``process_group``: under ``torch.distributed`` (e.g. inside ``DistributedDataParallel``, each rank on its
      local batch) the default group is used when initialised; this overrides it.  Ranks exchange the block
      Gram matrices (activation blocks) or the per-task gradients (parameter blocks) so that every rank
      computes the full-batch weights; ``.grad`` is then written through autograd, so DDP's gradient
      all-reduce fires once per parameter (:mod:`impartial._distributed`, docs/distributed.md).

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
    if task_grads not in TASK_GRADS:
        raise ValueError(f"task_grads must be one of {TASK_GRADS}, got {task_grads!r}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    mode = block if isinstance(block, str) else "explicit"
    name = repr(solvers[0]) if len(solvers) == 1 else f"[{', '.join(map(repr, solvers))}]"
    states = [copy.deepcopy(s.state_dict()) for s in solvers] if nonfinite == "skip" else []
    group = _dist.resolve_group(process_group)
    names, skipped = list(tasks.names), []
    while True:
        kept = [i for i in range(len(names)) if i not in skipped]
        sub, sub_extra = (tasks, extra) if not skipped else _subset(tasks, extra, kept)
        g = _build(sub, sub_extra, params if sub.outs else None, strict=not skipped)
        run = _Run(g, sub, sub_extra, retain_graph, task_grads=task_grads, solvers=solvers, per_sample=per_sample,
                   keep_norm=keep_norm, check_one=nonfinite == "skip", group=group)
        try:
            run.run(mode, block)
        except NonFinite as err:
            if nonfinite == "raise":
                raise FloatingPointError(str(err)) from None
            skipped.append(kept[err.task])
            for s, state in zip(solvers, states):
                s.load_state_dict(copy.deepcopy(state))
            continue
        break
    run.write()
    return Report(mode, name, tuple(tasks.names), tuple(extra.names), tuple(run.reports), run.fallback,
                  tuple(names[i] for i in sorted(skipped)))


def _subset(tasks: _Losses, extra: _Losses, kept: list[int]) -> tuple[_Losses, _Losses]:
    """The losses without the dropped tasks: masks renumbered (task ``kept[j]`` becomes bit ``j``)."""
    k, k2 = len(tasks.outs), len(kept)

    def remask(m: int) -> int:
        out = 0
        for j, i in enumerate(kept):
            out |= (m >> i & 1) << j
        return out | (m >> k) << k2

    roots = [(e, remask(m)) for e, m in tasks.roots if remask(m)]
    return (_Losses([tasks.outs[i] for i in kept], [tasks.names[i] for i in kept], roots, tasks.fused),
            _Losses(extra.outs, extra.names, [(e, remask(m)) for e, m in extra.roots]))


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
    #: nonfinite="skip": check a lone task's gradient too (k = 1 is otherwise a plain, unchecked backward)
    check_one: bool = False
    reports: list[BlockReport] = field(default_factory=list)

    def run(self, mode: str, block: str | Sequence[Tensor]) -> None:
        """Every pass of one call; gradients are collected, not written."""
        g, tasks = self.g, self.tasks
        if g.k == 0:  # every task was dropped (nonfinite="skip"): the also terms only
            for n, a in self.also_grads(retain=self.retain_graph):
                self.add(n, a)
            return
        if g.k == 1:  # nothing to resolve: a plain backward
            if self.check_one:  # nonfinite="skip": a lone task is still checked (and dropped if need be)
                leaves = [g.leaves[n] for n in g.nodes if n in g.leaves and g.mask(n) & 1]
                own = tuple(r for r in self.grad(tasks.outs[:1], leaves, [torch.ones_like(tasks.outs[0])])
                            if r is not None)
                bad = self.first_bad([([([f"the gradient of {tasks.names[0]!r}"] * len(own), 0)], own)])
                if bad is not None:
                    raise NonFinite(f"{bad[0]} is not finite", 0)
            _find(g, tasks, explicit=[])
            self.blocks_pass()
        elif mode == "params":
            self.check_solvers(1)
            self.params_pass()
        else:
            _find(g, tasks, explicit=None if mode == "auto" else list(block))
            self.check_solvers(len(g.blocks))
            self.blocks_pass(auto=mode == "auto")

    def check_solvers(self, n_blocks: int) -> None:
        if len(self.solvers) > 1 and len(self.solvers) != n_blocks:
            raise ValueError(f"{len(self.solvers)} solvers were given, one per block, but there are {n_blocks} "
                             "blocks (see impartial.graph.find_blocks)")

    # -- block="params" --------------------------------------------------------------------------------------
    def params_pass(self) -> None:
        """Per-task gradients of every leaf (one batched call or a loop); solve on the shared ones."""
        g, k = self.g, self.g.k
        shared = [n for n in g.nodes if n in g.shared]
        others = [n for n in g.nodes if n in g.leaves and n not in g.shared and g.mask(n) & g.task_bits]
        eye = torch.eye(k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        also = self.also_grads(retain=True)
        inputs = [g.leaves[n] for n in shared + others]
        # the loop asks row i only for the other leaves task i reaches
        needs = [[len(shared) + j for j, n in enumerate(others) if g.mask(n) >> i & 1] for i in range(k)]
        mask = 0
        for n in shared:
            mask |= g.mask(n) & g.task_bits
        ts = _bits(mask)  # tasks that reach no shared parameter take no part in the solve
        sel = slice(None) if len(ts) == k else list(ts)  # a slice: no copy of the k rows
        G = None

        def compute(batched: bool) -> list:
            res = self.task_rows(self.tasks.outs, inputs, seeds, rows=k, onehot=k, dense=len(shared), needs=needs,
                                 batched=batched)
            if self.group is not None:  # the full-batch task gradients: the mean over the ranks
                res[:len(shared)] = [_dist.all_mean(r, self.group) for r in res[:len(shared)]]
            return res

        def named(res: list) -> list:
            nonlocal G
            out = []
            if shared:  # the Gram's diagonal is finite iff the rows are (it is needed anyway)
                G = sum(gram(r[sel].reshape(len(ts), -1)) for r in res[:len(shared)])
                out.append(([(f"the gradient of {self.tasks.names[i]!r} w.r.t. the shared parameters", i)
                             for i in ts], G.diagonal().isfinite()))
            return out + [([(f"the gradient of {self.tasks.names[i]!r} w.r.t. {g.name(n)!r}", i)
                            if i in g.tasks(n) else None for i in range(k)], r)
                          for n, r in zip(others, res[len(shared):]) if r is not None]

        rows = self.checked(compute, named, self.choose(None, g.task_bits))
        for n, r in zip(others, rows[len(shared):]):
            if isinstance(r, Tensor):
                self.add(n, r.sum(0))
            elif r is not None:
                for part in r:
                    self.add(n, part)
        if shared:
            # per-parameter pieces of J: a Gram-space solver never needs them concatenated
            Js = [r[sel].reshape(len(ts), -1) for r in rows[:len(shared)]]
            ds, _, rep = self.solve(self.solvers[0], Js, ts, None, G=G)
            D = sum(J.shape[-1] for J in Js)
            self.reports.append(BlockReport(f"{len(shared)} shared parameters [{D}]", (D,),
                                            tuple(self.tasks.names[i] for i in ts), *rep,
                                            task_grads=self.passes[-1]))
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
    def blocks_pass(self, auto: bool = False) -> None:
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
            owner = [ts.index(_bits(g.mask(n) & g.task_bits)[0]) for n in head]  # each head's row
            # the loop asks row c for the block and task ts[c]'s own leaves; the arrival row for the block only
            needs = [[1 + h for h, c in enumerate(owner) if c == r] for r in range(kb + arrival)]

            def heads_of(res: list) -> list[tuple[Node, int, Tensor]]:
                """(leaf, its task's row, that row's gradient) of the single-task leaves."""
                out = []
                for n, c, r in zip(head, owner, res[1:]):
                    v = None if r is None else r[c]
                    if v is not None:
                        out.append((n, c, v))
                return out

            G = ctx = None

            def named(res: list) -> list:
                nonlocal G, ctx
                J, ctx = self.block_J(b, res[0][:kb])
                G = gram(J)  # its diagonal is finite iff the rows are (and the solve needs it anyway)
                if local:  # the rows are this rank's coordinates: the full-batch Gram is Σ_r G_r / W²
                    G = _dist.all_sum(G, self.group) / _dist.world(self.group) ** 2
                out = [([(f"the gradient of {self.tasks.names[i]!r} at block {b.name!r}", i) for i in ts],
                        G.diagonal(dim1=-2, dim2=-1).isfinite().reshape(-1, kb).all(0))]
                own: dict[int, list] = {}  # each task's own leaves: one fused finiteness check per task
                for n, c, r in heads_of(res):  # only its task's row: the others are zeros
                    msg = f"the gradient of {self.tasks.names[ts[c]]!r} w.r.t. {g.name(n)!r}"
                    own.setdefault(c, []).append((msg, r))
                for c, items in own.items():
                    out.append(([([m for m, _ in items], ts[c])], tuple(r for _, r in items)))
                return out

            def compute(batched: bool) -> list:
                res = self.task_rows(outs, inputs, seeds, rows=kb + arrival, onehot=kb, dense=1, needs=needs,
                                     batched=batched)
                if self.group is not None and b.leaf is not None:  # a parameter: the mean over the ranks
                    res[0] = _dist.all_mean(res[0], self.group)
                return res

            node = b.edge.node
            local = self.group is not None and b.leaf is None and not self.per_sample
            bm = 0
            for i in ts:
                bm |= 1 << i
            # above an automatic top-level block no node is reached by two of its tasks (the block is where
            # they first meet): the loop does 1/k_b of the batched pass's work, no need to measure
            res = self.checked(compute, named, self.choose(node, bm, disjoint=auto and not b.above))
            rows = res[0][:kb]
            for n, _, r in heads_of(res):
                self.add(n, r)
            solver = self.solvers[j % len(self.solvers)]
            J, _ = self.block_J(b, rows)
            (d,), R, rep = self.solve(solver, [J], ts, ctx, need_rows=j in has_below, G=G, local=local)
            d = d.reshape(rows.shape[1:])
            if R is not None:
                R = (R.transpose(0, 1) if J.ndim == 3 else R).reshape(rows.shape)
            self.reports.append(BlockReport(b.name, tuple(rows.shape[1:]), tuple(self.tasks.names[i] for i in ts),
                                            *rep, above=b.above, task_grads=self.passes[-1]))
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
              need_rows: bool = False, G: Tensor | None = None,
              local: bool = False) -> tuple[list[Tensor], Tensor | None, tuple]:
        """Directions of the pieces ``Js`` (``[..., k, d_p]`` each; ``J`` is their concatenation), resolved rows
        (when ``need_rows``; one piece) and the report's values (Gram, weights, keep_norm scale).

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
        sums: list[Tensor] | None = None
        if solver.gram_space:  # piece by piece: G = Σ_p J_p J_pᵀ, d_p = wᵀ J_p
            if need_rows:
                M = solver.mixing(G, losses=losses)
                w, R = M.sum(-2), mix(M, Js[0])
            else:
                w = solver.weights(G, losses=losses)
            ds = [combine(w, J) for J in Js]
            if self.keep_norm:
                sums = [J.sum(-2) for J in Js]
        else:
            J = Js[0] if len(Js) == 1 else torch.cat(Js, dim=-1)
            if need_rows:
                R = solver.apply(J, losses=losses, **(ctx or {}))
                d = R.sum(-2)
            else:
                d = solver(J, losses=losses, **(ctx or {}))
            ds = list(d.split([J.shape[-1] for J in Js], dim=-1))
            if self.keep_norm:
                sums = [J.sum(-2) for J in Js]
        scale = torch.ones(G.shape[:-2], dtype=G.dtype, device=G.device)
        if sums is not None:
            sq = torch.stack([_sq_norm(sums, G.dtype), _sq_norm(ds, G.dtype)])
            if local:  # sums over coordinates: add the ranks' (the 1/W² of both cancels in the ratio)
                sq = _dist.all_sum(sq, self.group)
            plain, norm = sq.sqrt().unbind(0)
            # torch.where: a zero direction stays zero (no 0/0).
            scale = torch.where(norm > 0, plain / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                torch.zeros_like(norm))
            if solver.gram_space:  # the directions are fresh products (wᵀJ): scale them in place, no new buffer
                ds = [d.mul_(scale.unsqueeze(-1).to(d.dtype)) for d in ds]
            else:
                ds = [d * scale.unsqueeze(-1).to(d.dtype) for d in ds]
            if R is not None:
                R = R * scale[..., None, None].to(R.dtype)
        return ds, R, (G.sum(0) if G.ndim == 3 else G, w, scale)


_LOW = (torch.float16, torch.bfloat16)


def _sq_norm(pieces: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The squared norm ``[...]`` of the concatenation of ``pieces`` ``[..., d_p]``, combined in ``dtype``."""
    # the norm in the pieces' own dtype (float32 norms of 1e6 entries are accurate to ~1e-7 and 10x faster
    # than an upcast); half precision in float32, where a sum of squares would overflow
    return sum(torch.linalg.vector_norm(p, dim=-1, dtype=torch.float32 if p.dtype in _LOW else None).to(dtype).pow(2)
               for p in pieces)
