"""``impartial.backward`` across processes (``torch.distributed``; no transport of our own).

Each rank holds a slice of the batch and calls :func:`impartial.backward` on its local losses (the mean over
its slice, as under ``DistributedDataParallel``, which then averages the parameters' gradients).  With ``W``
ranks of equal batch size the full-batch loss is the mean of the local ones, so:

- at an **activation block** each rank's rows are other coordinates of the same task gradients, scaled by
  ``1/W``: the full-batch Gram matrix is ``Σ_r G_r / W²`` (one all-reduce of ``k²`` numbers), the same on every
  rank, and so are the weights.  Each rank then seeds its block with ``wᵀ J_r`` (its own rows); DDP's average
  of the parameters' gradients is the full-batch gradient.  ``keep_norm``'s two norms are sums over
  coordinates: two more numbers in an all-reduce.
- at a **parameter block** (``block="params"``, or a parameter read directly by several tasks) the full-batch
  task gradients are the mean of the per-rank ones: all-reduce ``J`` (``k`` times a gradient all-reduce); every
  rank solves the same problem, and DDP's average of identical gradients changes nothing.
- the losses handed to solvers (``losses=``) are averaged; the finiteness flags are combined (a task that is
  not finite on one rank is not finite on all), so every rank takes the same branch.
- ``per_sample=True`` problems are local to a sample: nothing is exchanged.  Solvers that are not Gram-space
  (GradDrop, grouped GradVac) run on each rank's own rows (GradDrop's per-coordinate choice is then exactly
  the full-batch one, but its random draws differ per rank unless the generators are seeded alike).

``.grad`` is written through autograd's ``AccumulateGrad`` (:mod:`impartial._final`), once per parameter, so DDP's
reducer hooks fire exactly once per parameter (and ``no_sync()`` accumulation works as with ``loss.backward()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["resolve_group"]


def resolve_group(process_group: Any) -> Any:
    """The process group to reduce over: the given one, else the default group when ``torch.distributed`` is
    initialised with more than one rank, else None (one process: nothing is exchanged)."""
    if process_group is not None:
        return process_group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world(group: Any) -> int:
    return torch.distributed.get_world_size(group)


def all_sum(t: Tensor, group: Any) -> Tensor:
    """``Σ_r t_r`` on every rank (a new tensor)."""
    out = t.detach().clone().contiguous()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def all_mean(t: Tensor, group: Any) -> Tensor:
    return all_sum(t, group) / world(group)


def all_true(flags: Tensor, group: Any) -> Tensor:
    """Element-wise AND of bool ``flags`` over the ranks."""
    out = flags.to(torch.int32).contiguous()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN, group=group)
    return out.bool()
