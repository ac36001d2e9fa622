"""The autograd plumbing of :func:`impartial.backward`: batched per-task gradients, checks, deferred writes.

Every gradient is computed with ``torch.autograd.grad`` and collected; ``.grad`` is written once, at the end,
so that an error anywhere (a freed graph, a non-finite task gradient) leaves every ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import Node

from .graph._trace import Graph, _Losses

Named = list[tuple[list[str | None], Tensor]]


def _finite_rows(t: Tensor) -> Tensor:
    """``[rows]``: whether each row of ``t`` is finite (``aminmax``: one pass, NaN and ±inf propagate)."""
    if t[0].numel() == 0:
        return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.reshape(t.shape[0], -1), dim=1)
    return lo.isfinite() & hi.isfinite()


@dataclass
class _Engine:
    g: Graph
    tasks: _Losses
    extra: _Losses
    retain_graph: bool
    #: why per-task gradients were computed in a loop (None: all batched)
    fallback: str | None = None
    #: class-level switch for measurements (benchmarks/bench_backward_quick.py): False = always the loop
    batched = True
    loops: int = 0
    #: gradient contributions per leaf node, written to ``.grad`` at the end
    grads: dict[Node, list[Tensor]] = field(default_factory=dict)

    def grad(self, outputs: list, inputs: list, seeds: list[Tensor], *, rows: int = 0, onehot: int = 0,
             retain: bool = True) -> list[Tensor | None]:
        """``autograd.grad``, batched over ``rows`` seeds when ``rows`` (a loop if vmap fails).

        The first ``onehot`` outputs are task losses seeded with the rows of the identity.
        """
        if rows and not self.batched:
            return self.loop(outputs, inputs, seeds, rows, onehot)
        try:
            return list(torch.autograd.grad(outputs, inputs, seeds, retain_graph=retain, allow_unused=True,
                                            is_grads_batched=rows > 0))
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                self.freed(err)
            if rows == 0:
                raise
            self.fallback = str(err).strip().splitlines()[0][:200]
            try:
                return self.loop(outputs, inputs, seeds, rows, onehot)
            except RuntimeError as again:
                if retain or "second time" not in str(again):
                    raise
                raise RuntimeError(f"torch's vmap cannot run an op ({self.fallback}) and the failed batched "
                                   "backward freed the graph; pass retain_graph=True to allow the loop over "
                                   "tasks; no gradient was written") from err

    def loop(self, outputs: list, inputs: list, seeds: list[Tensor], rows: int, onehot: int) -> list[Tensor | None]:
        """One backward per row; a task's row backpropagates its own loss only (no ``0 × inf`` from the others)."""
        self.loops += 1
        out = []
        for r in range(rows):
            keep = [c for c in range(len(outputs)) if c >= onehot or c == r]
            try:
                out.append(torch.autograd.grad([outputs[c] for c in keep], inputs, [seeds[c][r] for c in keep],
                                               retain_graph=True, allow_unused=True, materialize_grads=True))
            except RuntimeError as err:
                if "second time" in str(err) or "freed" in str(err):
                    self.freed(err)
                raise
        return [torch.stack([o[j] for o in out]) for j in range(len(inputs))]

    def checked(self, compute: Callable[[], list], named: Callable[[list], Named], outputs: list, inputs: list,
                seeds: list[Tensor], rows: int, onehot: int) -> list:
        """Per-task gradients, finite or an error naming the loss.

        A batched backward multiplies the zero seeds of the other tasks by every local derivative: one infinite
        derivative on task i's path (``sqrt`` at 0) puts ``0 × inf = NaN`` in every row.  So a non-finite batch
        is recomputed task by task before anyone is blamed.
        """
        loops = self.loops
        res = compute()
        bad = self.first_bad(named(res))
        if bad is not None and self.loops == loops:  # batched: recompute before blaming
            try:
                res = self.loop(outputs, inputs, seeds, rows, onehot)
            except RuntimeError as err:  # the graph is gone (retain_graph=False): name the batched suspect
                raise FloatingPointError(f"{bad} is not finite (in a batched backward, where another task's "
                                         "0 × inf can also cause it); no gradient was written") from err
            self.fallback = "non-finite values in the batched backward (0 × inf); recomputed task by task"
            bad = self.first_bad(named(res))
        if bad is not None:
            raise FloatingPointError(f"{bad} is not finite; no gradient was written")
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

    def first_bad(self, named: Named) -> str | None:
        """The first named row that is not finite, or None.

        ``named`` pairs a batched gradient ``[rows, ...]`` (or already computed flags ``[rows]``, e.g. from a
        Gram diagonal) with a name per row (None: not checked).  One device sync for all of them.
        """
        if not named:
            return None
        ok = torch.cat([t if t.dtype == torch.bool else _finite_rows(t) for _, t in named]).cpu()
        flat = [n for names, _ in named for n in names]
        return next((n for n, good in zip(flat, ok.tolist()) if n is not None and not good), None)

    def write(self) -> None:
        """Accumulate the collected gradients into ``.grad`` (like ``AccumulateGrad``, without hooks)."""
        with torch.no_grad():
            for node, parts in self.grads.items():
                p = self.g.leaves[node]
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
                total = total.to(p.dtype)
                if p.grad is None:
                    # a row of a batched result is a view: copy it, not to keep all k rows alive
                    p.grad = total.clone() if total._base is not None else total.detach()
                else:
                    p.grad += total
