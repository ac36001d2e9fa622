"""The autograd plumbing of :func:`impartial.backward`: per-task gradients, checks, deferred writes.

Per-task gradients come from one of two passes, chosen by the structure of the graph above the blocks
(:func:`_overlap`):

- **batched**: one ``torch.autograd.grad(..., is_grads_batched=True)`` with the rows of the identity as
  seeds.  Every node above the block runs once, on ``k`` rows; a node that only task ``i`` reaches still runs
  on all ``k`` rows (``k − 1`` of them zero).
- **loop**: one ``torch.autograd.grad`` per task, each from its own loss, asking only for the block and that
  task's own parameters.  Every node runs once per task that reaches it: with disjoint heads, the heads are
  traversed once in all, as in a plain backward.

The loop never does more arithmetic than the batched pass; the batched pass saves dispatch overhead where the
tasks share most of the graph above the block (one op on ``k`` rows instead of ``k`` ops).

Every gradient is collected; ``.grad`` is written once, at the end, so that an error anywhere (a freed graph,
a non-finite task gradient) leaves every ``.grad`` untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from . import _distributed as _dist
from .graph._trace import Graph, _Losses, remember

#: one input's per-task gradients: ``[rows, ...]`` (batched pass, or dense inputs of the loop), or one entry
#: per row (the loop's task-own inputs; None where the row does not reach or need the input)
Rows = Union[Tensor, list[Optional[Tensor]], None]
#: ``(names, values)``: one ``(message, task index)`` per row (None: not checked) and the rows (a tensor
#: ``[rows, ...]`` or a list of tensors / None), finiteness flags already computed (a bool tensor ``[rows]``),
#: or a tuple of tensors checked as one row (then the message is a list, one per tensor)
Named = list[tuple[list, Union[Tensor, list[Optional[Tensor]], tuple[Tensor, ...]]]]


class NonFinite(FloatingPointError):
    """A task's gradient is not finite; ``task`` is its index."""

    def __init__(self, message: str, task: int) -> None:
        super().__init__(message)
        self.task = task

#: the batched pass is chosen when a loop would redo at least this fraction of its work (see ``_overlap``)
BATCH_OVERLAP = 0.75
TASK_GRADS = ("auto", "batched", "loop")


def _flags(t: Tensor | list[Tensor | None]) -> Tensor:
    """``[rows]`` finiteness flags, cheaply: a row's sum is finite iff its entries are (NaN and ±inf propagate),
    up to overflow of the sum, which :func:`_exact_flags` rules out before anything is reported."""
    if isinstance(t, list):
        dev = next((r.device for r in t if r is not None), torch.device("cpu"))
        return torch.stack([torch.ones((), dtype=torch.bool, device=dev) if r is None else r.sum().isfinite()
                            for r in t])
    if isinstance(t, tuple):  # (rows): one flag for all of them, from one fused call (the common case)
        norms = torch._foreach_norm(list(t))
        return torch.stack(norms).sum().isfinite().reshape(1)
    if t.dtype == torch.bool:
        return t
    if t.ndim == 0 or t[0].numel() == 0:
        return torch.ones(t.shape[:1], dtype=torch.bool, device=t.device)
    return t.reshape(t.shape[0], -1).sum(1).isfinite()


def _exact_bad(t: Tensor | list[Tensor | None] | tuple[Tensor, ...], row: int) -> int | None:
    """None if row ``row`` is finite, element by element (the error path only); else the index of the first
    non-finite tensor of a group (0 for a row)."""
    if isinstance(t, tuple):
        return next((m for m, r in enumerate(t) if not bool(r.isfinite().all())), None)
    r = t[row]
    return None if r is None or bool(r.isfinite().all()) else 0


def _zeros(x: Tensor | GradientEdge, rows: int) -> Tensor:
    """``[rows, *shape]`` zeros for the gradient of ``x`` (a tensor, or an edge: from autograd's metadata)."""
    if isinstance(x, Tensor):
        return torch.zeros((rows, *x.shape), dtype=x.dtype, device=x.device)
    m = x.node._input_metadata[x.output_nr]  # private but stable since torch 2.0
    return torch.zeros((rows, *m.shape), dtype=m.dtype, device=m.device)


def _sizes(node: Node) -> list[int] | None:
    """The numel of each of ``node``'s inputs (None where autograd's metadata cannot be read)."""
    try:  # private but stable since torch 2.0; only a cost estimate
        return [math.prod(m.shape) for m in node._input_metadata]
    except (AttributeError, RuntimeError, TypeError):
        return None


#: the nodes :func:`_overlap` weighs, by structure: ``(Graph.key, target positions, mask)`` →
#: ``[(position, t, ((child position, nr), ...))]``.  Plain values only; the few most recent are kept.
_PLANS: dict[tuple, list[tuple[int, int, tuple[tuple[int, int], ...]]]] = {}
_PLANS_SIZE = 8


def _plan(g: Graph, targets: list[Node] | None, mask: int) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """``(position, t, children)`` of each node that runs to bring the gradient of the tasks in ``mask`` to
    ``targets`` (every non-leaf node when None), ``t`` the number of those tasks that reach it; children are
    ``(position, nr)``.  Read from the structure alone, so kept per ``g.key``."""
    index = g.index
    key = (g.key, None if targets is None else tuple(index[n] for n in targets), mask) if g.key else None
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan
    want = None if targets is None else set(targets)
    runs: set[Node] = set()
    if want is not None:
        for n in reversed(g.nodes):  # children first: a node runs if a target or a running node is below it
            for c, _ in n.next_functions:
                if c is not None and (c in want or c in runs):
                    runs.add(n)
                    break
    plan = []
    for i, n in enumerate(g.nodes):
        if n in g.leaves or (want is not None and n not in runs):
            continue
        t = bin(g.mask(n) & mask).count("1")
        if t:
            plan.append((i, t, tuple((index[c], nr) for c, nr in n.next_functions if c is not None)))
    if key is not None:
        remember(_PLANS, key, plan, _PLANS_SIZE)
    return plan


def _overlap(g: Graph, targets: list[Node] | None, mask: int) -> float:
    """How much of a batched pass a loop over the tasks in ``mask`` would redo, in ``[1/k, 1]``.

    Over the nodes that run to bring the gradient to ``targets`` (:func:`_plan`), each weighted by its backward
    work, roughly: the gradient entries it reads plus those it writes (at least 1; the shapes are read on
    every call).  A loop runs node ``n`` once per task that reaches it (``t_n`` times), a batched pass once on
    ``k`` rows.  Disjoint heads give ``1/k``; a graph that every task reaches everywhere gives 1.
    """
    k = bin(mask).count("1")
    nodes = g.nodes
    sizes: dict[int, list[int] | None] = {}  # each node's metadata read once

    def size(i: int) -> list[int] | None:
        s = sizes.get(i, 0)
        if s == 0:
            s = sizes[i] = _sizes(nodes[i])
        return s

    loop = batch = 0
    for i, t, children in _plan(g, targets, mask):
        own = size(i)
        w = 1 if own is None else sum(own)
        for c, nr in children:
            s = size(c)
            w += 1 if s is None else (s[nr] if nr < len(s) else 0)
        w = max(1, w)
        loop += w * t
        batch += w * k
    return loop / batch if batch else 1.0


@dataclass
class _Engine:
    g: Graph
    tasks: _Losses
    extra: _Losses
    retain_graph: bool
    #: "auto" (by structure), "batched" or "loop"
    task_grads: str = "auto"
    #: why a batched pass was replaced by the loop (vmap could not run an op, or 0 × inf), else None
    fallback: str | None = None
    #: the pass used at each block (or for ``block="params"``): "batched" or "loop"
    passes: list[str] = field(default_factory=list)
    #: class-level override of ``task_grads`` for tests and measurements (None: use the argument)
    force: ClassVar[str | None] = None
    #: gradient contributions per leaf node, written to ``.grad`` at the end
    grads: dict[Node, list[Tensor]] = field(default_factory=dict)
    #: the torch.distributed process group to reduce over (None: one process; see :mod:`._distributed`)
    group: Any = None

    def choose(self, targets: list[Node] | None, mask: int, disjoint: bool = False) -> bool:
        """Batched (True) or loop (False) for the per-task pass of the tasks in ``mask`` above ``targets``
        (None: the whole graph; ``disjoint``: known to share no node there)."""
        how = self.force or self.task_grads
        if how == "auto":
            return not disjoint and _overlap(self.g, targets, mask) >= BATCH_OVERLAP
        return how == "batched"

    def grad(self, outputs: list, inputs: list, seeds: list[Tensor], *, retain: bool = True) -> list[Tensor | None]:
        """Plain ``autograd.grad`` (the final pass, ``also`` terms); a freed graph gets a named error."""
        try:
            return list(torch.autograd.grad(outputs, inputs, seeds, retain_graph=retain, allow_unused=True))
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                self.freed(err)
            raise

    def task_rows(self, outputs: list, inputs: list, seeds: list[Tensor], *, rows: int, onehot: int, dense: int,
                  needs: Sequence[Sequence[int]] | None, batched: bool) -> list[Rows]:
        """Per-row gradients of ``outputs`` seeded with row ``r`` of each seed.

        The first ``onehot`` outputs are task losses seeded with the rows of the identity (row ``r`` seeds loss
        ``r`` only).  ``inputs[:dense]`` get ``[rows, ...]`` tensors (zeros where unreached); the others, in the
        loop, only the rows in ``needs[r]`` ask for (a list per input).  Batched: one vmapped backward, or the
        loop if vmap cannot run an op (``fallback`` says why).
        """
        if batched:
            try:
                res = list(torch.autograd.grad(outputs, inputs, seeds, retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
            except RuntimeError as err:
                if "second time" in str(err) or "freed" in str(err):
                    self.freed(err)
                self.fallback = str(err).strip().splitlines()[0][:200]
            else:
                for j in range(dense):
                    if res[j] is None:
                        res[j] = _zeros(inputs[j], rows)
                self.passes.append("batched")
                return res
        self.passes.append("loop")
        return self.loop(outputs, inputs, seeds, rows, onehot, dense, needs)

    def loop(self, outputs: list, inputs: list, seeds: list[Tensor], rows: int, onehot: int, dense: int,
             needs: Sequence[Sequence[int]] | None) -> list[Rows]:
        """One backward per row, from that row's own loss (no ``0 × inf`` from the others' zero seeds)."""
        per: list[list[Tensor | None]] = [[None] * rows for _ in inputs]
        for r in range(rows):
            keep = [c for c in range(len(outputs)) if c >= onehot or c == r]
            want = list(range(dense)) + [j for j in (range(dense, len(inputs)) if needs is None else needs[r])]
            try:
                out = torch.autograd.grad([outputs[c] for c in keep], [inputs[j] for j in want],
                                          [seeds[c][r] for c in keep], retain_graph=True, allow_unused=True)
            except RuntimeError as err:
                if "second time" in str(err) or "freed" in str(err):
                    self.freed(err)
                raise
            for j, o in zip(want, out):
                per[j][r] = o
        res: list[Rows] = []
        for j, col in enumerate(per):
            if j < dense:
                if all(o is None for o in col):
                    res.append(_zeros(inputs[j], rows))
                    continue
                if any(o is None for o in col):
                    zero = torch.zeros_like(next(o for o in col if o is not None))
                    col = [zero if o is None else o for o in col]
                res.append(torch.stack(col))
            else:
                res.append(col)
        return res

    def checked(self, compute: Callable[[bool], list[Rows]], named: Callable[[list[Rows]], Named],
                batched: bool) -> list[Rows]:
        """Per-task gradients (``compute(batched)``), finite or an error naming the loss.

        A batched backward multiplies the zero seeds of the other tasks by every local derivative: one infinite
        derivative on task i's path (``sqrt`` at 0) puts ``0 × inf = NaN`` in every row.  So a non-finite batch
        is recomputed task by task before anyone is blamed.
        """
        n = len(self.passes)
        res = compute(batched)
        bad = self.first_bad(named(res))
        if bad is not None and self.passes[n:] == ["batched"]:  # batched: recompute before blaming
            self.passes.pop()
            try:
                res = compute(False)
            except RuntimeError as err:  # pragma: no cover - the batched pass retains the graph
                raise NonFinite(f"{bad[0]} is not finite (in a batched backward, where another task's "
                                "0 × inf can also cause it); no gradient was written", bad[1]) from err
            self.fallback = "non-finite values in the batched backward (0 × inf); recomputed task by task"
            bad = self.first_bad(named(res))
        if bad is not None:
            raise NonFinite(f"{bad[0]} is not finite; no gradient was written", bad[1])
        return res

    def freed(self, err: RuntimeError) -> None:
        """Name the loss whose graph was freed (probing each; this runs on the error path only)."""
        for out, name in zip(self.tasks.outs + self.extra.outs, self.tasks.names + self.extra.names):
            leaves = [t for n, t in self.g.leaves.items() if self.g.mask(n) & self.bit(name)]
            try:
                torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True)
            except RuntimeError:
                raise RuntimeError(f"the autograd graph of {name!r} has already been freed (a backward ran "
                                   "through it without retain_graph=True); no gradient was written") from err
        raise RuntimeError(f"part of the autograd graph has already been freed; no gradient was written") from err

    def bit(self, name: str) -> int:
        return 1 << (self.tasks.names + self.extra.names).index(name)

    def add(self, node: Node, g: Tensor | None) -> None:
        if g is not None:
            self.grads.setdefault(node, []).append(g)

    def first_bad(self, named: Named) -> tuple[str, int] | None:
        """The first named row that is not finite, or None.

        ``named`` pairs per-row values with a name per row (None: not checked).  One device sync for all of
        them; a flagged row is confirmed element by element (a sum may overflow where no entry is infinite).
        """
        if not named:
            return None
        flags = [_flags(t).reshape(-1) for _, t in named]
        dev = flags[0].device
        ok = torch.cat([f.to(dev) for f in flags])
        if self.group is not None:  # every rank takes the same branch
            ok = _dist.all_true(ok, self.group)
        ok = ok.to("cpu").tolist()
        # flagged rows, confirmed element by element (on every rank, then combined: the same verdict everywhere)
        suspects = []  # (name, index of the bad member of a group, or 0; None if the row is finite here)
        i = 0
        for names, t in named:
            for r, name in enumerate(names):
                if name is not None and not ok[i + r]:
                    flags_only = isinstance(t, Tensor) and t.dtype == torch.bool
                    suspects.append((name, 0 if flags_only else _exact_bad(t, r)))
            i += len(names)
        if self.group is not None and suspects:
            here = torch.tensor([m is None for _, m in suspects], device=dev)
            fine = _dist.all_true(here, self.group).to("cpu").tolist()
            suspects = [(name, 0 if m is None else m) for (name, m), f in zip(suspects, fine) if not f]
        for name, m in suspects:
            if m is not None:  # a group names each member: (messages, task)
                return (name[0][m], name[1]) if isinstance(name[0], list) else name
        return None

    def write(self) -> None:
        """Accumulate the collected gradients into ``.grad``: like ``AccumulateGrad`` without hooks in one
        process; through ``AccumulateGrad`` itself across processes (DDP's reducer must see them)."""
        if self.group is not None:  # through AccumulateGrad: DDP's reducer hooks fire once per parameter
            leaves, totals = [], []
            for node, parts in self.grads.items():
                p = self.g.leaves[node]
                leaves.append(p)
                totals.append(sum(parts[1:], parts[0]).to(p.dtype))
            _dist.write_through_autograd(leaves, totals)
            return
        with torch.no_grad():
            for node, parts in self.grads.items():
                p = self.g.leaves[node]
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
                total = total.to(p.dtype)
                if p.grad is None:
                    # a row of a batched result is a view: copy it, not to keep all k rows alive (a view of
                    # the whole storage, e.g. a transposed weight gradient, is kept as autograd would)
                    small = total.untyped_storage().nbytes() <= total.numel() * total.element_size()
                    p.grad = total.detach() if small else total.clone()
                else:
                    p.grad += total
