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

from functools import partial

import torch
from torch import Tensor
from torch.autograd.graph import Node

from ._call import Call
from ._checks import Blame, Check, NonFinite, first_bad, said
from ._plan import Plan
from ._torch_compat import foreach_norm, quiet, run_backward
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
        got = torch.autograd.grad(
            outs, [g.leaves[n] for n in plan.finals], seeds, retain_graph=call.keep, allow_unused=True
        )
    return {n: r for n, r in zip(plan.finals, got) if r is not None}


def totals(parts: list[tuple[Node, Tensor]]) -> dict[Node, Tensor]:
    """Each leaf's parts summed, in the order given."""
    out: dict[Node, Tensor] = {}
    for n, r in parts:
        out[n] = r if n not in out else out[n] + r
    return out


def check(
    call: Call, g: Graph, seeded: tuple[int, ...], total: dict[Node, Tensor], owner: dict[Node, tuple[int, ...]]
) -> None:
    """:class:`NonFinite` if a leaf's total is not finite, in one fused check of every leaf.

    A head (a leaf only the tasks ``owner[n]`` reach) blames its task (or names its tasks).  Elsewhere the per-task
    rows were checked already, so the cause is below the blocks or in a loss seeded in the final pass (the
    ``seeded`` tasks and the ``also`` terms): it is named when only one loss is seeded there, or found by asking each
    of them when the graph is kept (the error path only).
    """
    if not total:
        return
    names = call.tasks.names + call.extra.names
    ids = list(seeded) + [g.k + j for j in range(len(call.extra.outs))]
    blame = ids[0] if len(ids) == 1 else None
    if len(ids) == 1:
        where = f" (from {names[ids[0]]!r})"
    elif ids:
        where = f" (from one of {', '.join(repr(names[i]) for i in ids)}, or the resolved directions below the blocks)"
    else:
        where = " (from the resolved directions, in the graph below the blocks)"
    nodes = list(total)
    values = [t.coalesce().values() if t.is_sparse else t for t in total.values()]  # a sparse Embedding's gradient
    who: list[Blame | None] = [
        _head_blame(names, g, n, owner[n])
        if n in owner
        else (blame, said("the gradient w.r.t. {!r}" + where, partial(g.name, n)))
        for n in nodes
    ]
    norms = foreach_norm(values)
    dev = norms[0].device
    flags = torch.stack([v if v.device == dev else v.to(dev) for v in norms]).isfinite()
    bad = first_bad([Check(flags, who, lambda i: bool(values[i].isfinite().all()))], call.group)
    if bad is None:
        return
    message, task = bad
    if task is None and call.keep and len(ids) > 1:  # the graph is kept: ask each seeded loss (error path only)
        i = next(i for i, v in enumerate(values) if not bool(v.isfinite().all()))
        task = _blame(call, g, ids, nodes[i])
        if task is not None:
            message = f"the gradient of {names[task]!r} w.r.t. {g.name(nodes[i])!r}"
    raise NonFinite(f"{message} is not finite; no gradient was written", task)


def _head_blame(names: list[str], g: Graph, n: Node, tasks: tuple[int, ...]) -> Blame:
    if len(tasks) == 1:
        return tasks[0], said("the gradient of {!r} w.r.t. {!r}", names[tasks[0]], partial(g.name, n))
    which = ", ".join(repr(names[i]) for i in tasks)
    return None, said("the gradient of one of {} w.r.t. {!r}", which, partial(g.name, n))


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
    """Accumulate each total into its leaf's ``.grad`` through its ``AccumulateGrad`` node (see the module doc).

    Each leaf is seeded through a fresh view of itself (``p.view_as(p)``): ``AccumulateGrad`` then receives a tensor
    nothing else refers to and takes it as ``.grad`` without a copy, as in a plain backward (seeded directly, it
    would copy every gradient into newly allocated memory).  A total that is a row of a larger batched result is
    copied first, not to keep every row alive.
    """
    if not total:
        return
    leaves = [g.leaves[n] for n in total]
    grads = []
    for p, t in zip(leaves, total.values()):
        if t.dtype != p.dtype:
            t = t.to(p.dtype)
        if not t.is_sparse and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()
        grads.append(t)
    with torch.enable_grad():  # (a sparse gradient, which a view cannot take, is seeded at the leaf itself)
        roots = [p if t.is_sparse else p.view_as(p) for p, t in zip(leaves, grads)]
    run_backward(roots, grads)
