"""``block="params"``: the per-task gradients of the shared parameters themselves, then one solve on them.

Two ways to get ``J`` (one row per task, one column per shared parameter entry), the same numbers:

- **through the blocks** (the usual case): where every task reaches the shared parameters only through the
  automatic top-level blocks (a trunk's output read by k heads), the per-task gradients at the blocks come
  from one pass over the heads (each head traversed once per task that reaches it, as in a plain backward),
  and ``J`` from **one** backward from the blocks down through the trunk, batched over the k rows
  (``is_grads_batched``): the heads never run on k rows.
- **from the losses**: otherwise (nested blocks, a task reaching a shared parameter beside every block, a
  loss tensor made by one op), one backward from the k losses, batched or a loop.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import _distributed as _dist
from ._engine import _zeros
from ._report import BlockReport
from .graph._blocks import _find
from .graph._trace import _bits
from .solvers import gram


class _ParamsPass:
    """Mixin of :class:`impartial._backward._Run`: the pass of ``block="params"``."""

    def params_pass(self) -> None:
        """Per-task gradients of every leaf (through the blocks, or from the losses); solve on the shared ones."""
        g, k = self.g, self.g.k
        shared = [n for n in g.nodes if n in g.shared]
        others = [n for n in g.nodes if n in g.leaves and n not in g.shared and g.mask(n) & g.task_bits]
        eye = torch.eye(k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        also = self.also_grads(retain=True)
        inputs = [g.leaves[n] for n in shared + others]
        mask = 0
        for n in shared:
            mask |= g.mask(n) & g.task_bits
        ts = _bits(mask)  # tasks that reach no shared parameter take no part in the solve
        sel = slice(None) if len(ts) == k else list(ts)  # a slice: no copy of the k rows
        G = None
        cut = self.cut(shared, others)

        def from_losses(batched: bool) -> list:
            # the loop asks row i only for the other leaves task i reaches
            needs = [[len(shared) + j for j, n in enumerate(others) if g.mask(n) >> i & 1] for i in range(k)]
            return self.task_rows(self.tasks.outs, inputs, seeds, rows=k, onehot=k, dense=len(shared), needs=needs,
                                  batched=batched)

        def compute(batched: bool) -> list:
            res = from_losses(batched) if cut is None else self.through_blocks(cut, shared, others, batched)
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

        # through the blocks, the per-task pass runs over the heads only: disjoint, so the loop
        rows = self.checked(compute, named, self.choose(None, g.task_bits, disjoint=cut is not None))
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

    def cut(self, shared: list[Node], others: list[Node]) -> tuple[list, list[Node]] | None:
        """``(blocks, heads)`` when every task reaches the shared parameters only through top-level automatic
        blocks (then ``J`` is one batched backward from them), else None."""
        g, tasks = self.g, self.tasks
        if tasks.fused is not None or not shared:
            return None
        _find(g, tasks)
        blocks = g.blocks
        if not blocks or any(b.above for b in blocks):
            return None
        in_block = 0
        for b in blocks:
            for i in b.tasks:
                in_block |= 1 << i
        if in_block != g.task_bits:
            return None
        leaf_blocks = {b.edge.node for b in blocks if b.leaf is not None}
        heads = []
        for n in others + shared:
            if n in leaf_blocks:
                continue
            raw = g.raw.get(n, 0)
            if raw and (n in g.shared or g.above.get(n, 0) or raw & (raw - 1)):
                return None  # a task reaches it beside every block: J needs the losses' own pass
            if raw:
                heads.append(n)
        return blocks, heads

    def through_blocks(self, cut: tuple[list, list[Node]], shared: list[Node], others: list[Node],
                       batched: bool) -> list:
        """The rows of ``shared + others`` (as :meth:`_Engine.task_rows` returns them) from the losses' gradients
        at the blocks (one pass over the heads) and one backward from the blocks through the trunk."""
        g, k = self.g, self.g.k
        blocks, heads = cut
        nb = len(blocks)
        eye = torch.eye(k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        owner = [_bits(g.raw[n])[0] for n in heads]
        targets = [b.leaf if b.leaf is not None else b.edge for b in blocks]
        needs = [[nb + h for h, c in enumerate(owner) if c == r] for r in range(k)]
        res = self.task_rows(self.tasks.outs, targets + [g.leaves[n] for n in heads], seeds, rows=k, onehot=k,
                             dense=nb, needs=needs, batched=batched)
        found: dict[Node, Tensor | list] = {b.edge.node: res[j] for j, b in enumerate(blocks) if b.leaf is not None}
        for n, c, r in zip(heads, owner, res[nb:]):
            if r is not None:  # only its task's row (the others are zeros or absent)
                found[n] = [r[c] if i == c else None for i in range(k)]
        act = [j for j, b in enumerate(blocks) if b.leaf is None]
        below = [n for n in shared + others if n not in found]
        if act and below:
            # every row seeds every block: batched (the loop only when asked for; a row's 0 × inf here is the
            # loop's too, as the rows at the blocks are the task gradients themselves)
            vjp = self.task_rows([blocks[j].edge for j in act], [g.leaves[n] for n in below], [res[j] for j in act],
                                 rows=k, onehot=0, dense=len(below), needs=None,
                                 batched=(self.force or self.task_grads) != "loop")
            self.passes.pop()  # the report names the per-task pass (the one above)
            found.update(zip(below, vjp))
        # a shared parameter no block reaches (only a leaf block does elsewhere): zero rows, as from the losses
        return [found[n] if n in found else _zeros(g.leaves[n], k) for n in shared] + [found.get(n) for n in others]
