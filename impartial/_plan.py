"""The plan of one :func:`impartial.backward` call: what each pass computes, read from the graph's structure.

Blocks come in *levels*: a top-level block (level 0) has no block above it; a block at level ``L`` receives the
resolved gradients of blocks at lower levels (``Block.above``).  The per-task pass runs the tasks of the blocks
(row ``r`` is task ``rows[r]``) down to every block, and also captures the *heads*: the leaves that a single task
reaches on a path through no block (its own parameters).  The final pass starts from the blocks and the losses
of tasks in no block (of every task when ``plain``: some task reaches a leaf beside every block) and the ``also``
terms, and captures every leaf that any of them reaches (``finals``).

Everything here depends on the structure alone (:attr:`Graph.key`), so the positions are kept per structure and
each call only places them on its own nodes.  Block tensors whose hooks must stay quiet while per-task gradients
are computed (:attr:`Plan.quiet`) are the marked ones, and, at automatic blocks, the block's tensor where a
consumer saved it for backward (a Linear, a matmul, a convolution reading it): torch gives no other handle on the
tensor of a graph edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._torch_compat import saved_tensors
from .graph._blocks import Block
from .graph._trace import Graph, _bits, remember

__all__ = ["Layout", "Plan", "plan"]


@dataclass(frozen=True)
class Layout:
    """The structural part of a plan, as positions in ``Graph.nodes`` (plain values: nothing outlives a call)."""

    #: level of each block (0: top)
    level: tuple[int, ...]
    #: the task of each row of the per-task pass
    rows: tuple[int, ...]
    #: positions of the head leaves, and the row that owns each
    heads: tuple[int, ...]
    owner: tuple[int, ...]
    #: some task reaches a leaf on a path through no block: the final pass seeds every task loss again
    plain: bool
    #: tasks whose loss seeds the final pass
    seeded: tuple[int, ...]
    #: positions of the leaves the final pass captures
    finals: tuple[int, ...]
    #: every node the per-task pass runs is run by no other pass (disjoint heads, one level, not plain)
    disjoint: bool
    #: per block: (position of a consumer that saved the block's tensor, its saved-tensor attribute), or None
    found: tuple[tuple[int, str] | None, ...]


@dataclass(frozen=True)
class Plan:
    """A :class:`Layout` placed on one call's graph."""

    g: Graph
    layout: Layout
    blocks: list[Block]
    #: the indices of the blocks at each level
    levels: list[list[int]]
    #: what the per-task pass captures for each block: its parameter (leaf block) or its edge
    targets: list[Tensor | GradientEdge]
    #: each block's rows among the per-task rows: a slice (no copy) when it has every task
    sel: list[slice | list[int]]
    heads: list[Node]
    finals: list[Node]
    #: the blocks some block below receives resolved gradients from (their resolved rows are needed)
    has_below: frozenset[int]
    #: block tensors (marked, or found saved by a consumer): their hooks stay quiet in the per-task pass and the
    #: pull, and fire in the final pass
    block_tensors: list[Tensor]
    #: the leaves any pass captures: their hooks stay quiet in every pass and fire when ``.grad`` is written
    leaf_tensors: list[Tensor]

    @property
    def quiet(self) -> list[Tensor]:
        """What stays quiet in the per-task pass and the pull."""
        return self.block_tensors + self.leaf_tensors

    @property
    def K(self) -> int:
        return len(self.layout.rows)


_LAYOUTS: dict[tuple, Layout] = {}


def plan(g: Graph, marked: bool) -> Plan:
    """The plan of a graph whose blocks are found (``g.blocks``); ``marked``: the blocks were given by the user."""
    key = (g.key, marked, tuple((g.index[b.edge.node], b.edge.output_nr) for b in g.blocks)) if g.key else None
    layout = _LAYOUTS.get(key) if key is not None else None
    if layout is None:
        layout = _layout(g)
        if key is not None:
            remember(_LAYOUTS, key, layout)
    blocks, nodes = g.blocks, g.nodes
    levels = [[j for j, lv in enumerate(layout.level) if lv == L] for L in range(max(layout.level, default=-1) + 1)]
    pos = {t: r for r, t in enumerate(layout.rows)}
    K = len(layout.rows)
    tensors = [t for t in (b.tensor if b.tensor is not None else _located(g, b, f)
                           for b, f in zip(blocks, layout.found)) if t is not None]
    finals = [nodes[i] for i in layout.finals]
    heads = [nodes[i] for i in layout.heads]
    leaves = {id(t): t for t in [g.leaves[n] for n in finals + heads] + [b.leaf for b in blocks if b.leaf is not None]}
    return Plan(g, layout, blocks, levels, [b.leaf if b.leaf is not None else b.edge for b in blocks],
                [slice(None) if len(b.tasks) == K else [pos[i] for i in b.tasks] for b in blocks],
                heads, finals, frozenset(a for b in blocks for a in b.above), tensors, list(leaves.values()))


def _located(g: Graph, b: Block, found: tuple[int, str] | None) -> Tensor | None:
    """The tensor at automatic block ``b``, where the layout found a consumer that saved it."""
    if found is None:
        return None
    consumer, attr = g.nodes[found[0]], found[1]
    for _, t in saved_tensors(consumer, only=attr):
        if t.grad_fn is b.edge.node and t.output_nr == b.edge.output_nr:
            return t
    return None


def _find_saved(g: Graph, b: Block) -> tuple[int, str] | None:
    """A consumer of block ``b``'s edge that saved the block's tensor, and the attribute it is saved under."""
    if b.leaf is not None:
        return None
    edge = (b.edge.node, b.edge.output_nr)
    for i, node in enumerate(g.nodes):
        if edge not in node.next_functions:
            continue
        for attr, t in saved_tensors(node):
            if t.grad_fn is edge[0] and t.output_nr == edge[1]:
                return i, attr
    return None


def _layout(g: Graph) -> Layout:
    """The layout of a graph with its blocks found."""
    blocks = g.blocks
    leaf_blocks = {b.edge.node for b in blocks if b.leaf is not None}
    in_block = 0
    for b in blocks:
        for i in b.tasks:
            in_block |= 1 << i
    heads: list[Node] = []
    plain = False
    for n in g.nodes:
        if n not in g.leaves or n in leaf_blocks:
            continue
        t, raw = g.mask(n) & g.task_bits, g.raw.get(n, 0)
        if raw and (g.above.get(n, 0) or t & (t - 1)):  # a raw path past or beside a block
            plain = True
        elif raw and t & in_block:
            heads.append(n)
    if plain:
        heads = []
    T = _bits(in_block)
    pos = {i: r for r, i in enumerate(T)}
    level: list[int] = []
    for b in blocks:
        level.append(1 + max((level[a] for a in b.above), default=-1))
    seeded = tuple(range(g.k)) if plain else tuple(i for i in range(g.k) if not in_block >> i & 1)
    seeds = ((1 << g.k) - 1) if plain else sum(1 << i for i in seeded)
    seeds |= ~g.task_bits  # the also terms
    head_set = set(heads)
    finals = tuple(g.index[n] for n in g.nodes if n in g.leaves and g.mask(n) and (
        n not in head_set or g.mask(n) & seeds))
    return Layout(tuple(level), T, tuple(g.index[n] for n in heads),
                  tuple(pos[_bits(g.mask(n) & g.task_bits)[0]] for n in heads), plain, seeded, finals,
                  _disjoint(g, in_block, plain, level), tuple(_find_saved(g, b) for b in blocks))


def _disjoint(g: Graph, in_block: int, plain: bool, level: list[int]) -> bool:
    """Whether every node the per-task pass runs is run by it once and by no later pass: then that pass may free
    what it runs, as a plain backward frees each node after running it."""
    if plain or any(level):
        return False
    for n in g.nodes:
        if n in g.leaves or not g.raw.get(n, 0) & in_block:
            continue
        m = g.mask(n)
        if m & (m - 1):  # two losses (tasks or also terms) reach it
            return False
    return True
