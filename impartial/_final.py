"""The final pass and the write: what every leaf receives, checked, then accumulated by autograd itself.

The final pass starts at every activation block, seeded with ``σ_b = d_b − a_b`` (``d_b`` the block's direction,
``a_b`` what reaches it from the blocks above in this same pass, so that exactly ``d_b`` leaves it), and at the
losses of tasks in no block and the ``also`` terms.  It runs every node below the blocks once: their tensor hooks
and module hooks fire there, once, with the gradient they receive (a hook on a block tensor sees ``d_b``).  It
captures the leaves' gradients without writing them.

The write then accumulates each leaf's total (its head gradient from the per-task pass, its share of a parameter
block, and the final pass's) by running the leaves' ``AccumulateGrad`` nodes: one ``torch.autograd.backward`` seeded
at the leaves themselves.  So each parameter's tensor hooks fire once with its whole gradient,
``.grad`` is accumulated exactly as autograd does (layout, ``set_to_none``), and then its post-accumulate-grad hooks
fire, once; DDP's reducer, registered on those nodes, sees every gradient once.  Nothing is written before every
total is known to be finite.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import Node

from ._call import Call
from ._checks import NonFinite, first_bad
from ._plan import Plan
from ._torch_compat import quiet
from .graph._trace import Graph

__all__ = ["final_pass", "totals", "write"]


def final_pass(call: Call, plan: Plan, sigma: dict[int, Tensor]) -> dict[Node, Tensor]:
    """The gradient the final pass brings to each leaf it reaches (leaf hooks quiet: they fire at the write)."""
    g, blocks = plan.g, plan.blocks
    outs: list = [blocks[j].edge for j in sigma if blocks[j].leaf is None]
    seeds = [sigma[j] for j in sigma if blocks[j].leaf is None]
    for i in plan.layout.seeded:
        outs.append(call.tasks.outs[i])
        seeds.append(torch.ones_like(call.tasks.outs[i]))
    outs += call.extra.outs
    seeds += [torch.ones_like(a) for a in call.extra.outs]
    if not outs or not plan.finals:
        return {}
    with quiet(plan.leaf_tensors):
        got = torch.autograd.grad(outs, [g.leaves[n] for n in plan.finals], seeds, retain_graph=call.keep,
                                  allow_unused=True)
    return {n: r for n, r in zip(plan.finals, got) if r is not None}


def totals(parts: list[tuple[Node, Tensor]]) -> dict[Node, Tensor]:
    """Each leaf's parts summed, in the order given."""
    out: dict[Node, Tensor] = {}
    for n, r in parts:
        out[n] = r if n not in out else out[n] + r
    return out


def check(call: Call, g: Graph, tasks: tuple[int, ...], total: dict[Node, Tensor]) -> None:
    """:class:`NonFinite` if a leaf's total is not finite.  The per-task rows were checked already, so the cause is
    below the blocks or in a loss seeded in the final pass (``tasks`` and the ``also`` terms): it is named when
    only one loss is seeded there."""
    seeded = [call.tasks.names[i] for i in tasks] + call.extra.names
    ids = list(tasks) + [g.k + j for j in range(len(call.extra.outs))]
    blame = ids[0] if len(ids) == 1 else None
    if len(seeded) == 1:
        where = f" (from {seeded[0]!r})"
    elif seeded:
        where = f" (from one of {', '.join(map(repr, seeded))}, or the resolved directions below the blocks)"
    else:
        where = " (from the resolved directions, in the graph below the blocks)"
    nodes = list(total)
    named = [([(f"the gradient w.r.t. {g.name(n)!r}{where}", i)], (t,)) for i, (n, t) in enumerate(total.items())]
    bad = first_bad(named, call.group)  # type: ignore[arg-type]
    if bad is None:
        return
    if blame is None and call.keep and len(ids) > 1:  # the graph is kept: ask each seeded loss (error path only)
        blame = _blame(call, g, ids, nodes[bad[1]])  # type: ignore[index]
        if blame is not None:
            name = (call.tasks.names + call.extra.names)[blame]
            raise NonFinite(f"the gradient of {name!r} w.r.t. {g.name(nodes[bad[1]])!r} is not finite; no gradient "  # type: ignore[index]
                            "was written", blame)
    raise NonFinite(f"{bad[0]} is not finite; no gradient was written", blame)


def _blame(call: Call, g: Graph, ids: list[int], node: Node) -> int | None:
    """The first of the losses ``ids`` whose own gradient w.r.t. leaf ``node`` is not finite, else None."""
    outs = call.tasks.outs + call.extra.outs
    leaf = g.leaves[node]
    with quiet([leaf]):
        for i in ids:
            (r,) = torch.autograd.grad(outs[i], [leaf], retain_graph=True, allow_unused=True)
            if r is not None and not bool(r.isfinite().all()):
                return i
    return None


def write(g: Graph, total: dict[Node, Tensor]) -> None:
    """Accumulate each total into its leaf's ``.grad`` through its ``AccumulateGrad`` node (see the module doc)."""
    if not total:
        return
    leaves = [g.leaves[n] for n in total]
    grads = [t.to(p.dtype) for p, t in zip(leaves, total.values())]
    torch.autograd.backward(leaves, grads)
