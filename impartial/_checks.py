"""Everything that can fail in :func:`impartial.backward`, checked before any ``.grad`` is written.

- finiteness of named gradient rows (:func:`first_bad`): one device sync for every row of a stage, a flagged
  row confirmed element by element (a sum can overflow where no entry is infinite), the same verdict on every
  rank of a process group;
- a freed graph (:func:`freed`): autograd's error renamed after the loss whose graph it was.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from . import _distributed as _dist
from ._torch_compat import foreach_norm, is_freed_graph
from .graph._trace import Graph, _Losses

__all__ = ["NonFinite", "Named", "first_bad", "freed", "guard"]

#: ``(names, values)``: one ``(message, task index)`` per row (None: not checked) and the rows (a tensor
#: ``[rows, ...]`` or a list of tensors / None), finiteness flags already computed (a bool tensor ``[rows]``),
#: or a tuple of tensors checked as one row (then the message is a list, one per tensor)
Named = list[tuple[list, Union[Tensor, list[Union[Tensor, None]], tuple[Tensor, ...]]]]


class NonFinite(FloatingPointError):
    """A gradient is not finite; ``task`` is the index of the loss to blame (a task, or ``k + j`` for the ``j``-th
    ``also`` term), or None where no single loss can be blamed."""

    def __init__(self, message: str, task: int | None) -> None:
        super().__init__(message)
        self.task = task


def _flags(t: Tensor | list[Tensor | None] | tuple[Tensor, ...]) -> Tensor:
    """``[rows]`` finiteness flags, cheaply: a row's sum is finite iff its entries are (NaN and ±inf propagate),
    up to overflow of the sum, which the exact check rules out before anything is reported."""
    if isinstance(t, list):
        dev = next((r.device for r in t if r is not None), torch.device("cpu"))
        return torch.stack([torch.ones((), dtype=torch.bool, device=dev) if r is None else r.sum().isfinite()
                            for r in t])
    if isinstance(t, tuple):  # one row made of several tensors: one fused norm each
        return torch.stack(foreach_norm(list(t))).sum().isfinite().reshape(1)
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


def first_bad(named: Named, group: Any = None) -> tuple[str, int | None] | None:
    """The first named row that is not finite, as ``(message, loss index)``, or None."""
    if not named:
        return None
    flags = [_flags(t).reshape(-1) for _, t in named]
    dev = flags[0].device
    ok_t = torch.cat([f.to(dev) for f in flags])
    if group is not None:  # every rank takes the same branch
        ok_t = _dist.all_true(ok_t, group)
    ok = ok_t.to("cpu").tolist()
    suspects = []  # (name, index of the bad member of a group, or 0; None if the row is finite here)
    i = 0
    for names, t in named:
        for r, name in enumerate(names):
            if name is not None and not ok[i + r]:
                flags_only = isinstance(t, Tensor) and t.dtype == torch.bool
                suspects.append((name, 0 if flags_only else _exact_bad(t, r)))
        i += len(names)
    if group is not None and suspects:
        here = torch.tensor([m is None for _, m in suspects], device=dev)
        fine = _dist.all_true(here, group).to("cpu").tolist()
        suspects = [(name, 0 if m is None else m) for (name, m), f in zip(suspects, fine) if not f]
    for name, m in suspects:
        if m is not None:  # a group names each member: (messages, task)
            return (name[0][m], name[1]) if isinstance(name[0], list) else name
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
                return RuntimeError(f"the autograd graph of {name!r} has already been freed (a backward ran "
                                    "through it without retain_graph=True); no gradient was written")
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
