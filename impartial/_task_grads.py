"""Per-task gradients at every block: one per-task pass for all blocks, then one pull per lower level.

Task ``i``'s row at block ``b`` is what reaches ``b`` when task ``i``'s resolved rows leave every block above it:

    J_b[i] = raw_b[i] + Σ_{a above b} pull_{a→b}(R_a[i] − J_a[i])

where ``raw_b[i]`` is the plain gradient of loss ``i`` at ``b`` (through every path, blocks above included) and
``pull_{a→b}`` the vector-Jacobian product from block ``a`` down to ``b`` (linear, so corrections add).  So:

1. **one per-task pass** (:func:`first_pass`): ``raw_b`` at every block and the heads' own gradients, each head
   traversed once per task that reaches it (once in all for disjoint heads);
2. per level ``L ≥ 1``, **one batched pull** (:func:`pull`) from the blocks above, seeded with the corrections
   ``R_a − J_a`` and, on one more row, with ``σ_a``: what will arrive at ``b`` in the final pass.

The hooks of the block tensors (and of every leaf captured) stay quiet here (:func:`impartial._torch_compat.quiet`):
those tensors receive their gradient in the final pass and the write, once.  Nodes strictly above a block that two
or more tasks reach (between nested blocks, above a marked block) run once per task row here, and their hooks run
with them: a per-task gradient cannot be had without running them per task.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import _autograd
from . import _distributed as _dist
from ._autograd import Log, Rows, checked, choose, rows
from ._call import Call
from ._checks import Check, rows_check, said
from ._handles import root
from ._plan import Plan
from ._solve import block_gram
from ._torch_compat import quiet

__all__ = ["First", "first_pass", "pull"]


@dataclass
class First:
    """The per-task pass: raw rows ``[K, *shape]`` at every block, the heads' gradients, level-0 Grams."""

    raw: list[Tensor]
    heads: list[tuple[Node, Tensor]]
    grams: dict[int, Tensor]


def first_pass(call: Call, plan: Plan, log: Log) -> First:
    """Raw rows at every block and each head's gradient, finite or :class:`NonFinite` naming the task."""
    g, blocks, K, nb = plan.g, plan.blocks, plan.K, len(plan.blocks)
    T, owner = plan.layout.rows, plan.layout.owner
    outs = [call.tasks.outs[i] for i in T]
    captures = [c for caps in plan.captures for c in caps]
    nc = len(captures)
    inputs = captures + [g.leaves[n] for n in plan.heads]
    needs = [[nc + h for h, rs in enumerate(owner) if r in rs] for r in range(K)]  # row r: the blocks + its heads
    free = plan.layout.disjoint and not call.keep and not call.tasks.stacked
    grams: dict[int, Tensor] = {}

    def compute(batched: bool) -> Rows:
        got = rows(
            log,
            outs,
            inputs,
            None,
            n=K,
            onehot=K,
            dense=nc,
            needs=needs,
            batched=batched,
            retain=not free,
            disjoint=True,
            structure=(g.key, "first"),
        )
        res = _blocks_rows(plan, range(nb), got.dense, K)
        for j, b in enumerate(blocks):
            if call.group is not None and b.leaf is not None:  # a parameter: the mean over the ranks
                res[j] = _dist.all_mean(res[j], call.group)
        return Rows(res, got.sparse)

    def checks(res: Rows) -> list[Check]:
        out = []
        for j in plan.levels[0]:
            grams[j], c = block_gram(call, plan, j, res.dense[j][plan.sel[j]])
            out.append(c)
        if log.passes[-1] == "batched":  # another task's 0 × inf shows in a lower block's raw rows too
            out += _lower_checks(call, plan, res.dense)
        return out  # the heads' gradients are checked with every leaf's total (impartial._final.check)

    # above automatic top-level blocks no node is reached by two tasks (a block is where they first meet): the
    # loop does 1/k of the batched pass's work, no need to measure
    batched = choose(
        call.task_grads,
        g,
        [b.edge.node for b in blocks],
        sum(1 << i for i in T),
        disjoint=call.mode == "auto" and len(plan.levels) == 1,
    )
    with quiet(plan.quiet):
        res = checked(log, compute, checks, batched, call.group)
    heads = [(n, t) for n, rs, r in zip(plan.heads, owner, res.sparse) for c in rs if (t := r[c]) is not None]
    return First(res.dense, heads, grams)  # a head's part from each row that reaches it


def _lower_checks(call: Call, plan: Plan, dense: list[Tensor]) -> list[Check]:
    """Finiteness of the raw rows at the blocks below others, each task named."""
    names = call.tasks.names
    return [
        rows_check(
            dense[j][plan.sel[j]], [(i, said("the gradient of {!r} at block {!r}", names[i], b.name)) for i in b.tasks]
        )
        for j, b in enumerate(plan.blocks)
        if plan.layout.level[j]
    ]


def _blocks_rows(plan: Plan, blocks: Iterable[int], got: list[Tensor], n: int) -> list[Tensor]:
    """Each block's rows ``[n, *shape]`` from what a pass captured: its capture, or its views' reshaped and summed."""
    res, i = [], 0
    for j in blocks:
        part, hop = got[i : i + len(plan.captures[j])], plan.hops[j]
        i += len(part)
        if hop is None:
            res.append(part[0])
        else:
            total = part[0].reshape(n, *hop)
            for p in part[1:]:
                total = total + p.reshape(n, *hop)
            res.append(total)
    return res


def pull(
    call: Call,
    plan: Plan,
    log: Log,
    lvl: list[int],
    raw: list[Tensor],
    corr: dict[int, Tensor],
    sigma: dict[int, Tensor],
) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, Tensor]]:
    """``(rows, arrivals, grams)`` of the blocks ``lvl`` (one level below the top): their raw rows plus one pass
    from the blocks above, seeded with the corrections (and ``σ`` on an extra row, the arrival, unless plain)."""
    blocks, K = plan.blocks, plan.K
    plain = plan.layout.plain or call.nested == "direct"  # no arrival row: σ does not depend on it
    srcs = sorted({a for j in lvl for a in blocks[j].above if blocks[a].leaf is None})
    n = K + (0 if plain else 1)
    starts = [root(blocks[a], corr[a] if plain else torch.cat([corr[a], sigma[a][None]]), n) for a in srcs]
    outs, seeds_ = [e for e, _ in starts], [s for _, s in starts]
    inputs = [c for j in lvl for c in plan.captures[j]]
    grams: dict[int, Tensor] = {}

    def compute(batched: bool) -> list[Tensor]:
        got = rows(log, outs, inputs, seeds_, n=n, onehot=0, dense=len(inputs), needs=None, batched=batched)
        out = []
        for j, p in zip(lvl, _blocks_rows(plan, lvl, got.dense, n)):
            full = raw[j] + p if plain else torch.cat([raw[j] + p[:K], p[K:]])
            if call.group is not None and blocks[j].leaf is not None:  # a parameter: the mean over the ranks
                full = _dist.all_mean(full, call.group)
            out.append(full)
        return out

    def checks(res: list[Tensor]) -> list[Check]:
        out = []
        for j, full in zip(lvl, res):
            grams[j], c = block_gram(call, plan, j, full[:K][plan.sel[j]])
            out.append(c)
        return out

    # every row seeds every block above: the nodes between are shared by all rows, so batch them
    with quiet(plan.quiet):
        res = checked(log, compute, checks, (_autograd.FORCE or call.task_grads) != "loop", call.group)
    got: dict[int, Tensor] = {}
    arrival: dict[int, Tensor] = {}
    for j, full in zip(lvl, res):
        got[j] = full[:K][plan.sel[j]]
        if not plain:
            arrival[j] = full[K]
    return got, arrival, grams
