"""Every task one sample: the proof, read from the autograd graph, that entry ``b`` of a 1-D loss tensor depends on
sample ``b`` of every activation only, and the layers where the samples' gradients are summed into parameters.

With ``L = loss(model(x), y)`` of shape ``[B]`` (``reduction="none"``) and tasks ``ℓ_b = L[b]``, one plain backward
seeded with ones gives, at every activation ``h``, ``Σ_b ∂ℓ_b/∂h``.  Where ``ℓ_b`` depends on sample ``b``'s entries
of ``h`` only, sample ``b``'s entries of that sum *are* ``∂ℓ_b/∂h`` and the others' are zero for ``ℓ_b``: the per-sample
gradients of every layer come from that one backward, without ``B`` backward passes.  This holds when every op on
the way keeps the samples apart (a BatchNorm in training mode, a mean over the batch do not), which
:func:`prove` checks node by node, from the losses down (:mod:`impartial._sample_ops`: where each op keeps the
samples, by its forward semantics).  A parameter is broadcast over the samples; where a node combines samples'
activations with one (a matrix product's weight, a convolution's kernel, a bias), that node is a :class:`Layer`,
whose per-sample gradients :mod:`impartial._layer_grams` computes from its saved input and output gradient.

Nothing is assumed: an op the rules do not know, a per-sample value that meets a value summed over the samples, or a
shared parameter reached by the samples directly raises :class:`~impartial._sample_ops.Refuse`, and the caller
takes the ``J`` path and reports why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.autograd.graph import Node

from ._sample_ops import SUM, Lay, Refuse, State
from ._sample_rules import REINDEX, RULES
from ._torch_compat import input_metadata
from .graph._trace import Graph

__all__ = ["Layer", "Proof", "prove"]

Shape = tuple[int, ...]


@dataclass
class Layer:
    """A node where the samples' gradients are summed into parameters below its broadcast inputs (``slots``)."""

    node: Node
    #: where each of its outputs (that the tasks reach) holds the samples: its output gradient is read there
    outs: dict[int, Lay]
    #: each input's state (a layout, :data:`SUM`, or None) and shape (None: no edge)
    ins: list[State]
    shapes: list[Shape | None]
    #: broadcast input slot → the shared leaves below it
    slots: dict[int, list[Node]] = field(default_factory=dict)
    #: slot → (leaf, the re-indexing nodes from the slot down to it), where the slot reaches one leaf that way
    chains: dict[int, tuple[Node, list[Node]]] = field(default_factory=dict)


@dataclass
class Proof:
    """The samples are kept apart from the losses ``root`` (``B`` entries) to every shared parameter."""

    B: int
    root: tuple[Node, int]
    layers: list[Layer]
    #: shared leaf → the (layer index, slot) pairs its per-sample gradients come from
    owners: dict[Node, list[tuple[int, int]]]


def prove(g: Graph, root: tuple[Node, int], shared: list[Node]) -> Proof:
    """The layers of a graph whose losses are the entries of one 1-D tensor at ``root``; :class:`Refuse` with the
    reason where the graph does not prove that each entry depends on its own sample only."""
    shape = tuple(input_metadata(*root)[0])
    if len(shape) != 1 or shape[0] < 2:
        raise Refuse(f"the losses are not a vector of per-sample losses (shape {list(shape)})")
    B, tb = shape[0], g.task_bits
    below = _below(g, set(shared))
    state: dict[Node, dict[int, State]] = {root[0]: {root[1]: (1, 1)}}
    layers: list[Layer] = []
    for node in g.nodes:
        st = state.get(node)
        if node not in below or not st or not g.mask(node) & tb:
            continue
        if node in g.leaves:
            if any(v != SUM for v in st.values()):
                raise Refuse(f"{g.name(node)} takes part per sample (it is not broadcast over the samples)")
            continue
        nexts = node.next_functions
        outs = {nr: v for nr, v in st.items() if isinstance(v, tuple)}
        if SUM in st.values():
            if set(st.values()) != {SUM}:
                raise Refuse(f"{node.name()} gets both a per-sample gradient and one summed over the samples")
            res: list[State] = [SUM] * len(nexts)
            shapes: list[Shape | None] = [None] * len(nexts)
        else:
            rule = RULES.get(node.name())
            if rule is None:
                raise Refuse(f"no per-sample rule for {node.name()} (it may mix samples)")
            oshapes = [tuple(input_metadata(node, nr)[0]) for nr in range(max(outs) + 1)]
            shapes = [None if c is None else tuple(input_metadata(c, nr)[0]) for c, nr in nexts]
            res = rule(node, outs, oshapes, shapes, B)
        sums: list[int] = []
        for j, ((c, nr), r) in enumerate(zip(nexts, res)):
            if c is None or r is None or c not in below:
                continue
            _put(g, state, c, nr, r)
            if r == SUM and outs:
                sums.append(j)
        if sums:
            layers.append(Layer(node, outs, res, shapes, {j: [] for j in sums}))
    return Proof(B, root, layers, _owners(g, layers, below, set(shared)))


def _below(g: Graph, shared: set[Node]) -> set[Node]:
    """The nodes with a shared leaf at or below them."""
    below = set(shared)
    for node in reversed(g.nodes):  # children first
        if any(c is not None and c in below for c, _ in node.next_functions):
            below.add(node)
    return below


def _put(g: Graph, state: dict[Node, dict[int, State]], c: Node, nr: int, r: State) -> None:
    slot = state.setdefault(c, {})
    old = slot.get(nr)
    if old is not None and old != r:
        what = (
            "a per-sample gradient and one summed over the samples"
            if SUM in (old, r)
            else ("gradients that place the samples differently")
        )
        raise Refuse(f"{g.name(c)} gets {what} (an op mixes samples)")
    slot[nr] = r


def _owners(g: Graph, layers: list[Layer], below: set[Node], shared: set[Node]) -> dict[Node, list[tuple[int, int]]]:
    """Fill each layer's slots (the shared leaves below each broadcast input) and direct chains; shared leaf →
    its (layer, slot) pairs."""
    owners: dict[Node, list[tuple[int, int]]] = {}
    for i, layer in enumerate(layers):
        nexts = layer.node.next_functions
        for j in layer.slots:
            top = nexts[j][0]
            assert top is not None  # a slot is an input that requires grad
            found: list[Node] = []
            stack, seen = [top], {top}
            while stack:
                n = stack.pop()
                if n in g.leaves:
                    if n in shared:
                        found.append(n)
                    continue
                for c, _ in n.next_functions:
                    if c is not None and c in below and c not in seen:
                        seen.add(c)
                        stack.append(c)
            layer.slots[j] = found
            for leaf in found:
                owners.setdefault(leaf, []).append((i, j))
            direct = _chain(g, top, shared)
            if direct is not None:
                layer.chains[j] = direct
    return owners


def _chain(g: Graph, top: Node, shared: set[Node]) -> tuple[Node, list[Node]] | None:
    """``(leaf, nodes)`` when ``top`` is a chain of re-indexing nodes down to one shared leaf (the slot's per-sample
    gradients, re-indexed, are the leaf's share: the same Gram), else None."""
    path: list[Node] = []
    n = top
    while n not in g.leaves:
        kids = [c for c, _ in n.next_functions if c is not None]
        if n.name() not in REINDEX or len(kids) != 1:
            return None
        path.append(n)
        n = kids[0]
    return (n, path) if n in shared else None
