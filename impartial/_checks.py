"""Everything that can fail in :func:`impartial.backward`, checked before any ``.grad`` is written.

- finiteness of named gradient rows (:func:`first_bad`): one device sync for every row of a stage, a flagged
  row confirmed element by element (a sum can overflow where no entry is infinite), the same verdict on every
  rank of a process group;
- a freed graph (:func:`freed`): autograd's error renamed after the loss whose graph it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from . import _distributed as _dist
from ._torch_compat import foreach_norm, is_freed_graph
from .graph._inputs import _Losses
from .graph._trace import Graph

__all__ = ["NonFinite", "Blame", "Check", "each", "rows_check", "first_bad", "freed", "guard", "said"]


class NonFinite(FloatingPointError):
    """A gradient is not finite; ``task`` is the index of the loss to blame (a task, or ``k + j`` for the ``j``-th
    ``also`` term), or None where no single loss can be blamed."""

    def __init__(self, message: str, task: int | None) -> None:
        super().__init__(message)
        self.task = task


#: who to blame for a row: the loss index (or None) and the message, built only on the error path
Blame = tuple[int | None, Callable[[], str]]


def said(template: str, *args: object) -> Callable[[], str]:
    """A message built only when it is needed: ``template.format(*args)``, a callable arg called first."""
    return partial(_format, template, args)


def _format(template: str, args: tuple[object, ...]) -> str:
    return template.format(*(a() if callable(a) else a for a in args))


class each(Sequence[Blame]):
    """``(i, said(template, names[i]))`` for task ``i``, built when asked: with hundreds of tasks (every sample a
    task) the error path alone reads them."""

    def __init__(self, template: str, names: Sequence[str]) -> None:
        self.template, self.names = template, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Blame:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return i % len(self), said(self.template, self.names[i])


@dataclass
class Check:
    """Finiteness flags of some rows, ``[n]`` bool (True: finite), computed cheaply (a sum or a norm per row is
    finite iff its entries are, unless it overflows), with who to blame for each row (None: not checked) and, for
    the error path, an exact test of row ``i`` element by element (None: the flags are exact)."""

    flags: Tensor
    blame: Sequence[Blame | None]
    exact: Callable[[int], bool] | None = None


def rows_check(rows: Tensor | list[Tensor | None], blame: Sequence[Blame | None]) -> Check:
    """The check of ``[n, ...]`` rows (or a list of rows, None for none)."""
    if isinstance(rows, list):
        present = [r for r in rows if r is not None]
        norms = iter(foreach_norm(present)) if present else iter(())
        dev = present[0].device if present else torch.device("cpu")
        one = torch.ones((), device=dev)
        flags = torch.stack([one if r is None else next(norms) for r in rows]).isfinite()
    else:
        flags = (
            rows.reshape(rows.shape[0], -1).sum(1).isfinite()
            if rows.numel()
            else torch.ones(rows.shape[:1], dtype=torch.bool, device=rows.device)
        )
    return Check(flags, blame, lambda i: rows[i] is None or bool(rows[i].isfinite().all()))  # type: ignore[union-attr]


def first_bad(checks: list[Check], group: Any = None) -> tuple[str, int | None] | None:
    """The first checked row that is not finite, as ``(message, loss index)``, or None.  One device sync for all
    checks; the same verdict on every rank of a process group."""
    if not checks:
        return None
    dev = checks[0].flags.device
    ok_t = torch.cat([c.flags.reshape(-1).to(dev) for c in checks])
    if group is not None:  # every rank takes the same branch
        ok_t = _dist.all_true(ok_t, group)
    ok = ok_t.to("cpu").tolist()
    suspects: list[tuple[Blame, bool]] = []  # (blame, finite here)
    i = 0
    for c in checks:
        n = len(c.blame)
        for r in [r for r, fine in enumerate(ok[i : i + n]) if not fine]:  # blames are built for flagged rows only
            who = c.blame[r]
            if who is not None:
                suspects.append((who, c.exact is not None and c.exact(r)))
        i += n
    if group is not None and suspects:  # a row flagged by an overflowing sum on one rank only is finite
        here = torch.tensor([f for _, f in suspects], device=dev)
        fine = _dist.all_true(here, group).to("cpu").tolist()
        suspects = [(who, f) for (who, _), f in zip(suspects, fine)]
    for (task, message), finite in suspects:
        if not finite:
            return message(), task
    return None


def freed(err: BaseException, g: Graph, tasks: _Losses, extra: _Losses) -> RuntimeError:
    """The error to raise for a freed graph: it names the loss whose graph was freed (probing each loss; this runs
    on the error path only)."""
    for i, (out, name) in enumerate(zip(tasks.outs + extra.outs, tasks.names + extra.names)):
        leaves = [t for n, t in g.leaves.items() if g.mask(n) >> i & 1]
        try:
            torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True)
        except RuntimeError as probe:
            if is_freed_graph(probe):
                return RuntimeError(
                    f"the autograd graph of {name!r} has already been freed (a backward ran "
                    "through it without retain_graph=True); no gradient was written"
                )
    return RuntimeError("part of the autograd graph has already been freed; no gradient was written")


class guard:
    """Context: an autograd error that says the graph was freed is re-raised naming the loss."""

    def __init__(self, g: Graph, tasks: _Losses, extra: _Losses) -> None:
        self.g, self.tasks, self.extra = g, tasks, extra

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        if err is not None and is_freed_graph(err):
            raise freed(err, self.g, self.tasks, self.extra) from err
