"""``impartial.backward`` on modules sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 runs the forward on unsharded parameters that it all-gathers (the autograd graph's leaves), while
``module.parameters()`` returns the sharded ``DTensor`` s.  Its backward is driven from autograd itself: a
pre-backward hook on each module's outputs all-gathers the module's parameters; a post-backward node at its inputs,
and an end-of-backward callback that the first pre-backward hook queues on the engine, reduce-scatter the unsharded
parameters' ``.grad`` into the sharded ``.grad`` and reshard.  impartial runs several engine calls (the per-task
passes, the pulls, the final capture pass, the write), so:

1. sharded ``shared_params`` are replaced by their unsharded counterparts, the leaves (:func:`session`);
2. before the first pass, every FSDP module that holds a leaf is unsharded (``FSDPModule.unshard``: the all-gather
   a plain backward does, once per module); while the passes run, FSDP's post-backward is held
   (:func:`impartial._torch_compat.fsdp_held`): nothing is resharded while a later pass still needs the unsharded
   parameters, and nothing is reduced before every total is checked;
3. the write accumulates each unsharded parameter's total through its ``AccumulateGrad`` (:func:`._final.write`),
   then FSDP's own end-of-backward callback runs, once per FSDP tree: each group's post-backward, once (its
   reduce-scatter, or under ``set_requires_gradient_sync(False)`` the local accumulation; the sharded parameters'
   post-accumulate-grad hooks; the reshard), as after ``loss.backward()``;
4. on an error nothing is reduced, and FSDP's per-iteration state is reset (``FSDPModule.reset_iter_state``), so
   that the next forward starts clean; ``.grad`` is untouched.

Tensor parallel (``DTensor`` parameters, or ``DTensor`` activations) and FSDP1 (``FullyShardedDataParallel``'s
flat parameters) are refused with an error that says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ._call import Call
from ._torch_compat import (
    fsdp_held,
    fsdp_params,
    fsdp_post_backward,
    fsdp_reset,
    fsdp_states,
    fsdp_tree,
    fsdp_unshard,
    is_dtensor_boundary,
)
from .graph._trace import Graph

__all__ = ["Session", "finish", "hold", "prepare", "session"]


@dataclass
class Session:
    """The FSDP states alive in this process and, once the graph is traced, the trees this call touches."""

    states: list[Any]
    #: id of an unsharded parameter (a graph leaf) -> the state that manages it
    owner: dict[int, Any]
    #: one state per FSDP tree (shared ``_state_ctx``) that holds a leaf of this call's graph
    trees: list[Any] = field(default_factory=list)


def _initialized() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def session(call: Call) -> tuple[Call, Session | None]:
    """The call with sharded ``shared_params`` replaced by the unsharded parameters autograd sees, and the FSDP
    session (None where no module is sharded with ``fully_shard``)."""
    if not _initialized():
        return call, None
    states = fsdp_states()
    if not states:
        return call, None
    owner: dict[int, Any] = {}
    full: dict[int, Tensor] = {}
    for s in states:
        for sharded, unsharded, _ in fsdp_params(s):
            if unsharded is not None:
                owner[id(unsharded)] = s
                full[id(sharded)] = unsharded
    if call.params is not None:
        call = replace(call, params=[(name, full.get(id(p), p)) for name, p in call.params])
    return call, Session(states, owner)


def prepare(sess: Session | None, g: Graph) -> None:
    """Refuse what is not supported (tensor parallel, FSDP1), and unshard every FSDP module that holds a leaf of
    ``g``."""
    if not _initialized():
        return
    _refuse(sess, g)
    if sess is None:
        return
    touched: dict[int, Any] = {}
    for t in g.leaves.values():
        s = sess.owner.get(id(t))
        if s is not None:
            touched.setdefault(id(s), s)
    trees: dict[int, Any] = {}
    for s in touched.values():
        fsdp_unshard(s)  # the all-gather a plain backward does (a no-op where FSDP kept them unsharded)
        trees.setdefault(id(fsdp_tree(s)), s)
    sess.trees = list(trees.values())


def _refuse(sess: Session | None, g: Graph) -> None:
    """A clear error for the sharding setups that are not supported, before any pass runs."""
    from torch.distributed.fsdp import FlatParameter
    from torch.distributed.tensor import DTensor

    for n, t in g.leaves.items():
        if isinstance(t, FlatParameter):
            raise TypeError(
                f"{g.name(n)!r} is a flat parameter of FullyShardedDataParallel (FSDP1), which "
                "impartial.backward does not support: shard with torch.distributed.fsdp.fully_shard "
                "(FSDP2) instead; see docs/distributed.md"
            )
        if isinstance(t, DTensor):
            how = (
                "a DTensor parameter that fully_shard does not manage (tensor parallel)"
                if sess is None or id(t) not in sess.owner
                else "a DTensor parameter that fully_shard unshards on a 2-D mesh (tensor parallel with FSDP)"
            )
            raise TypeError(
                f"{g.name(n)!r} is {how}: impartial.backward supports data parallel (DDP, and "
                "FSDP2's fully_shard without tensor parallel) only; see docs/distributed.md"
            )
    if any(is_dtensor_boundary(n) for n in g.nodes):
        raise TypeError(
            "the losses' graph holds DTensor activations (DTensor.from_local or to_local): impartial.backward "
            "supports data parallel (DDP, and FSDP2's fully_shard without tensor parallel) only; see "
            "docs/distributed.md"
        )


def hold(sess: Session | None) -> contextlib.AbstractContextManager[None]:
    """FSDP's post-backward held while the passes run; on an error, FSDP's per-iteration state reset."""
    return contextlib.nullcontext() if sess is None else _held(sess)


@contextlib.contextmanager
def _held(sess: Session) -> Iterator[None]:
    try:
        with fsdp_held(sess.states):
            yield
    except BaseException:
        for s in sess.trees:
            fsdp_reset(s)
        raise


def finish(sess: Session | None) -> None:
    """After the write: FSDP's end-of-backward, once per tree this call touched."""
    if sess is None:
        return
    for s in sess.trees:
        fsdp_post_backward(s)
