"""``block="params"`` with every task one sample: the Gram matrix of the per-sample Jacobian from **one** plain
backward, then each layer's share of the direction from its weighted output gradient; ``J`` is never formed.

The losses are the entries of one 1-D tensor ``L`` ``[B]`` (``reduction="none"``), task ``b`` = ``L[b]``.  Where
:func:`impartial._samples.prove` shows from the graph that ``L[b]`` depends on sample ``b`` of every activation only,
one backward of ``Σ_b L[b]`` gives every layer's per-sample output gradients, and
``G = Σ_layers G_layer`` (:mod:`impartial._layer_grams`); the solver's weights ``w`` then give each parameter's
direction ``Σ_b w_b g_b`` from the layer's saved input and ``w``-weighted output gradient (no second backward).
``keep_norm`` takes the plain sum's norm as ``√(1ᵀ G 1)``.  Cost over a plain backward: the kernels or per-sample
products of each layer (``O(B²)`` memory per layer, chunked) and the solve.

Elsewhere (a loss list, an op that mixes samples, a BatchNorm in training mode, several processes, a coordinate
solver) the ``J`` path runs and ``BlockReport.note`` says why.  With ``Sum()`` and ``keep_norm=False`` the result is
the plain backward's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._autograd import Log, checked
from ._call import Call
from ._checks import Check, each
from ._generic_gram import Generic, unchain
from ._gram_base import Rule, Unreadable, sq
from ._layer_grams import DEDICATED
from ._report import BlockReport
from ._sample_ops import Refuse
from ._samples import Layer, Proof, prove
from ._solve import rescale_pieces
from ._torch_compat import input_metadata, saved, view_base
from .graph._trace import Graph
from .solvers import GramSolver, solve_dtype

__all__ = ["per_sample_stage"]

Parts = list[tuple[Node, Tensor]]


def per_sample_stage(
    call: Call, g: Graph, log: Log, shared: list[Node], others: list[Node]
) -> tuple[BlockReport, Parts] | str | None:
    """The block report and each leaf's gradient; None where the losses are not entries of one 1-D tensor; the
    reason (a string) where the per-sample path does not apply to such losses."""
    source = _source(call)
    if source is None:
        return None
    if call.group is not None or len(call.solvers) != 1 or not call.solvers[0].gram_space:
        return "the per-sample Gram needs one Gram-space solver in one process"
    root, idx = source
    try:
        proof = prove(g, root, shared)
    except Refuse as err:
        return str(err)
    rules = [_rule(layer, proof, g) for layer in proof.layers]
    kept = None if idx == list(range(proof.B)) else torch.tensor(idx)
    held: dict[str, object] = {}

    def compute(batched: bool) -> list[Tensor | None]:
        got = _plain_pass(call, g, proof, rules, others, kept)
        log.passes.append("plain")
        held["G"], held["J"] = _gram(proof, rules, shared, log, len(idx))
        return got

    def checks(_: object) -> list[Check]:
        G = held["G"]
        assert isinstance(G, Tensor)
        return [
            Check(G.diagonal().isfinite(), each("the gradient of {!r} w.r.t. the shared parameters", call.tasks.names))
        ]

    got = checked(log, compute, checks, False, None)
    G, Js = held["G"], held["J"]
    assert isinstance(G, Tensor) and isinstance(Js, dict)
    rep, ds = _solve(call, g, proof, rules, shared, G, Js, kept, log.passes[-1])
    return rep, ds + [(n, r) for n, r in zip(others, got[len(got) - len(others) :]) if r is not None]


def _source(call: Call) -> tuple[tuple[Node, int], list[int]] | None:
    """The edge of the loss vector ``L`` and the sample of each task (task ``i`` is ``L[idx[i]]``), where the tasks
    are entries of one 1-D tensor: the tensor itself (``L.unbind(0)`` inside, some dropped after
    ``nonfinite="skip"``), or a list of its ``unbind(0)`` entries; else None."""
    roots, outs = call.tasks.roots, call.tasks.outs
    if call.tasks.fused is not None and len(roots) == 1:
        B = input_metadata(*roots[0][0])[0][0]
        return roots[0][0], list(range(B)) if len(outs) == B else [o.output_nr for o in outs]
    if len(roots) != len(outs):
        return None
    edges: set[tuple[Node, int]] = set()
    idx: list[int] = []
    for (node, nr), _ in roots:  # each task L[b], by L.unbind(0) / iterating L, or by L[b]
        name = node.name()
        if name not in ("UnbindBackward0", "SelectBackward0") or saved(node, "dim") != 0:
            return None
        child, cnr = node.next_functions[0]
        if child is None:
            return None
        edge = (child, cnr)
        edges.add(edge)
        n = input_metadata(*edge)[0][0]
        idx.append(nr if name == "UnbindBackward0" else saved(node, "index") % n)
    return (edges.pop(), idx) if len(edges) == 1 and len(set(idx)) == len(idx) else None


def _solve(
    call: Call,
    g: Graph,
    proof: Proof,
    rules: list[Rule | Generic],
    shared: list[Node],
    G: Tensor,
    Js: dict[Node, Tensor],
    kept: Tensor | None,
    how: str,
) -> tuple[BlockReport, Parts]:
    """The weights, each shared leaf's direction (``keep_norm`` and the stationarity rule of
    :func:`impartial._solve.rescale`), and the report."""
    outs = call.tasks.outs
    dtype = input_metadata(*proof.root)[1]
    solver = call.solvers[0]
    assert isinstance(solver, GramSolver)
    whole = view_base(outs[0])  # the loss vector, without stacking its entries again
    if whole is not None and whole.shape == (proof.B,):
        losses = whole.detach() if kept is None else whole.detach()[kept]
    else:
        losses = torch.stack(outs).detach()
    sol = solver.solve(G, losses=losses, precision=dtype)
    w = sol.weights
    ds = _directions(shared, proof, rules, Js, w.to(dtype), g)
    flat, scale, status = rescale_pieces(call, ds, G, sol, dtype, lambda c: G.sum().clamp_min(0) * c * c)
    D = sum(g.leaves[n].numel() for n in shared)
    kinds = tuple(
        (g.name(n), "+".join(sorted({rules[i].kind for i, _ in proof.owners.get(n, [])})) or "none") for n in shared
    )
    rep = BlockReport(
        f"{len(shared)} shared parameters [{D}]",
        (D,),
        tuple(call.tasks.names),
        G,
        w,
        scale,
        task_grads=how,
        gram_from="per-sample",
        status=status,
        rules=kinds,
    )
    return rep, [(n, f.view(g.leaves[n].shape)) for n, f in zip(shared, flat)]


def _rule(layer: Layer, proof: Proof, g: Graph) -> Rule | Generic:
    """The layer's closed-form rule where every broadcast input is its own parameter's only use, else the generic
    one."""
    cls = DEDICATED.get(layer.node.name())
    if cls is not None and all(j in layer.chains for j in layer.slots):
        try:
            return cls(layer, proof.B)
        except Unreadable:
            pass
    return Generic(layer, proof.B, g.leaves)


def _plain_pass(
    call: Call, g: Graph, proof: Proof, rules: list[Rule | Generic], others: list[Node], kept: Tensor | None
) -> list[Tensor | None]:
    """One backward of the tasks' sum: every layer's output gradients (bound to its rule) and the other leaves'
    plain gradients.  The last pass through the graph unless a generic rule runs after it."""
    root = GradientEdge(*proof.root)
    shape, dtype, device = input_metadata(*proof.root)
    seed = torch.ones(shape, dtype=dtype, device=device)
    if kept is not None:
        seed = torch.zeros_like(seed).index_fill_(0, kept.to(device), 1.0)
    edges = [(i, nr) for i, r in enumerate(rules) for nr in r.layer.outs]
    inputs: list = [GradientEdge(rules[i].layer.node, nr) for i, nr in edges] + [g.leaves[n] for n in others]
    keep = call.keep or any(isinstance(r, Generic) for r in rules)
    got: list[Tensor | None] = list(torch.autograd.grad([root], inputs, [seed], retain_graph=keep, allow_unused=True))
    deltas: list[dict[int, Tensor]] = [{} for _ in rules]
    for (i, nr), t in zip(edges, got):
        out = input_metadata(rules[i].layer.node, nr)
        deltas[i][nr] = torch.zeros(out[0], dtype=out[1], device=out[2]) if t is None else t
    for r, delta in zip(rules, deltas):
        r.bind(delta, kept)
    return got


def _fast(n: Node, proof: Proof, rules: list[Rule | Generic]) -> tuple[int, int] | None:
    """``(layer, slot)`` where leaf ``n``'s only use is a closed-form rule's slot."""
    owners = proof.owners.get(n, [])
    return owners[0] if len(owners) == 1 and isinstance(rules[owners[0][0]], Rule) else None


def _grouped(shared: list[Node], proof: Proof, rules: list[Rule | Generic]) -> dict[int, list[tuple[int, Node]]]:
    """Closed-form layer → its ``(slot, leaf)`` pairs, for the leaves served by one slot alone."""
    out: dict[int, list[tuple[int, Node]]] = {}
    for n in shared:
        fast = _fast(n, proof, rules)
        if fast is not None:
            out.setdefault(fast[0], []).append((fast[1], n))
    return out


def _gram(
    proof: Proof, rules: list[Rule | Generic], shared: list[Node], log: Log, k: int
) -> tuple[Tensor, dict[Node, Tensor]]:
    """``G`` ``[k, k]`` (float64 for float32 models), and the per-sample gradients of the leaves that need them
    (several uses, or a generic layer)."""
    G: Tensor | None = None

    def add(part: Tensor) -> None:  # in place, each part freed as soon as added (no [k, k] temporaries)
        nonlocal G
        G = part.to(torch.promote_types(part.dtype, torch.float32)) if G is None else G.add_(part)

    for i, pairs in _grouped(shared, proof, rules).items():
        rule = rules[i]
        assert isinstance(rule, Rule)
        add(rule.gram([j for j, _ in pairs]))
    Js: dict[Node, Tensor] = {}
    for n in shared:
        owners = proof.owners.get(n, [])
        if owners and _fast(n, proof, rules) is None:
            J = _contribution(rules[owners[0][0]], owners[0][1], n, proof, log)
            for i, j in owners[1:]:
                J = J + _contribution(rules[i], j, n, proof, log)
            Js[n] = J
            add(sq(J))
    if G is None:
        raise Refuse("no task reaches a shared parameter")
    # summed in the parts' dtype (at least float32: the parts carry its round-off already), made symmetric (BLAS
    # promises no bitwise symmetry) there, then widened for the solve: the transposed copy of a float64 [512, 512]
    # costs 4x that of a float32 one (a 4 KiB stride), 2.5 ms of the step at B = 512
    G = G.add_(G.mT.contiguous()).mul_(0.5).to(solve_dtype(G.dtype))
    assert G.shape == (k, k)
    return G, Js


def _contribution(rule: Rule | Generic, slot: int, n: Node, proof: Proof, log: Log) -> Tensor:
    """Leaf ``n``'s per-sample gradients ``[B', *shape]`` through one of its uses."""
    if isinstance(rule, Generic):
        return rule.jacobians(log)[n]
    return unchain(rule.jac(slot), rule.layer.chains[slot][1], 1)


def _directions(
    shared: list[Node], proof: Proof, rules: list[Rule | Generic], Js: dict[Node, Tensor], w: Tensor, g: Graph
) -> list[Tensor]:
    """``Σ_b w_b g_b`` for every shared leaf, in ``shared``'s order."""
    got: dict[Node, Tensor] = {}
    for i, pairs in _grouped(shared, proof, rules).items():
        rule = rules[i]
        assert isinstance(rule, Rule)
        for (j, n), d in zip(pairs, rule.directions([j for j, _ in pairs], w)):
            got[n] = unchain(d, rule.layer.chains[j][1], 0)
    for n, J in Js.items():
        got[n] = torch.tensordot(w, J, dims=1)
    return [got[n] if n in got else torch.zeros_like(g.leaves[n]) for n in shared]
