"""Walk the autograd graphs of several losses and mark every node with the set of losses that reach it.

The graph is read from ``grad_fn`` / ``next_functions``: a node is a ``torch.autograd.graph.Node`` (one
backward function), an *edge* ``(node, output_nr)`` is one output of the forward op, the place a gradient
arrives (``torch.autograd.graph.GradientEdge``).  Leaves that require grad appear as ``AccumulateGrad``
nodes (``node.variable`` is the tensor).  Masks are Python ints: bit ``i < k`` for task ``i``, bit ``k + j``
for the ``j``-th ``also`` term.  Tracing costs one Python visit per node and edge; it reads no tensor values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.autograd.graph import Node

from ._inputs import Losses, Params, _as_losses, _as_params, _Losses

__all__ = ["Graph", "trace"]


def _topological(starts: Iterable[Node], nexts: dict[Node, tuple] | None = None) -> list[Node]:
    """Nodes reachable from ``starts``, every node before the nodes its gradient flows into; ``nexts`` (if
    given) receives each node's ``next_functions`` (autograd builds that tuple anew on every read)."""
    post, seen = [], set()
    if nexts is None:
        nexts = {}

    def children(node: Node) -> list[Node]:
        nxt = nexts[node] = node.next_functions
        return [c for c, _ in nxt if c is not None]

    for s in starts:
        if s in seen:
            continue
        seen.add(s)
        stack = [(s, iter(children(s)))]
        while stack:  # iterative DFS: deep graphs (RNNs unrolled over 1000 steps) exceed Python's recursion
            node, it = stack[-1]
            for c in it:
                if c not in seen:
                    seen.add(c)
                    stack.append((c, iter(children(c))))
                    break
            else:
                stack.pop()
                post.append(node)
    post.reverse()
    return post


@dataclass(eq=False)
class Graph:
    """The traced autograd graph of ``k`` task losses and some ``also`` terms.

    ``nodes`` are in topological order (losses first); ``edge_masks[node][nr]`` is the mask of the losses
    whose gradient arrives at output ``nr`` of ``node``; ``leaves`` maps ``AccumulateGrad`` nodes to their
    tensors; ``shared`` holds the leaf nodes of the shared parameters; ``blocks`` the impartiality blocks
    (:func:`impartial.graph.find_blocks`).
    """

    k: int
    task_names: list[str]
    also_names: list[str]
    nodes: list[Node]
    edge_masks: dict[Node, dict[int, int]]
    leaves: dict[Node, Tensor]
    param_names: dict[Node, str]
    shared: set[Node] = field(default_factory=set)
    blocks: list[Any] = field(default_factory=list)
    #: ``(node, mask)`` for each loss's own node (where its gradient enters the graph)
    roots: list[tuple[Node, int]] = field(default_factory=list)
    #: raw task mask per node (tasks whose gradient reaches it on a path through no block)
    raw: dict[Node, int] = field(default_factory=dict)
    #: mask of the blocks above each node (bit j: ``blocks[j]``'s resolved gradient reaches it)
    above: dict[Node, int] = field(default_factory=dict)
    #: ``mask(node)``, computed once by the trace (every node's edges are complete when it is visited)
    masks: dict[Node, int] = field(default_factory=dict)
    #: the graph's structure as plain values (node types, edges and roots by position in ``nodes``, the
    #: positions of the shared leaves): equal keys mean isomorphic graphs with the same masks and shared
    #: parameters, so results that depend on nothing else can be reused (:func:`impartial.graph._blocks._find`)
    key: tuple = ()
    #: each node's position in ``nodes`` (the positions ``key`` and the caches keyed by it use)
    index: dict[Node, int] = field(default_factory=dict)

    @property
    def task_bits(self) -> int:
        return (1 << self.k) - 1

    def mask(self, node: Node) -> int:
        """Mask of all losses (tasks and ``also`` terms) whose gradient reaches ``node``."""
        m = self.masks.get(node)
        if m is not None:
            return m
        m = 0
        for v in self.edge_masks.get(node, {}).values():
            m |= v
        return m

    def tasks(self, node: Node) -> tuple[int, ...]:
        """Indices of the tasks whose gradient reaches ``node``."""
        return _bits(self.mask(node) & self.task_bits)

    def name(self, node: Node) -> str:
        """A readable name: the parameter's (with its shape) for a leaf, the ``grad_fn`` name otherwise."""
        if node in self.leaves:
            return f"{self.param_names.get(node, 'parameter')} {list(self.leaves[node].shape)}"
        return node.name()

    @property
    def edges(self) -> list[tuple[Node, Node, int]]:
        """``(consumer, producer, nr)``: ``consumer``'s gradient flows into output ``nr`` of ``producer``."""
        return [(n, c, nr) for n in self.nodes for c, nr in n.next_functions if c is not None]


def _bits(mask: int) -> tuple[int, ...]:
    if mask & (mask + 1) == 0:  # every task from 0 (every sample a task: hundreds of bits, one Python step each)
        return tuple(range(mask.bit_length()))
    return tuple(i for i, c in enumerate(reversed(bin(mask)[2:])) if c == "1")


def _two(mask: int) -> bool:
    """Whether ``mask`` has two or more bits set."""
    return mask & (mask - 1) != 0


def remember(cache: dict, key: Any, value: Any, size: int = 8) -> None:
    """Store ``value`` under ``key`` in a cache of at most ``size`` entries, dropping the oldest first."""
    if len(cache) >= size:
        cache.pop(next(iter(cache)), None)
    cache[key] = value


def _build(tasks: _Losses, extra: _Losses, params: list[tuple[str, Tensor]] | None, strict: bool = True) -> Graph:
    """The traced graph; ``strict=False`` ignores shared parameters that no task reaches (after a task was
    dropped) instead of raising."""
    edge_masks: dict[Node, dict[int, int]] = {}
    for (node, nr), m in tasks.roots + extra.roots:
        edge_masks.setdefault(node, {})
        edge_masks[node][nr] = edge_masks[node].get(nr, 0) | m
    nexts: dict[Node, tuple] = {}
    order = _topological(edge_masks, nexts)
    index = {n: i for i, n in enumerate(order)}
    masks, leaves, sig = _propagate(order, nexts, edge_masks, index)
    _no_reentrant(order)
    names: dict[Node, str] = {}
    g = Graph(
        len(tasks.outs),
        tasks.names,
        extra.names,
        order,
        edge_masks,
        leaves,
        names,
        roots=[(node, m) for (node, _), m in tasks.roots + extra.roots],
        masks=masks,
        index=index,
    )
    by_id = {id(t): n for n, t in leaves.items()}
    if params is None:  # infer: the leaves that two or more tasks reach
        g.shared = {n for n in leaves if _two(g.mask(n) & g.task_bits)}
    else:
        for name, p in params:
            found = by_id.get(id(p))
            if found is None or not g.mask(found) & g.task_bits:
                if not strict:
                    continue
                raise ValueError(f"shared_params: {name!r} is not reached by any task loss (nothing to share)")
            names[found] = name
            g.shared.add(found)
    g.key = (
        g.k,
        tuple((index[node], nr, m) for (node, nr), m in tasks.roots + extra.roots),
        tuple(sig),
        tuple(sorted(index[n] for n in g.shared)),
    )
    return g


def trace(losses: Losses, shared_params: Params = None, *, also: Sequence[Tensor] = ()) -> Graph:
    """Trace the autograd graph of ``losses`` (and ``also`` terms); its ``blocks`` are the automatic blocks.

    >>> import torch
    >>> x = torch.randn(4, 3)
    >>> lin = torch.nn.Linear(3, 2)
    >>> z = lin(x)
    >>> g = trace([z[:, 0].sum(), z[:, 1].pow(2).sum()])
    >>> [b.name for b in g.blocks]
    ['AddmmBackward0 [4, 2]']
    """
    from ._blocks import _find

    tasks = _as_losses(losses, "losses")
    extra = _as_losses(also, "also", offset=len(tasks.outs), allow_empty=True)
    g = _build(tasks, extra, _as_params(shared_params))
    _find(g, tasks)
    return g


def _propagate(
    order: list[Node], nexts: dict[Node, tuple], edge_masks: dict[Node, dict[int, int]], index: dict[Node, int]
) -> tuple[dict[Node, int], dict[Node, Tensor], list]:
    """Each node's task mask (pushed down ``edge_masks`` in topological order), the leaves, and the structure's
    signature."""
    leaves: dict[Node, Tensor] = {}
    masks: dict[Node, int] = {}
    # the structure, flat: each node's type, then (child position or -1, input nr) per edge; types are not
    # ints, so the sequence parses back into one graph only
    sig: list = []
    for node in order:
        m = 0
        for v in edge_masks.get(node, {}).values():
            m |= v
        masks[node] = m
        sig.append(type(node))
        for c, nr in nexts[node]:
            if c is not None:
                slot = edge_masks.setdefault(c, {})
                slot[nr] = slot.get(nr, 0) | m
                sig.append(index[c])
            else:
                sig.append(-1)
            sig.append(nr)
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            leaves[node] = var
    return masks, leaves, sig


def _no_reentrant(order: list[Node]) -> None:
    """Raise on a reentrant activation checkpoint: its backward runs inside autograd, out of our reach."""
    bad = next((n for n in order if type(n).__name__ == "CheckpointFunctionBackward"), None)
    if bad is not None:
        raise ValueError(
            "the graph holds a reentrant activation checkpoint (torch.utils.checkpoint with "
            "use_reentrant=True), which runs its own backward inside autograd and so cannot give "
            "per-task gradients; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
        )
