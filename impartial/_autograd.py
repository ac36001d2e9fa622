"""Per-row gradients from autograd: one batched backward (``is_grads_batched``) or a loop of one backward per row.

- **batched**: one ``torch.autograd.grad(..., is_grads_batched=True)``.  Every node on the way runs once, on all
  rows; a node that only task ``i`` reaches still runs on every row (the others zero).
- **loop**: one ``torch.autograd.grad`` per row, each from its own loss, asking only for what that row needs.
  Every node runs once per task that reaches it: with disjoint heads the heads are traversed once in all, as in
  a plain backward.

The loop never does more arithmetic than the batched pass; the batched pass saves dispatch where the rows share
most of the graph (one op on ``k`` rows instead of ``k`` ops).  :func:`overlap` measures that from the graph.
Every call captures gradients (``autograd.grad``): nothing here touches ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._checks import Check, NonFinite, first_bad
from ._torch_compat import input_metadata, is_freed_graph
from .graph._trace import Graph, remember

__all__ = ["Log", "Rows", "rows", "checked", "zeros", "overlap", "BATCH_OVERLAP", "TASK_GRADS"]

T = TypeVar("T")


@dataclass
class Rows:
    """Per-row gradients of the inputs of one pass: ``dense[j]`` ``[n, ...]`` for each of the first inputs (zeros where
    a row does not reach it), ``sparse[j][r]`` for the others (None where row ``r`` does not reach or ask for it)."""

    dense: list[Tensor]
    sparse: list[list[Tensor | None]]


#: the batched pass is chosen when a loop would redo at least this fraction of its work (see :func:`overlap`)
BATCH_OVERLAP = 0.75
TASK_GRADS = ("auto", "batched", "loop")
#: tests and measurements force one pass everywhere ("batched" or "loop"; None: as chosen)
FORCE: str | None = None


class SparseGradient(ValueError):
    """A dense per-row input got a sparse gradient (``nn.Embedding(sparse=True)``); ``input`` is its index."""

    def __init__(self, index: int) -> None:
        super().__init__(f"input {index} has a sparse gradient")
        self.input = index


@dataclass
class Log:
    """What the passes of one call did, for the report."""

    #: the pass of each per-task computation, in order: "batched" or "loop"
    passes: list[str] = field(default_factory=list)
    #: why a batched pass was replaced by the loop (vmap could not run an op, or ``0 × inf``), else None
    fallback: str | None = None
    #: a batched pass freed what it ran (so it cannot be recomputed by the loop)
    freed: bool = False


#: graph structures (``(Graph.key, which pass)``) whose batched pass vmap is known to run: only those free the
#: graph in a batched pass (a vmap failure midway would leave the loop a half-freed graph).  The few most recent.
_VMAP_OK: dict[tuple, bool] = {}


def zeros(x: Tensor | GradientEdge, n: int) -> Tensor:
    """``[n, *shape]`` zeros for the gradient of ``x`` (a tensor, or an edge: from autograd's metadata)."""
    if isinstance(x, Tensor):
        return torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device)
    shape, dtype, device = input_metadata(x.node, x.output_nr)
    return torch.zeros((n, *shape), dtype=dtype, device=device)


def rows(
    log: Log,
    outputs: list,
    inputs: list,
    seeds: list[Tensor] | None,
    *,
    n: int,
    onehot: int,
    dense: int,
    needs: Sequence[Sequence[int]] | None,
    batched: bool,
    retain: bool = True,
    disjoint: bool = False,
    structure: tuple | None = None,
) -> Rows:
    """Per-row gradients of ``outputs`` seeded with row ``r`` of each seed (``[n, ...]``).

    The first ``onehot`` outputs are task losses seeded with the rows of the identity (row ``r`` seeds loss ``r``
    only; ``seeds=None`` when every output is one of them).  ``inputs[:dense]`` get ``[n, ...]`` tensors (zeros
    where unreached); the others, in the loop, only the rows in ``needs[r]`` ask for (a list per input).
    Batched: one vmapped backward, or the loop if vmap cannot run an op (``log.fallback`` says why).
    ``retain=False``: this is the last pass through what it runs, so it frees it: the loop frees on its last row, or
    on every row when the rows share no node (``disjoint``); a batched pass only where vmap ran this graph
    ``structure`` before (else it keeps the graph, for the loop to fall back on).
    """
    if batched:
        if seeds is None:
            seeds = onehot_seeds(outputs, n)
        free = not retain and structure is not None and structure in _VMAP_OK
        try:
            res = torch.autograd.grad(
                outputs, inputs, seeds, retain_graph=not free, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError as err:
            if is_freed_graph(err):
                raise
            # vmap could not run an op: the loop below computes the same rows (an error unrelated to vmap recurs
            # there and is raised from it)
            log.fallback = str(err).strip().splitlines()[0][:200]
        else:
            log.passes.append("batched")
            log.freed |= free
            if structure is not None:
                remember(_VMAP_OK, structure, True, 16)
            return Rows(
                [zeros(x, n) if r is None else r for x, r in zip(inputs[:dense], res[:dense])],
                [[None] * n if r is None else list(r.unbind(0)) for r in res[dense:]],
            )
    log.passes.append("loop")
    return _loop(outputs, inputs, seeds, n, onehot, dense, needs, retain, disjoint)


def onehot_seeds(outs: list[Tensor], n: int) -> list[Tensor]:
    """One-hot seeds of a batched per-task pass: loss ``r`` gets row ``r`` of the identity ``[n, n]``."""
    eye = torch.eye(n, dtype=outs[0].dtype, device=outs[0].device)
    return [eye[:, r].to(o.dtype) for r, o in enumerate(outs)]


def _loop(
    outputs: list,
    inputs: list,
    seeds: list[Tensor] | None,
    n: int,
    onehot: int,
    dense: int,
    needs: Sequence[Sequence[int]] | None,
    retain: bool,
    disjoint: bool,
) -> Rows:
    """One backward per row, from that row's own loss (no ``0 × inf`` from the others' zero seeds).

    A dense input's rows are copied into one ``[n, ...]`` tensor as they come: each row's own result is freed
    before the next row is computed, so its memory is reused (stacking them at the end would hold ``2n`` rows).
    """
    dense_out: list[Tensor | None] = [None] * dense
    reached = [[False] * n for _ in range(dense)]
    sparse: list[list[Tensor | None]] = [[None] * n for _ in range(len(inputs) - dense)]
    for r in range(n):
        keep = [c for c in range(len(outputs)) if c >= onehot or c == r]
        want = list(range(dense)) + list(range(dense, len(inputs)) if needs is None else needs[r])
        grads = None if seeds is None else [seeds[c][r] for c in keep]  # None: a lone loss, seeded with 1
        out = torch.autograd.grad(
            [outputs[c] for c in keep],
            [inputs[j] for j in want],
            grads,
            retain_graph=retain or (not disjoint and r < n - 1),
            allow_unused=True,
        )
        for j, o in zip(want, out):
            if j >= dense:
                sparse[j - dense][r] = o
            elif o is not None:
                if o.is_sparse:
                    raise SparseGradient(j)
                t = dense_out[j]
                if t is None:
                    t = dense_out[j] = torch.empty((n, *o.shape), dtype=o.dtype, device=o.device)
                t[r].copy_(o)
                reached[j][r] = True
        del out
    res: list[Tensor] = []
    for j, t in enumerate(dense_out):
        if t is None:
            res.append(zeros(inputs[j], n))
            continue
        for r in range(n):
            if not reached[j][r]:
                t[r].zero_()
        res.append(t)
    return Rows(res, sparse)


def checked(
    log: Log, compute: Callable[[bool], T], checks: Callable[[T], list[Check]], batched: bool, group: Any = None
) -> T:
    """Per-row gradients (``compute(batched)``), finite by ``checks`` or :class:`NonFinite` naming the loss.

    A batched backward multiplies the zero seeds of the other tasks by every local derivative: one infinite
    derivative on task i's path (``sqrt`` at 0) puts ``0 × inf = NaN`` in every row.  So a non-finite batch is
    recomputed row by row before anyone is blamed.
    """
    n = len(log.passes)
    res = compute(batched)
    bad = first_bad(checks(res), group)
    if bad is not None and "batched" in log.passes[n:] and log.freed:  # no graph left to recompute from
        raise NonFinite(
            f"{bad[0]} is not finite (in a batched backward, where another task's 0 × inf can also "
            "cause it: task_grads='loop' tells them apart); no gradient was written",
            bad[1],
        )
    if bad is not None and log.passes[n:] == ["batched"]:
        log.passes.pop()
        res = compute(False)
        log.fallback = "non-finite values in the batched backward (0 × inf); recomputed task by task"
        bad = first_bad(checks(res), group)
    if bad is not None:
        raise NonFinite(f"{bad[0]} is not finite; no gradient was written", bad[1])
    return res


#: the nodes :func:`overlap` weighs, by structure: ``(Graph.key, target positions, mask)`` →
#: ``[(position, t, ((child position, nr), ...))]``.  Plain values only; the few most recent are kept.
_RUNS: dict[tuple, list[tuple[int, int, tuple[tuple[int, int], ...]]]] = {}


def _runs(g: Graph, targets: list[Node] | None, mask: int) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """``(position, t, children)`` of each node that runs to bring the gradient of the tasks in ``mask`` to
    ``targets`` (every non-leaf node when None), ``t`` the number of those tasks that reach it."""
    index = g.index
    key = (g.key, None if targets is None else tuple(index[n] for n in targets), mask) if g.key else None
    found = _RUNS.get(key) if key is not None else None
    if found is not None:
        return found
    want = None if targets is None else set(targets)
    runs: set[Node] = set()
    if want is not None:
        for node in reversed(g.nodes):  # children first: a node runs if a target or a running node is below it
            if any(c is not None and (c in want or c in runs) for c, _ in node.next_functions):
                runs.add(node)
    out = []
    for i, node in enumerate(g.nodes):
        if node in g.leaves or (want is not None and node not in runs):
            continue
        t = bin(g.mask(node) & mask).count("1")
        if t:
            out.append((i, t, tuple((index[c], nr) for c, nr in node.next_functions if c is not None)))
    if key is not None:
        remember(_RUNS, key, out)
    return out


def _sizes(node: Node) -> list[int]:
    """The numel of each of ``node``'s inputs."""
    return [math.prod(input_metadata(node, nr)[0]) for nr in range(len(node._input_metadata))]  # type: ignore


def overlap(g: Graph, targets: list[Node] | None, mask: int) -> float:
    """How much of a batched pass a loop over the tasks in ``mask`` would redo, in ``[1/k, 1]``.

    Over the nodes that run to bring the gradient to ``targets``, each weighted by its backward work (roughly the
    gradient entries it reads plus those it writes; the shapes are read on every call), a loop runs node ``n``
    once per task that reaches it (``t_n`` times), a batched pass once on ``k`` rows.  Disjoint heads give
    ``1/k``; a graph that every task reaches everywhere gives 1.
    """
    k = bin(mask).count("1")
    sizes: dict[int, list[int]] = {}

    def size(i: int) -> list[int]:
        if i not in sizes:
            sizes[i] = _sizes(g.nodes[i])
        return sizes[i]

    loop = batch = 0
    for i, t, children in _runs(g, targets, mask):
        w = sum(size(i)) + sum(size(c)[nr] if nr < len(size(c)) else 0 for c, nr in children)
        loop += max(1, w) * t
        batch += max(1, w) * k
    return loop / batch if batch else 1.0


def choose(how: str, g: Graph, targets: list[Node] | None, mask: int, disjoint: bool = False) -> bool:
    """Batched (True) or loop (False) for the per-task pass of the tasks in ``mask`` above ``targets``
    (``disjoint``: known to share no node there).

    ``"auto"`` batches only where every node the pass runs is reached by two or more of the tasks (and a loop
    would redo most of the work).  A task's loss always has a node of its own, so a pass from the losses loops:
    a node one task alone reaches runs once, with that task's gradient, as in a plain backward, where under vmap
    its hooks and ``retain_grad`` would see batched tensors.
    """
    how = FORCE or how
    if how == "auto":
        if disjoint or any(t < 2 for _, t, _ in _runs(g, targets, mask)):
            return False
        return overlap(g, targets, mask) >= BATCH_OVERLAP
    return how == "batched"
