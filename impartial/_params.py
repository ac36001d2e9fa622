"""``block="params"``: the per-task gradients of the shared parameters themselves, then one solve on them.

Two ways to get ``J`` (one row per task, one column per shared parameter entry), the same numbers:

- **through the blocks** (the usual case): where every task reaches the shared parameters only through the
  automatic top-level blocks (a trunk's output read by k heads), the per-task gradients at the blocks come from
  one pass over the heads (each head traversed once per task that reaches it, as in a plain backward), and ``J``
  from **one** backward from the blocks down through the trunk, batched over the k rows (``is_grads_batched``);
- **from the losses**: otherwise (nested blocks, a task reaching a shared parameter beside every block, a loss
  tensor made by one op), one backward from the k losses, batched or a loop.

Where the graph proves every shared parameter is a Linear layer's weight or bias, ``J`` is not formed at all
(:mod:`._param_gram`); where the losses are the entries of one per-sample loss vector and the graph proves each
depends on its own sample only, neither (:mod:`._per_sample`: one plain backward).  The parameters above the
blocks and the ``also`` terms get their plain gradients.  Every node between the losses and the parameters runs
once per task here (the trunk on k rows): the parameters are the block, so the whole model is "above" it, and
hooks there see per-task gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import _autograd
from . import _distributed as _dist
from ._autograd import Log, Rows, SparseGradient, checked, choose, rows, zeros
from ._call import Call
from ._checks import Blame, Check, rows_check, said
from ._param_gram import linear_layers, params_gram
from ._per_sample import per_sample_stage
from ._plan import plan
from ._report import BlockReport
from ._solve import solve_pieces
from ._task_grads import _blocks_rows
from ._torch_compat import quiet
from .graph._blocks import _find
from .graph._trace import Graph, _bits
from .solvers import combine, gram

__all__ = ["Cut", "params_stage", "heads_pass"]


@dataclass(frozen=True)
class Cut:
    """Every task reaches the shared parameters only through the top-level automatic ``blocks``; ``heads`` are
    the single-task leaves above them."""

    blocks: list
    heads: list[Node]


def params_stage(
    call: Call, g: Graph, log: Log
) -> tuple[list[BlockReport], list[tuple[Node, Tensor]], dict[Node, tuple[int, ...]]]:
    """The block report, every leaf's gradient parts, and the task that alone reaches each head leaf whose
    gradient is checked only with the totals."""
    shared = [n for n in g.nodes if n in g.shared]
    others = [n for n in g.nodes if n in g.leaves and n not in g.shared and g.mask(n) & g.task_bits]
    leaf_tensors = [g.leaves[n] for n in g.nodes if n in g.leaves]
    with quiet(leaf_tensors):
        parts = _also(call, g)
        sampled = per_sample_stage(call, g, log, shared, others)  # a 1-D loss tensor: every task one sample
        if isinstance(sampled, tuple):
            return [sampled[0]], parts + sampled[1], {}
        cut = _cut(call, g, shared, others)
        layers = linear_layers(call, g, cut, shared, others) if cut is not None else None
        if layers is not None:
            assert cut is not None
            rep, got = params_gram(call, g, log, cut.blocks, cut.heads, layers, shared, others)
            also = {n for n, _ in parts}
            owner = {n: _bits(g.raw[n]) for n in cut.heads if n not in also}
            return [rep], parts + got, owner
        rep, got = _j_path(call, g, log, cut, shared, others)
    note = None if sampled is None else f"per-sample Gram not used: {sampled}"
    return [replace(rep, note=note)], parts + got, {}


def _also(call: Call, g: Graph) -> list[tuple[Node, Tensor]]:
    """The plain gradient of the ``also`` terms, per leaf (before the task passes, which may free the graph).  The
    last pass through a term's own nodes frees them, as plain ``backward()`` does, where no other loss runs any of
    them (a term that meets the rest only at leaves, e.g. weight decay); a term that shares nodes with another loss
    (a KL on the latent) keeps them for the passes that free the shared part."""
    if not call.extra.outs:
        return []
    k, outs = g.k, call.extra.outs
    inner = [g.mask(n) for n in g.nodes if n not in g.leaves]
    everyone = (1 << (k + len(outs))) - 1
    own = [not any(m >> (k + j) & 1 and m & everyone & ~(1 << (k + j)) for m in inner) for j in range(len(outs))]
    parts: list[tuple[Node, Tensor]] = []
    for alone in (False, True):  # the shared terms first (kept), then those whose nodes this pass frees
        terms = [a for a, o in zip(outs, own) if o == alone]
        leaves = [
            n
            for n in g.nodes
            if n in g.leaves and any(g.mask(n) >> (k + j) & 1 for j, o in enumerate(own) if o == alone)
        ]
        if not terms or not leaves:
            continue
        out = torch.autograd.grad(
            terms,
            [g.leaves[n] for n in leaves],
            [torch.ones_like(a) for a in terms],
            retain_graph=call.keep or not alone,
            allow_unused=True,
        )
        parts += [(n, a) for n, a in zip(leaves, out) if a is not None]
    return parts


def _j_path(
    call: Call, g: Graph, log: Log, cut: Cut | None, shared: list[Node], others: list[Node]
) -> tuple[BlockReport, list[tuple[Node, Tensor]]]:
    k = g.k
    mask = 0
    for n in shared:
        mask |= g.mask(n) & g.task_bits
    ts = _bits(mask)  # tasks that reach no shared parameter take no part in the solve
    sel = slice(None) if len(ts) == k else list(ts)  # a slice: no copy of the k rows
    holder: list[Tensor] = []  # the Gram matrix, then J's columns it was computed from
    # across ranks with a Gram-space solver: the Gram from each rank's share of J's columns (one reduce-scatter of
    # J_r and k² numbers instead of an all-reduce of J_r)
    shard = call.group is not None and call.solvers[0].gram_space

    def compute(batched: bool) -> Rows:
        if cut is None:
            res = _from_losses(call, g, log, shared, others, batched)
        else:
            res = _through_blocks(call, g, log, cut, shared, others, batched)
        if call.group is not None and not shard:  # the full-batch task gradients: the mean over the ranks
            res.dense = [_dist.all_mean(r, call.group) for r in res.dense]
        return res

    def checks(res: Rows) -> list[Check]:
        Js = [r[sel].reshape(len(ts), -1) for r in res.dense]
        if shard:  # this rank's share of the columns of the full-batch J (impartial._distributed)
            Js = [_dist.shard_mean(Js, call.group)]
        G = gram(Js[0])
        for J in Js[1:]:
            G = G + gram(J)
        if shard:
            G = _dist.all_sum(G, call.group)
        holder[:] = [G, *Js]
        names = call.tasks.names
        msgs = [(i, said("the gradient of {!r} w.r.t. the shared parameters", names[i])) for i in ts]
        return [Check(G.diagonal().isfinite(), msgs), *_heads_checks(call, g, others, res.sparse)]

    # through the blocks, the per-task pass runs over the heads only: disjoint, so the loop
    try:
        res = checked(
            log, compute, checks, choose(call.task_grads, g, None, g.task_bits, disjoint=cut is not None), call.group
        )
    except SparseGradient as err:
        raise ValueError(
            f"{g.name(shared[err.input])!r} gets a sparse gradient (an nn.Embedding(sparse=True)): block='params' "
            "needs each task's gradient of the shared parameters as a dense row; use sparse=False there, or "
            "block='auto'"
        ) from None
    parts = [(n, p) for n, r in zip(others, res.sparse) for p in r if p is not None]
    rep, ds = _j_solve(call, [r[sel].reshape(len(ts), -1) for r in res.dense], ts, holder, shard, log.passes[-1])
    return rep, parts + [(n, d.reshape(g.leaves[n].shape)) for n, d in zip(shared, ds)]


def _from_losses(call: Call, g: Graph, log: Log, shared: list[Node], others: list[Node], batched: bool) -> Rows:
    """Each task's gradient of the shared parameters (dense rows) and of the other leaves it reaches, from the
    losses (the loop asks row i only for the other leaves task i reaches)."""
    k = g.k
    needs = [[len(shared) + j for j, n in enumerate(others) if g.mask(n) >> i & 1] for i in range(k)]
    inputs = [g.leaves[n] for n in shared + others]
    return rows(
        log,
        call.tasks.outs,
        inputs,
        None,
        n=k,
        onehot=k,
        dense=len(shared),
        needs=needs,
        batched=batched,
        retain=call.keep,
        structure=(g.key, "params"),
    )


def _heads_checks(call: Call, g: Graph, others: list[Node], sparse: list) -> list[Check]:
    """Each task's gradient of the leaves beside the shared parameters (its heads), finite, each task named."""
    names = call.tasks.names

    def blame(i: int, n: Node) -> Blame | None:
        return (i, said("the gradient of {!r} w.r.t. {!r}", names[i], partial(g.name, n))) if i in g.tasks(n) else None

    return [rows_check(r, [blame(i, n) for i in range(g.k)]) for n, r in zip(others, sparse)]


def _j_solve(
    call: Call, Js: list[Tensor], ts: tuple[int, ...], holder: list[Tensor], shard: bool, how: str
) -> tuple[BlockReport, list[Tensor]]:
    """The solve on the shared parameters' rows ``Js`` (``holder``: the Gram, then the columns it came from)."""
    solver = call.solvers[0]  # one problem: the solver itself (its own state)
    if shard:  # the norms from the shares; each rank writes its own wᵀ J_r, which the ranks' average makes wᵀ J
        _, _, s = solve_pieces(call, solver, holder[1:], ts, None, False, holder[0], local=True)
        assert s.w is not None  # shard is set for Gram-space solvers only
        ds = [combine(s.w, J).mul_(s.scale.to(J.dtype)) for J in Js]
    else:
        ds, _, s = solve_pieces(call, solver, Js, ts, None, False, holder[0])
    D = sum(J.shape[-1] for J in Js)
    rep = BlockReport(
        f"{len(Js)} shared parameters [{D}]",
        (D,),
        tuple(call.tasks.names[i] for i in ts),
        s.G,
        s.w,
        s.scale,
        task_grads=how,
        gram_from="J",
        status=s.status,
    )
    return rep, ds


def _cut(call: Call, g: Graph, shared: list[Node], others: list[Node]) -> Cut | None:
    """The blocks and heads when every task reaches the shared parameters only through top-level automatic blocks
    (then ``J`` is one batched backward from them), else None."""
    if call.tasks.fused is not None or not shared:
        return None
    _find(g, call.tasks)
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
        raw = g.raw.get(n, 0)
        if n in leaf_blocks or not raw:
            continue
        if n in g.shared or g.above.get(n, 0) or raw & (raw - 1):
            return None  # a task reaches it beside every block: J needs the losses' own pass
        heads.append(n)
    return Cut(blocks, heads)


def heads_pass(call: Call, g: Graph, log: Log, cut: Cut, batched: bool) -> Rows:
    """The per-task pass over the heads: each task's rows at every block (``dense``: its edge, or parameter) and its
    own gradient at each head (``sparse``: only its own row)."""
    k = g.k
    p = plan(g, marked=False)
    captures = [c for caps in p.captures for c in caps]
    nc = len(captures)
    owner = [_bits(g.raw[n])[0] for n in cut.heads]
    needs = [[nc + h for h, c in enumerate(owner) if c == r] for r in range(k)]
    # the last pass through the heads: the trunk pass below starts at the blocks (the also terms ran before); the
    # block tensors' hooks fire in the trunk pass that starts there, not here too
    with quiet(p.block_tensors):
        got = rows(
            log,
            call.tasks.outs,
            captures + [g.leaves[n] for n in cut.heads],
            None,
            n=k,
            onehot=k,
            dense=nc,
            needs=needs,
            batched=batched,
            retain=call.keep,
            disjoint=not call.tasks.stacked,
        )
    own = [[r[c] if i == c else None for i in range(k)] for c, r in zip(owner, got.sparse)]
    return Rows(_blocks_rows(p, range(len(cut.blocks)), got.dense, k), own)


def _through_blocks(
    call: Call, g: Graph, log: Log, cut: Cut, shared: list[Node], others: list[Node], batched: bool
) -> Rows:
    """The rows of ``shared`` (dense) and ``others`` (per row) from the losses' gradients at the blocks (one pass
    over the heads) and one backward from the blocks through the trunk."""
    k, blocks = g.k, cut.blocks
    res = heads_pass(call, g, log, cut, batched)
    dense: dict[Node, Tensor] = {b.edge.node: res.dense[j] for j, b in enumerate(blocks) if b.leaf is not None}
    per: dict[Node, list[Tensor | None]] = dict(zip(cut.heads, res.sparse))
    act = [j for j, b in enumerate(blocks) if b.leaf is None]
    below = [n for n in shared + others if n not in dense and n not in per]
    if act and below:
        # every row seeds every block: batched (the loop only when asked for; a row's 0 × inf here is the loop's
        # too, as the rows at the blocks are the task gradients themselves); the last pass through the trunk
        vjp = rows(
            log,
            [blocks[j].edge for j in act],
            [g.leaves[n] for n in below],
            [res.dense[j] for j in act],
            n=k,
            onehot=0,
            dense=len(below),
            needs=None,
            batched=(_autograd.FORCE or call.task_grads) != "loop",
            retain=call.keep,
            structure=(g.key, "trunk"),
        )
        log.passes.pop()  # the report names the per-task pass (the one above)
        dense.update(zip(below, vjp.dense))
    for n in others:  # a leaf below the blocks that is not shared: its rows, one per task
        if n in dense:
            per[n] = list(dense[n].unbind(0))
    # a shared parameter no block reaches (only a leaf block does elsewhere): zero rows, as from the losses
    return Rows(
        [dense[n] if n in dense else zeros(g.leaves[n], k) for n in shared], [per.get(n, [None] * k) for n in others]
    )
