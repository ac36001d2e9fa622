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
from dataclasses import dataclass

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ._trace import Graph, Losses, Params, _bits, _Losses, trace

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
    try:  # private but stable since torch 2.0; the shape is only for display
        return tuple(node._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return ()


def _find(g: Graph, tasks: _Losses, explicit: Sequence[Tensor] | None = None) -> None:
    """Fill ``g.blocks`` and ``g.raw`` (automatic rule, or the user's ``explicit`` block tensors)."""
    marked: dict[tuple[Node, int], Tensor] = {}
    if explicit is not None:
        for i, t in enumerate(explicit):
            if not isinstance(t, Tensor) or not t.requires_grad:
                raise ValueError(f"block[{i}] must be a tensor that requires grad (an activation of the model)")
            e = get_gradient_edge(t)
            marked[(e.node, e.output_nr)] = t
    elif tasks.fused is not None and g.k > 1:
        raise ValueError(f"cannot find blocks automatically: {tasks.fused}; or mark the blocks (block=[z])")
    below_shared: dict[Node, bool] = {}
    for node in reversed(g.nodes):
        below_shared[node] = node in g.shared or any(
            below_shared.get(c, False) for c, _ in node.next_functions if c is not None)
    raw_edges: dict[Node, dict[int, int]] = {}
    for (node, nr), m in tasks.roots:
        raw_edges.setdefault(node, {})[nr] = raw_edges.get(node, {}).get(nr, 0) | m
    above_edges: dict[Node, dict[int, int]] = {}
    blocks: list[Block] = []
    for node in g.nodes:
        raw_in = above_in = 0
        for nr, mask in sorted(g.edge_masks.get(node, {}).items()):
            t = mask & g.task_bits
            raw = raw_edges.get(node, {}).get(nr, 0)
            above = above_edges.get(node, {}).get(nr, 0)
            if explicit is not None:
                hit = (node, nr) in marked
            else:
                hit = bin(t).count("1") >= 2 and raw != 0 and below_shared[node]
            if hit:
                if not t:
                    raise ValueError(f"block {g.name(node)} is reached by no task loss")
                leaf = g.leaves.get(node)
                shape = _shape(node, nr, leaf)
                name = g.name(node) if leaf is not None else f"{g.name(node)} {list(shape)}"
                blocks.append(Block(GradientEdge(node, nr), name, shape, _bits(t),
                                    _bits(above), leaf, marked.get((node, nr))))
                above |= 1 << (len(blocks) - 1)
                raw = 0
            raw_in |= raw
            above_in |= above
        g.raw[node] = raw_in
        g.above[node] = above_in
        for c, nr in node.next_functions:
            if c is not None:
                slot = raw_edges.setdefault(c, {})
                slot[nr] = slot.get(nr, 0) | raw_in
                slot = above_edges.setdefault(c, {})
                slot[nr] = slot.get(nr, 0) | above_in
    if explicit is not None:
        found = {(b.edge.node, b.edge.output_nr) for b in blocks}
        for i, key in enumerate(marked):
            if key not in found:
                raise ValueError(f"block[{i}] is not on the path of any loss")
    g.blocks = blocks


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

