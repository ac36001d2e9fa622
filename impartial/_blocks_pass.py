"""``block="auto"`` and marked blocks: per-task gradients at every block, a solve at each, one last backward.

Blocks come in *levels*: a top-level block (level 0) has no block above it; a block at level ``L`` receives
the resolved gradients of blocks at lower levels (``Block.above``).  Task ``i``'s row at block ``b`` is what
reaches ``b`` when task ``i``'s resolved rows leave every block above it:

    J_b[i] = raw_b[i] + Σ_{a above b} pull_{a→b}(R_a[i] − J_a[i])

where ``raw_b[i]`` is the plain gradient of loss ``i`` at ``b`` (through every path, blocks above included)
and ``pull_{a→b}`` the vector-Jacobian product from block ``a`` down to ``b`` (linear, so corrections add).
So the calls are:

1. **one per-task pass for all blocks** (:meth:`_Engine.task_rows`: a loop over the tasks or one batched
   backward): ``raw_b`` at every block and the heads' own gradients.  Every head is traversed once per task
   that reaches it, not once per block below it;
2. per level ``L ≥ 1``, **one batched pull** from the blocks above (seeded with the corrections
   ``R_a − J_a``, and with ``σ_a`` on one more row: what arrives at ``b`` in the last backward), through the
   graph between the blocks only;
3. the solves, sibling blocks of one level batched into one call (:mod:`._solve`);
4. the last backward, seeded with ``σ_b = d_b − a_b`` at every block (``a_b`` the arrival row; see
   :mod:`._backward`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import _distributed as _dist
from ._report import BlockReport
from ._solve import batchable
from .graph._trace import _bits
from .solvers import gram


class _BlocksPass:
    """Mixin of :class:`impartial._backward._Run`: the pass over the blocks."""

    def blocks_pass(self, auto: bool = False) -> None:
        """Per-task gradients at every block (one pass, then one pull per level), the solves, then one backward
        from all blocks."""
        g, blocks = self.g, self.g.blocks
        leaf_blocks = {b.edge.node for b in blocks if b.leaf is not None}
        in_block = 0
        for b in blocks:
            for i in b.tasks:
                in_block |= 1 << i
        head: list[Node] = []  # the single-task leaves (heads) the per-task pass also returns
        plain = False  # some task reaches a leaf on a path through no block: seed every loss at the end
        for n in g.nodes:
            if n not in g.leaves or n in leaf_blocks:
                continue
            t, raw = g.mask(n) & g.task_bits, g.raw.get(n, 0)
            if raw and (g.above.get(n, 0) or t & (t - 1)):  # a raw path past or beside a block
                plain = True
            elif raw and t & in_block:
                head.append(n)
        if plain:
            head = []
        T = _bits(in_block)  # the tasks of the blocks: row r of the passes is task T[r]
        K, pos = len(T), {i: r for r, i in enumerate(T)}
        level: list[int] = []
        for b in blocks:
            level.append(1 + max((level[a] for a in b.above), default=-1))
        levels = [[j for j in range(len(blocks)) if level[j] == L] for L in range(max(level, default=-1) + 1)]
        targets = [b.leaf if b.leaf is not None else b.edge for b in blocks]
        # a block's rows among the K: a slice (no copy) when the block has every task
        sel = [slice(None) if len(b.tasks) == K else [pos[i] for i in b.tasks] for b in blocks]
        owner = [pos[_bits(g.mask(n) & g.task_bits)[0]] for n in head]  # each head's row
        has_below = {a for b in blocks for a in b.above}
        local = [self.group is not None and b.leaf is None and not self.per_sample for b in blocks]
        rows: dict[int, Tensor] = {}  # block -> its task gradients [k_b, *shape]
        arrival: dict[int, Tensor] = {}  # block -> what reaches it from the blocks above in the last backward
        grams: dict[int, Tensor] = {}
        ctxs: dict[int, dict] = {}

        def check(j: int, r: Tensor) -> tuple:
            """Block ``j``'s Gram (kept for the solve) and its rows' finiteness, named."""
            b = blocks[j]
            J, ctxs[j] = self.block_J(b, r)
            G = gram(J)  # its diagonal is finite iff the rows are (and the solve needs it anyway)
            if local[j]:  # the rows are this rank's coordinates: the full-batch Gram is Σ_r G_r / W²
                G = _dist.all_sum(G, self.group) / _dist.world(self.group) ** 2
            grams[j] = G
            kb = len(b.tasks)
            return ([(f"the gradient of {self.tasks.names[i]!r} at block {b.name!r}", i) for i in b.tasks],
                    G.diagonal(dim1=-2, dim2=-1).isfinite().reshape(-1, kb).all(0))

        # -- 1. one per-task pass: raw rows at every block, the heads' gradients --------------------------------
        nb = len(blocks)
        if not nb:  # k = 1, or no task meets another: the last backward only
            return self.last_backward(sigma={}, in_block=0, plain=False)
        eye = torch.eye(K, dtype=torch.float64)
        outs = [self.tasks.outs[i] for i in T]
        seeds = [eye[:, r].to(o.dtype) for r, o in enumerate(outs)]
        inputs = targets + [g.leaves[n] for n in head]
        # the loop asks row r for every block and task T[r]'s own leaves
        needs = [[nb + h for h, c in enumerate(owner) if c == r] for r in range(K)]

        def compute(batched: bool) -> list:
            res = self.task_rows(outs, inputs, seeds, rows=K, onehot=K, dense=nb, needs=needs, batched=batched)
            for j, b in enumerate(blocks):
                if self.group is not None and b.leaf is not None:  # a parameter: the mean over the ranks
                    res[j] = _dist.all_mean(res[j], self.group)
            return res

        def named(res: list) -> list:
            out = [check(j, res[j][sel[j]]) for j in levels[0]]
            if self.passes[-1] == "batched":  # another task's 0 × inf shows in a lower block's raw rows too:
                for j in range(nb):  # check them here, where a batched pass is recomputed task by task
                    if level[j]:
                        out.append(([(f"the gradient of {self.tasks.names[i]!r} at block {blocks[j].name!r}", i)
                                     for i in blocks[j].tasks], res[j][sel[j]]))
            own: dict[int, list] = {}  # each task's own leaves: one fused finiteness check per task
            for n, c, r in heads_of(res):  # only its task's row: the others are zeros
                own.setdefault(c, []).append((f"the gradient of {self.tasks.names[T[c]]!r} w.r.t. {g.name(n)!r}", r))
            for c, items in own.items():
                out.append(([([m for m, _ in items], T[c])], tuple(r for _, r in items)))
            return out

        def heads_of(res: list) -> list[tuple[Node, int, Tensor]]:
            """(leaf, its task's row, that row's gradient) of the single-task leaves."""
            found = []
            for n, c, r in zip(head, owner, res[nb:]):
                v = None if r is None else r[c]
                if v is not None:
                    found.append((n, c, v))
            return found

        top_only = len(levels) == 1
        # above automatic top-level blocks no node is reached by two tasks (a block is where they first meet):
        # the loop does 1/k of the batched pass's work, no need to measure
        res = self.checked(compute, named, self.choose([b.edge.node for b in blocks], in_block,
                                                        disjoint=auto and top_only))
        how = self.passes[-1]
        for n, _, r in heads_of(res):
            self.add(n, r)
        raw = res[:nb]
        for j in levels[0]:
            rows[j] = raw[j][sel[j]]

        # -- 2, 3. level by level: the pull from the blocks above, then the solves --------------------------------
        corr: dict[int, Tensor] = {}  # block -> [K, *shape]: resolved minus incoming task gradients
        sigma: dict[int, Tensor] = {}
        reports: dict[int, BlockReport] = {}
        for L, lvl in enumerate(levels):
            if L:
                self.pull(lvl, blocks, targets, raw, sel, corr, sigma, rows, arrival, K, plain, check, level)
            for j, d, R, rep in self.solve_level(lvl, blocks, rows, grams, ctxs, has_below, local):
                b, r = blocks[j], rows[j]
                reports[j] = BlockReport(b.name, tuple(r.shape[1:]), tuple(self.tasks.names[i] for i in b.tasks),
                                         *rep, above=b.above, task_grads=how)
                if R is not None:
                    if isinstance(sel[j], slice):
                        corr[j] = R - r
                    else:
                        corr[j] = torch.zeros((K, *r.shape[1:]), dtype=r.dtype, device=r.device)
                        corr[j][sel[j]] = R - r
                base = r.sum(0) if plain else arrival.get(j)
                sigma[j] = d if base is None else d - base
                if b.leaf is not None:
                    self.add(b.edge.node, sigma[j])
        self.reports.extend(reports[j] for j in range(nb))

        self.last_backward(sigma, in_block, plain)

    def last_backward(self, sigma: dict[int, Tensor], in_block: int, plain: bool) -> None:
        """One backward from every activation block (seeded with ``σ_b``), the losses of tasks in no block (of
        every task when ``plain``) and the ``also`` terms, into every leaf."""
        g, blocks = self.g, self.g.blocks
        outs = [blocks[j].edge for j in sigma if blocks[j].leaf is None]
        seeds = [sigma[j] for j in sigma if blocks[j].leaf is None]
        seeded = range(g.k) if plain else [i for i in range(g.k) if not in_block >> i & 1]
        outs += [self.tasks.outs[i] for i in seeded] + self.extra.outs
        seeds += [torch.ones_like(self.tasks.outs[i]) for i in seeded] + [torch.ones_like(a) for a in self.extra.outs]
        leaves = [n for n in g.nodes if n in g.leaves and g.mask(n)]
        if outs and leaves:
            for n, r in zip(leaves, self.grad(outs, [g.leaves[n] for n in leaves], seeds, retain=self.retain_graph)):
                self.add(n, r)

    def pull(self, lvl: list[int], blocks: list, targets: list, raw: list, sel: list, corr: dict, sigma: dict,
             rows: dict, arrival: dict, K: int, plain: bool, check, level: list[int]) -> None:
        """The rows of the blocks ``lvl`` (one level below the top): their raw rows plus one pass from the blocks
        above, seeded with the corrections (and ``σ`` on an extra row, the arrival, unless ``plain``)."""
        srcs = sorted({a for j in lvl for a in blocks[j].above if blocks[a].leaf is None})
        outs = [blocks[a].edge for a in srcs]
        seeds = [corr[a] if plain else torch.cat([corr[a], sigma[a][None]]) for a in srcs]
        n_rows = K + (0 if plain else 1)
        inputs = [targets[j] for j in lvl]

        def compute(batched: bool) -> list:
            res = self.task_rows(outs, inputs, seeds, rows=n_rows, onehot=0, dense=len(lvl), needs=None,
                                 batched=batched)
            out = []
            for j, p in zip(lvl, res):
                full = torch.cat([raw[j] + p[:K], p[K:]]) if not plain else raw[j] + p
                if self.group is not None and blocks[j].leaf is not None:  # a parameter: the mean over the ranks
                    full = _dist.all_mean(full, self.group)
                out.append(full)
            return out

        def named(res: list) -> list:
            return [check(j, full[:K][sel[j]]) for j, full in zip(lvl, res)]

        # every row seeds every block above: the nodes between are shared by all rows, so batch them
        res = self.checked(compute, named, (self.force or self.task_grads) != "loop")
        for j, full in zip(lvl, res):
            rows[j] = full[:K][sel[j]]
            if not plain:
                arrival[j] = full[K]

    def solve_level(self, lvl: list[int], blocks: list, rows: dict, grams: dict, ctxs: dict, has_below: set,
                    local: list[bool]) -> list[tuple[int, Tensor, Tensor | None, tuple]]:
        """``(block, direction, resolved rows or None, report values)`` for the blocks of one level, in order;
        sibling blocks with the same tasks and size share one solver call when the solver allows it."""
        groups: dict[tuple, list[int]] = {}
        for j in lvl:
            b, r = blocks[j], rows[j]
            key = (b.tasks, r[0].numel(), r.dtype, local[j], j in has_below) if (
                batchable(self.solvers) and not self.per_sample) else (j,)
            groups.setdefault(key, []).append(j)
        out = []
        for js in groups.values():
            if len(js) == 1:
                j = js[0]
                b, r = blocks[j], rows[j]
                J, _ = self.block_J(b, r)
                (d,), R, (G, w, scale) = self.solve(self.solvers[j % len(self.solvers)], [J], b.tasks, ctxs[j],
                                                    need_rows=j in has_below, G=grams[j], local=local[j])
                if R is not None:
                    R = (R.transpose(0, 1) if J.ndim == 3 else R).reshape(r.shape)
                out.append((j, d.reshape(r.shape[1:]), R, (G.sum(0) if G.ndim == 3 else G, w, scale)))
                continue
            J = torch.stack([rows[j].reshape(rows[j].shape[0], -1) for j in js])  # [n_blocks, k_b, numel]
            (d,), R, (G, w, scale) = self.solve(self.solvers[0], [J], blocks[js[0]].tasks, None,
                                                need_rows=js[0] in has_below, G=torch.stack([grams[j] for j in js]),
                                                local=local[js[0]])
            for m, j in enumerate(js):
                shape = rows[j].shape
                out.append((j, d[m].reshape(shape[1:]), None if R is None else R[m].reshape(shape),
                            (G[m], w[m], scale[m])))
        return sorted(out, key=lambda o: lvl.index(o[0]))
