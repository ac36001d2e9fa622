"""How the per-task pass gets a block's task gradients without running the hooks of the block's tensor.

Torch runs a tensor's hooks whenever a gradient for it is computed, also when ``autograd.grad`` captures it, and
gives no handle from a graph edge back to its tensor.  The per-task pass computes ``k`` gradients at each block that
are not the one the tensor receives (the final pass computes that one), so for each block one of:

- **the tensor**: a marked block's, or, at an automatic block, the tensor a node saved for its backward (a Linear,
  a matmul, a convolution reading it, possibly through a view): its hooks are silenced during the per-task pass
  (:func:`impartial._torch_compat.quiet`);
- **its views**: where every task reaches the block only through reshapes or copies of it (a Linear on a
  ``[B, T, F]`` latent flattens it first), the per-task pass and the pull capture the gradients of those instead,
  and reshape them back: the block's own node never receives them.  Unless another block lies below it: the
  per-task pass then runs the block's node to reach that one, and its hooks with it;
- **neither** (heads that read it only through ops that save nothing, such as ``relu`` or ``cat``): the per-task
  pass captures at the block, and the tensor's hooks, if it has any, run for each task's gradient too.

A pull from a block to the blocks below it starts at the block's edge, which runs its node and so its tensor's
hooks, unless they are silenced (the tensor is known) or the node is itself a reshape (a Linear's ``[B, T, F]``
output is a view of its flat result): then the pull starts below it, with the seed reshaped (:func:`root`).

Every choice depends on the structure alone and is kept with the plan's layout.
"""

from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._torch_compat import input_metadata, saved_tensors
from .graph._blocks import Block
from .graph._trace import Graph

__all__ = ["Handle", "find", "place", "root", "users_of"]

#: ("saved", node position, attribute) | ("views", consumer positions) | None
Handle = tuple[str, int, str] | tuple[str, tuple[int, ...]] | None

#: ops that pass a tensor on as a view of itself: a node below one may have saved the view, whose base is the tensor
_VIEWS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "ExpandBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "SelectBackward0",
        "SliceBackward0",
    }
)
#: ops whose vector-Jacobian product is a reshape of the gradient back to the input's shape (a copy's is the gradient
#: itself: ``matmul`` copies a ``[B, T, F]`` input before flattening it)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0"})


def _match(t: Tensor, b: Block) -> Tensor | None:
    """``t`` if it is the tensor at block ``b``'s edge, its base if it is a view of that tensor, else None."""
    for cand in (t, t._base):
        if cand is not None and cand.grad_fn is b.edge.node and cand.output_nr == b.edge.output_nr:
            return cand
    return None


def find(g: Graph, b: Block, users: dict[Node, list[int]]) -> Handle:
    """The handle of automatic activation block ``b`` (``users``: the positions of each node's consumers)."""
    edge = (b.edge.node, b.edge.output_nr)
    direct = [i for i in users.get(b.edge.node, []) if edge in g.nodes[i].next_functions]
    todo, seen = list(direct), set()
    while todo:  # a node that saved the tensor: a consumer, or one reading it through view ops
        i = todo.pop(0)
        if i in seen:
            continue
        seen.add(i)
        node = g.nodes[i]
        for attr, t in saved_tensors(node):
            if _match(t, b) is not None:
                return ("saved", i, attr)
        if node.name() in _VIEWS:
            todo += users.get(node, [])
    reached = [i for i in direct if g.mask(g.nodes[i]) & g.task_bits]
    if reached and all(g.nodes[i].name() in _RESHAPES and len(g.nodes[i].next_functions) == 1 for i in reached):
        return ("views", tuple(reached))
    return None


def root(b: Block, seed: Tensor, rows: int) -> tuple[GradientEdge, Tensor]:
    """Where a pull from block ``b`` seeded with ``seed`` (``[rows, *shape]``) starts: below the block's node when it is
    a reshape (its vector-Jacobian product is reshaping the seed back), else at the block's edge."""
    node = b.edge.node
    nxt = [(c, nr) for c, nr in node.next_functions if c is not None]
    if b.leaf is None and node.name() in _RESHAPES and len(nxt) == 1 and len(node.next_functions) == 1:
        ((c, nr),) = nxt
        return GradientEdge(c, nr), seed.reshape(rows, *input_metadata(c, nr)[0])
    return b.edge, seed


def users_of(g: Graph) -> dict[Node, list[int]]:
    """Each node's consumers, by position."""
    users: dict[Node, list[int]] = {}
    for i, node in enumerate(g.nodes):
        for c, _ in node.next_functions:
            if c is not None:
                users.setdefault(c, []).append(i)
    return users


def place(g: Graph, b: Block, handle: Handle) -> tuple[Tensor | None, list[Tensor | GradientEdge], tuple | None]:
    """On this call's graph: the block's tensor (None where unknown), what the per-task pass captures for it, and
    the shape the captured view gradients are reshaped to and summed (None: the capture is the block's own)."""
    own: list[Tensor | GradientEdge] = [b.leaf if b.leaf is not None else b.edge]
    if b.tensor is not None or handle is None:
        return b.tensor, own, None
    if handle[0] == "saved":
        _, pos, attr = handle  # type: ignore[misc]
        for _, t in saved_tensors(g.nodes[pos], only=attr):
            hit = _match(t, b)
            if hit is not None:
                return hit, own, None
        return None, own, None
    shape = tuple(input_metadata(b.edge.node, b.edge.output_nr)[0])
    return None, [GradientEdge(g.nodes[i], 0) for i in handle[1]], shape  # type: ignore[union-attr]
