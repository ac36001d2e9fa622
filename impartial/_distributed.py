"""``impartial.backward`` across processes (``torch.distributed``; no transport of our own).

Each rank holds a slice of the batch and calls :func:`impartial.backward` on its local losses (the mean over
its slice, as under ``DistributedDataParallel``, which then averages the parameters' gradients).  With ``W``
ranks of equal batch size the full-batch loss is the mean of the local ones, so:

- at an **activation block** each rank's rows are other coordinates of the same task gradients, scaled by
  ``1/W``: the full-batch Gram matrix is ``Σ_r G_r / W²`` (one all-reduce of ``k²`` numbers), the same on every
  rank, and so are the weights.  Each rank then seeds its block with ``wᵀ J_r`` (its own rows); DDP's average
  of the parameters' gradients is the full-batch gradient.  ``keep_norm``'s two norms are sums over
  coordinates: two more numbers in an all-reduce.
- at a **parameter block** the full-batch task gradients are the mean of the per-rank ones, ``J = Σ_r J_r / W``.
  With ``block="params"`` and a Gram-space solver, one reduce-scatter of ``J_r`` (:func:`shard_mean`) leaves each
  rank ``J_s``, a ``1/W`` share of ``J``'s columns; the Gram matrix is ``Σ_s J_s J_sᵀ`` (one all-reduce of ``k²``
  numbers), the same on every rank, and so are the weights; each rank then writes its own combination ``wᵀ J_r``,
  which the data-parallel wrapper's average of the gradients (DDP's all-reduce, FSDP's reduce-scatter) turns into
  ``wᵀ J``.  ``keep_norm``'s norms are sums over the shards (two numbers).  Otherwise (a solver that needs ``J``'s
  coordinates, or a parameter read directly by several tasks at an automatic block) ``J`` is all-reduced (``k``
  times a gradient all-reduce) and every rank solves the same problem.
- the losses handed to solvers (``losses=``) are averaged; the finiteness flags are combined (a task that is
  not finite on one rank is not finite on all), so every rank takes the same branch.
- ``per_sample=True`` problems are local to a sample: nothing is exchanged.  Solvers that are not Gram-space
  (GradDrop, grouped GradVac) run on each rank's own rows (GradDrop's per-coordinate choice is then exactly
  the full-batch one, but its random draws differ per rank unless the generators are seeded alike).

``.grad`` is written through autograd's ``AccumulateGrad`` (:mod:`impartial._final`), once per parameter, so DDP's
reducer hooks fire exactly once per parameter (and ``no_sync()`` accumulation works as with ``loss.backward()``);
FSDP2's post-backward runs once after the write (:mod:`impartial._fsdp`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["all_mean", "all_sum", "all_true", "resolve_group", "shard_mean", "world"]


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


def shard_mean(Js: list[Tensor], group: Any) -> Tensor:
    """This rank's share of the columns of ``J = Σ_r J_r / W``, for ``J_r`` the concatenation of ``Js``
    (``[k, d_p]`` each): ``[k, ⌈D / W⌉]`` (zero-padded at the end), from one reduce-scatter (half precision is
    reduced in float32, as :func:`impartial.solvers.gram` accumulates it).

    The columns are laid out as rows of a ``[W·m, k]`` buffer, so that each rank's share is a contiguous chunk.
    """
    W = world(group)
    k, D = Js[0].shape[0], sum(J.shape[-1] for J in Js)
    m = -(-D // W)
    dtype = torch.float32 if Js[0].dtype in (torch.float16, torch.bfloat16) else Js[0].dtype
    buf = torch.zeros((W * m, k), dtype=dtype, device=Js[0].device)
    a = 0
    for J in Js:
        buf[a : a + J.shape[-1]].copy_(J.T)
        a += J.shape[-1]
    out = torch.empty((m, k), dtype=dtype, device=buf.device)
    dist = torch.distributed
    reduce_scatter = getattr(dist, "reduce_scatter_single", None)
    if reduce_scatter is not None:
        reduce_scatter(out, buf, group=group)
    else:  # torch < 2.13
        dist.reduce_scatter_tensor(out, buf, group=group)
    return out.T / W
