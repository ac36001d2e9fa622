"""The plan of one :func:`impartial.backward` call: what each pass computes, read from the graph's structure.

Blocks come in *levels*: a top-level block (level 0) has no block above it; a block at level ``L`` receives the
resolved gradients of blocks at lower levels (``Block.above``).  The per-task pass runs the tasks of the blocks
(row ``r`` is task ``rows[r]``) down to every block, and also captures the *heads*: the leaves that a single task
reaches on a path through no block (its own parameters).  The final pass starts from the blocks and the losses
of tasks in no block (of every task when ``plain``: some task reaches a leaf beside every block) and the ``also``
terms, and captures every leaf that any of them reaches (``finals``).

Everything here depends on the structure alone (:attr:`Graph.key`), so the positions are kept per structure and
each call only places them on its own nodes.  How the per-task pass reaches each block without running the hooks
of its tensor is :mod:`._handles`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._handles import Handle, find, place, users_of
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
    #: positions of the head leaves (reached on paths through no block only), and the rows that reach each
    heads: tuple[int, ...]
    owner: tuple[tuple[int, ...], ...]
    #: some task reaches a leaf both on a path through no block and through a block: the final pass seeds every task
    #: loss again
    plain: bool
    #: tasks whose loss seeds the final pass
    seeded: tuple[int, ...]
    #: positions of the leaves the final pass captures
    finals: tuple[int, ...]
    #: every node the per-task pass runs is run by no other pass (disjoint heads, one level, not plain)
    disjoint: bool
    #: per block: how the per-task pass gets its rows without running its tensor's hooks (:mod:`._handles`)
    handles: tuple[Handle, ...]


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
    #: what the per-task pass captures for each block (its target, or the views of it the heads read) and, for
    #: views, the block's shape their gradients are reshaped to and summed (:mod:`._handles`)
    captures: list[list[Tensor | GradientEdge]]
    hops: list[tuple | None]
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
    placed = [place(g, b, h) for b, h in zip(blocks, layout.handles)]
    finals = [nodes[i] for i in layout.finals]
    heads = [nodes[i] for i in layout.heads]
    leaves = {id(t): t for t in [g.leaves[n] for n in finals + heads] + [b.leaf for b in blocks if b.leaf is not None]}
    return Plan(
        g,
        layout,
        blocks,
        levels,
        [b.leaf if b.leaf is not None else b.edge for b in blocks],
        [c for _, c, _ in placed],
        [h for _, _, h in placed],
        [slice(None) if len(b.tasks) == K else [pos[i] for i in b.tasks] for b in blocks],
        heads,
        finals,
        frozenset(a for b in blocks for a in b.above),
        [t for t, _, _ in placed if t is not None],
        list(leaves.values()),
    )


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
        raw = g.raw.get(n, 0)
        if raw and g.above.get(n, 0):  # a raw path past a block to a leaf that blocks reach too
            plain = True
        elif raw & in_block:  # a head: one task's own parameter, or a head shared by tasks (each row adds its part)
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
    finals = tuple(
        g.index[n] for n in g.nodes if n in g.leaves and g.mask(n) and (n not in head_set or g.mask(n) & seeds)
    )
    return Layout(
        tuple(level),
        T,
        tuple(g.index[n] for n in heads),
        tuple(tuple(pos[i] for i in _bits(g.raw[n] & in_block)) for n in heads),
        plain,
        seeded,
        finals,
        _disjoint(g, in_block, plain, level),
        _handles(g),
    )


def _handles(g: Graph) -> tuple[Handle, ...]:
    users = users_of(g) if any(b.leaf is None and b.tensor is None for b in g.blocks) else {}
    return tuple(None if b.leaf is not None or b.tensor is not None else find(g, b, users) for b in g.blocks)


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
