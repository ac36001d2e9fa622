"""Impartiality blocks: the graph edges where the gradient streams of two or more tasks meet.

The rule, applied top-down (from the losses towards the parameters).  Every edge carries the set of tasks
that reach it and the *raw* subset: tasks whose gradient arrives on a path through no block.  An edge is a
block when **two or more tasks reach it, at least one of them raw, and a shared parameter lies below it**.
Below a block the tasks it gathers are no longer raw: their gradient arrives already resolved.  So

- encoder → z → heads: the block is ``z``; the trunk below it is not a block;
- two latents each read by every head (HI-VAE's ``z`` and ``s``): two blocks; the encoder below both
  receives two resolved streams and is not a block;
- a loss joining lower down (heads 1, 2 on ``z = f(h)``, head 3 on ``h``): ``z`` is a block, and ``h`` is a
  block *below it*, where task 3's raw stream meets the resolved stream of tasks 1, 2 (``above = (0,)``).
  Its task gradients are the resolved ones of tasks 1 and 2 (pulled back from ``z``) and the raw one of 3.
- a parameter read directly by two heads is a block itself (a *leaf block*).
- ``also`` terms (a KL, a regulariser) are never tasks: they make no block and pass every block plainly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from .._torch_compat import input_metadata
from ._inputs import Losses, Params, _Losses
from ._trace import Graph, _bits, remember, trace

__all__ = ["Block", "find_blocks"]


@dataclass(frozen=True, eq=False)
class Block:
    """One impartiality block: an edge of the autograd graph (a node output) where task streams meet.

    ``tasks`` are task indices; ``above`` the indices of blocks whose resolved gradient flows into this one
    (empty for a top-level block); ``leaf`` the parameter when the block is a parameter itself; ``tensor``
    the activation when the user marked the block.
    """

    edge: GradientEdge
    name: str
    shape: tuple[int, ...]
    tasks: tuple[int, ...]
    above: tuple[int, ...] = ()
    leaf: Tensor | None = None
    tensor: Tensor | None = None

    def __repr__(self) -> str:
        above = f", below blocks {list(self.above)}" if self.above else ""
        return f"Block({self.name}, tasks={list(self.tasks)}{above})"


def _shape(node: Node, nr: int, leaf: Tensor | None) -> tuple[int, ...]:
    if leaf is not None:
        return tuple(leaf.shape)
    return tuple(input_metadata(node, nr)[0])


#: ops that take one tensor and return parts of it: a loss reached from a block through these alone is an
#: entry of the block tensor itself (``list(loss_vector)``), so its gradient there is one-hot
_SLICES = frozenset(
    {
        "UnbindBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "IndexBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnsafeSplitBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "AsStridedBackward0",
        "NarrowBackward0",
    }
)


def _check_not_entries(blocks: list[Block], tasks: _Losses, g: Graph) -> None:
    """Raise where an automatic block is the tensor whose entries are the task losses: each task's gradient
    there is one-hot, so a solver sees orthogonal unit rows and the call silently equals the plain sum."""
    for b in blocks:
        if b.leaf is not None:
            continue
        entries = 0
        for (node, _), mask in tasks.roots:
            while node is not b.edge.node and node.name() in _SLICES:
                nxt = [c for c, _ in node.next_functions if c is not None]
                if len(nxt) != 1:
                    break
                node = nxt[0]
            if node is b.edge.node:
                entries |= mask
        if all(entries >> i & 1 for i in b.tasks):
            names = ", ".join(repr(tasks.names[i]) for i in b.tasks)
            raise ValueError(
                f"the losses {names} are entries of one tensor ({b.name}), so the only place their "
                "gradients meet is that tensor, where each is one-hot: there is nothing to resolve. "
                "Compute each task's loss from the model separately, or mark the blocks (block=[h], "
                "h an activation the heads share), or use block='params'"
            )


def _renamed(g: Graph, blocks: list[Block]) -> list[Block]:
    """The blocks with distinct readable names: ``grad_fn`` and shape (a parameter's name for a leaf block),
    ``#n`` (top-down) where equal."""
    names = [g.name(b.edge.node) if b.leaf is not None else f"{g.name(b.edge.node)} {list(b.shape)}" for b in blocks]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    count: dict[str, int] = {}
    out = []
    for n in names:
        if seen[n] > 1:
            count[n] = count.get(n, 0) + 1
            n = f"{n} #{count[n]}"
        out.append(n)
    return [replace(b, name=n) for b, n in zip(blocks, out)]


#: automatic blocks by graph structure: ``Graph.key`` → (blocks as ``(position, nr, tasks, above)``, ``raw`` and
#: ``above`` per position).  Plain values only: no node or tensor outlives its call.  A training loop builds
#: the same graph every step; the few most recent structures are kept.
_FOUND: dict[tuple, tuple[list[tuple[int, int, tuple[int, ...], tuple[int, ...]]], list[int], list[int]]] = {}
_FOUND_SIZE = 8


def _find(g: Graph, tasks: _Losses, explicit: Sequence[Tensor] | None = None) -> None:
    """Fill ``g.blocks``, ``g.raw`` and ``g.above`` (automatic rule, or the user's ``explicit`` block tensors).

    The automatic rule reads only the structure, the masks and the shared leaves, which ``g.key`` holds:
    a graph with a key seen before gets the blocks found then, placed on its own nodes.
    """
    cache = explicit is None and tasks.fused is None and bool(g.key)
    if cache:
        found = _FOUND.get(g.key)
        if found is not None:
            _place(g, *found)
            return
    if explicit is None and tasks.fused is not None and g.k > 1:
        raise ValueError(f"cannot find blocks automatically: {tasks.fused}; or mark the blocks (block=[z])")
    marked = None if explicit is None else _marked(explicit)
    blocks = _walk(g, tasks, marked)
    if marked is not None:
        found_edges = {(b.edge.node, b.edge.output_nr) for b in blocks}
        for i, key in enumerate(marked):
            if key not in found_edges:
                raise ValueError(f"block[{i}] is not on the path of any loss")
    g.blocks = _renamed(g, blocks)
    if explicit is None and g.k > 1:
        _check_not_entries(g.blocks, tasks, g)
    if cache:
        remember(
            _FOUND,
            g.key,
            (
                [(g.index[b.edge.node], b.edge.output_nr, b.tasks, b.above) for b in blocks],
                [g.raw[n] for n in g.nodes],
                [g.above[n] for n in g.nodes],
            ),
            _FOUND_SIZE,
        )


def _marked(explicit: Sequence[Tensor]) -> dict[tuple[Node, int], Tensor]:
    """The user's block tensors by edge."""
    marked: dict[tuple[Node, int], Tensor] = {}
    for i, t in enumerate(explicit):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise ValueError(f"block[{i}] must be a tensor that requires grad (an activation of the model)")
        e = get_gradient_edge(t)
        marked[(e.node, e.output_nr)] = t
    return marked


def _below_shared(g: Graph, next_of: list[tuple[Node, tuple]]) -> set[Node]:
    """The nodes with a shared parameter at or below them."""
    out: set[Node] = set()
    for node, nxt in reversed(next_of):  # children first
        if node in g.shared or any(c is not None and c in out for c, _ in nxt):
            out.add(node)
    return out


def _walk(g: Graph, tasks: _Losses, marked: dict[tuple[Node, int], Tensor] | None) -> list[Block]:
    """One top-down walk: each edge's raw and above masks, and the blocks (marked, or by the automatic rule)."""
    next_of = [(n, n.next_functions) for n in g.nodes]
    below_shared = _below_shared(g, next_of) if marked is None else set()
    raw_edges: dict[Node, dict[int, int]] = {}
    for (node, nr), m in tasks.roots:
        raw_edges.setdefault(node, {})[nr] = raw_edges.get(node, {}).get(nr, 0) | m
    above_edges: dict[Node, dict[int, int]] = {}
    blocks: list[Block] = []
    none: dict[int, int] = {}
    task_bits, edge_masks = g.task_bits, g.edge_masks
    for node, nxt in next_of:
        raw_in = above_in = 0
        raws, aboves, items = raw_edges.get(node, none), above_edges.get(node, none), edge_masks.get(node, none)
        for nr, mask in sorted(items.items()) if len(items) > 1 else items.items():
            t, raw, above = mask & task_bits, raws.get(nr, 0), aboves.get(nr, 0)
            if marked is not None:
                hit = (node, nr) in marked
            else:
                hit = raw != 0 and t & (t - 1) != 0 and node in below_shared  # two or more tasks, one raw
            if hit:
                if not t:
                    raise ValueError(f"block {g.name(node)} is reached by no task loss")
                leaf = g.leaves.get(node)
                blocks.append(
                    Block(
                        GradientEdge(node, nr),
                        "",
                        _shape(node, nr, leaf),
                        _bits(t),
                        _bits(above),
                        leaf,
                        None if marked is None else marked.get((node, nr)),
                    )
                )
                above |= 1 << (len(blocks) - 1)
                raw = 0
            raw_in |= raw
            above_in |= above
        g.raw[node], g.above[node] = raw_in, above_in
        for c, nr in nxt if raw_in or above_in else ():  # zero masks need no entry (absent reads as 0)
            if c is not None:
                for mask_in, edges in ((raw_in, raw_edges), (above_in, above_edges)):
                    if mask_in:
                        slot = edges.setdefault(c, {})
                        slot[nr] = slot.get(nr, 0) | mask_in
    return blocks


def _place(
    g: Graph, blocks: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]], raw: list[int], above: list[int]
) -> None:
    """Blocks and masks found on a graph of the same structure, on ``g``'s nodes."""
    nodes = g.nodes
    g.raw = dict(zip(nodes, raw))
    g.above = dict(zip(nodes, above))
    g.blocks = []
    for i, nr, t, a in blocks:
        node = nodes[i]
        leaf = g.leaves.get(node)
        g.blocks.append(Block(GradientEdge(node, nr), "", _shape(node, nr, leaf), t, a, leaf))
    g.blocks = _renamed(g, g.blocks)


def find_blocks(losses: Losses, shared_params: Params = None, *, also: Sequence[Tensor] = ()) -> list[Block]:
    """The impartiality blocks of ``losses`` above ``shared_params`` (inferred when None), top-down.

    >>> import torch
    >>> x = torch.randn(8, 3)
    >>> enc = torch.nn.Linear(3, 4)
    >>> z = enc(x).tanh()
    >>> find_blocks([z.sum(), z.pow(2).mean()], enc.parameters())
    [Block(TanhBackward0 [8, 4], tasks=[0, 1])]
    """
    return trace(losses, shared_params, also=also).blocks
