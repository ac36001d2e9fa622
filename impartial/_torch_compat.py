"""Every torch internal :func:`impartial.backward` relies on, in one place.

Each function here reads or sets something torch does not document as public API.  ``tests/test_torch_compat.py``
checks every one of them against the behaviour we rely on, so that a torch release that changes one fails a test
by name instead of silently changing a result or losing speed.  Nothing here catches an error to fall back.

- :func:`input_metadata`: the shape, dtype and device of the gradient a node receives at one of its inputs
  (``Node._input_metadata``), for zero rows and names of blocks that no tensor is at hand for;
- :func:`linear_saved`: the input ``X`` and the scalars of a matrix-product node (``AddmmBackward0`` /
  ``MmBackward0``: ``_saved_mat1`` / ``_saved_self``, ``_saved_alpha`` / ``_saved_beta``);
- :func:`saved_tensors`: the tensors a node saved for backward (its ``_saved_*`` attributes), among which the
  tensor at an automatic block is found when a consumer saved it;
- :func:`saved` and :func:`saved_input`: one value a node saved for backward (a dim, a flag, a shape; a tensor
  only when saved without a hook), by name, for the per-sample proof and rules (:mod:`impartial._samples`,
  :mod:`impartial._layer_grams`), which also name the node types they know (``Node.name()``);
- :func:`view_base`: the tensor a view was taken from (``Tensor._base``): the whole loss vector behind the scalars
  ``L.unbind(0)`` gives, read without stacking ``B`` scalars again;
- :func:`quiet`: a tensor's own hooks switched off while impartial computes gradients that are not the one
  the tensor receives (``Tensor._backward_hooks``, the dict torch's C++ hook reads at call time), and the
  ``.grad`` of a tensor that retains its gradient kept as it was;
- :func:`is_freed_graph`: whether an autograd error says the graph was already freed (its message is the only
  signal torch gives);
- :func:`foreach_norm`: ``torch._foreach_norm``, one fused norm per tensor of a list;
- FSDP2 (``fully_shard``), whose backward is driven from autograd hooks that have no public switch
  (:mod:`impartial._fsdp`): :func:`fsdp_states` (every live FSDP state, from torch's registry of composable
  states), :func:`fsdp_params` (each managed parameter: sharded, and the unsharded one autograd sees),
  :func:`fsdp_tree` (the context the states of one ``fully_shard`` tree share), :func:`fsdp_unshard` (the
  all-gather of a state's parameters), :func:`fsdp_held` (FSDP's post-backward kept from running inside
  impartial's engine calls), :func:`fsdp_post_backward` (FSDP's own end-of-backward callback, run once after the
  write) and :func:`fsdp_reset` (its recovery after an aborted backward);
- :func:`is_dtensor_boundary`: the autograd nodes of ``DTensor.from_local`` / ``to_local`` (their class names), where
  a graph's activations become, or stop being, ``DTensor`` s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = [
    "foreach_norm",
    "fsdp_held",
    "fsdp_params",
    "fsdp_post_backward",
    "fsdp_reset",
    "fsdp_states",
    "fsdp_tree",
    "fsdp_unshard",
    "input_metadata",
    "is_dtensor_boundary",
    "is_freed_graph",
    "linear_saved",
    "quiet",
    "saved",
    "saved_input",
    "saved_tensors",
    "view_base",
]


def input_metadata(node: Node, nr: int) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of the gradient ``node`` receives at input ``nr`` (its forward output ``nr``)."""
    m = node._input_metadata[nr]  # type: ignore[attr-defined]
    return torch.Size(m.shape), m.dtype, m.device


def linear_saved(node: Node) -> tuple[Tensor | None, float, float]:
    """``(X, alpha, beta)`` of ``AddmmBackward0`` (``X = mat1``) or ``MmBackward0`` (``X = self``, alpha = beta = 1).

    ``X`` is None when autograd did not save it (the weight does not require grad) or saved it through a
    saved-tensor hook (checkpointing: reading it would recompute the region).
    """
    if node.name() == "AddmmBackward0":
        X = _unhooked(node, "mat1")
        return X, float(node._saved_alpha), float(node._saved_beta)  # type: ignore[attr-defined]
    if node.name() == "MmBackward0":
        return _unhooked(node, "self"), 1.0, 1.0
    raise ValueError(f"not a matrix-product node: {node.name()}")


def _unhooked(node: Node, name: str) -> Tensor | None:
    """Saved tensor ``name`` of ``node`` if it was saved without a saved-tensor hook, else None."""
    raw = getattr(node, "_raw_saved_" + name)
    if raw is None or raw.unpack_hook is not None:
        return None
    return getattr(node, "_saved_" + name)


def saved(node: Node, name: str) -> Any:
    """The value ``node`` saved for backward as ``name`` (its ``_saved_<name>`` attribute): an int, a float, a bool,
    a tuple of ints, a tensor or None.  Autograd stores int arguments as unsigned 64-bit numbers (a dim of -1 reads
    ``2**64 - 1``): they are read back signed.  ``AttributeError`` names the node when torch renamed it."""
    try:
        value = getattr(node, "_saved_" + name)
    except AttributeError:
        raise AttributeError(f"{node.name()} has no saved value {name!r} in this torch version") from None
    return _signed(value)


def _signed(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        return value
    if isinstance(value, int):
        return value - 2**64 if value >= 2**63 else value
    return tuple(_signed(v) for v in value)


def saved_input(node: Node, name: str) -> Tensor | None:
    """Tensor ``name`` that ``node`` saved for backward, or None where it saved none or saved it through a
    saved-tensor hook (checkpointing: reading it would recompute the region)."""
    return _unhooked(node, name)


def view_base(t: Tensor) -> Tensor | None:
    """The tensor ``t`` is a view of (None: ``t`` is not a view)."""
    return t._base


def _plain(raw: Any) -> bool:
    """Whether saved tensor(s) ``raw`` were saved without a saved-tensor hook."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    return all(r is not None and r.unpack_hook is None for r in items)


def saved_tensors(node: Node, only: str | None = None) -> Iterator[tuple[str, Tensor]]:
    """``(attribute, tensor)`` for the tensors ``node`` saved for its backward without a saved-tensor hook (an input
    it saved is the very tensor object it read; a hooked one, under checkpointing, is not unpacked: that would
    recompute it).  ``only``: that attribute alone (as the first call found it)."""
    names = [only] if only is not None else [a[len("_raw_saved_") :] for a in dir(node) if a.startswith("_raw_saved_")]
    for attr in names:
        try:  # a Python Function's node lists _raw_saved_tensors but saves through ctx (not an input it read)
            raw = getattr(node, "_raw_saved_" + attr)
            value = getattr(node, "_saved_" + attr) if _plain(raw) else None
        except (AttributeError, RuntimeError):  # no such attribute, or freed with the graph
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, Tensor):
                yield attr, v


@contextlib.contextmanager
def quiet(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Switch off the tensor hooks of ``tensors`` (and keep the ``.grad`` of those that retain it) inside the block.

    ``Tensor.register_hook`` stores the hooks in ``tensor._backward_hooks``, a dict that torch's C++ hook object
    holds by reference and iterates at call time: emptying it in place silences the hooks, refilling it (same
    order) restores them.  ``retain_grad`` writes ``.grad`` from C++; the value before is put back.
    """
    held: list[tuple[dict[Any, Any], list[tuple[Any, Any]]]] = []
    grads: list[tuple[Tensor, Tensor | None]] = []
    for t in tensors:
        hooks = t._backward_hooks
        if hooks:
            held.append((hooks, list(hooks.items())))
            hooks.clear()
        if t.grad_fn is not None and t.retains_grad:
            grads.append((t, t.grad))
    try:
        yield
    finally:
        for hooks, items in held:
            hooks.clear()
            hooks.update(items)
        for t, g in grads:
            t.grad = g


def is_freed_graph(err: BaseException) -> bool:
    """Whether ``err`` is autograd's "backward through the graph a second time" error."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("second time" in text or "have already been freed" in text)


def run_backward(roots: list[Tensor], grads: list[Tensor]) -> None:
    """``torch.autograd.backward(roots, grads)`` (accumulating into the leaves), without the Python-side checks of
    the seeds (``_make_grads``: ~5 µs a root) that the engine repeats in C++ (it validates every root's gradient
    against the root's metadata).  Tensor subclasses (``__torch_function__``: DTensor) take the public path."""
    if torch.overrides.has_torch_function((*roots, *grads)):
        torch.autograd.backward(roots, grads)
        return
    # torch.autograd.graph._engine_run_backward: what torch.autograd.backward calls after its checks
    torch.autograd.graph._engine_run_backward(
        tuple(roots), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


def foreach_norm(tensors: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor, in one fused call."""
    return list(torch._foreach_norm(tensors))


def fsdp_states() -> list[Any]:
    """Every live FSDP2 state (one per ``fully_shard`` call), from ``torch.distributed._composable_state``'s
    registry of the modules that composable APIs manage."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    found: dict[int, Any] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState):
            found.setdefault(id(state), state)
    return list(found.values())


def fsdp_params(state: Any) -> Iterator[tuple[Tensor, Tensor | None, Any]]:
    """``(sharded, unsharded, group)`` of each parameter ``state`` manages: the ``DTensor`` that
    ``module.parameters()`` returns, the unsharded ``Parameter`` the forward used (the graph's leaf; None before
    the first all-gather) and its ``FSDPParamGroup``."""
    for group in state._fsdp_param_groups:
        for fp in group.fsdp_params:
            yield fp.sharded_param, getattr(fp, "_unsharded_param", None), group


def fsdp_tree(state: Any) -> Any:
    """The context object the states of one FSDP tree share (the root's, after its lazy init)."""
    return state._state_ctx


def fsdp_unshard(state: Any) -> None:
    """All-gather the parameters ``state`` manages (``FSDPModule.unshard`` on its module; a no-op where they are
    unsharded)."""
    state._modules[0].unshard()


def _noop(*args: Any) -> None:
    return None


@contextlib.contextmanager
def fsdp_held(states: list[Any]) -> Iterator[None]:
    """Inside the block, FSDP's post-backward does not run: neither a group's ``post_backward`` (which autograd
    calls from the ``RegisterPostBackwardFunction`` node at a module's inputs: reduce-scatter the unsharded
    gradients, then reshard) nor the end-of-backward callback that a module's pre-backward hook queues on the
    engine (``post_backward_final_callback_queued``, FSDP's own once-per-backward flag, is held set).  The
    pre-backward hooks still unshard (all-gather) a module's parameters when its backward first runs."""
    groups = [g for s in states for g in s._fsdp_param_groups]
    ctxs = list({id(s._state_ctx): s._state_ctx for s in states}.values())
    queued = [c.post_backward_final_callback_queued for c in ctxs]
    for c in ctxs:
        c.post_backward_final_callback_queued = True
    for g in groups:
        g.post_backward = _noop  # an instance attribute: autograd's call looks it up there first
    try:
        yield
    finally:
        for g in groups:
            g.__dict__.pop("post_backward", None)
        for c, q in zip(ctxs, queued):
            c.post_backward_final_callback_queued = q


def fsdp_post_backward(state: Any) -> None:
    """FSDP's end-of-backward callback for the tree of ``state`` (what the engine runs after a plain backward):
    every group's ``post_backward`` (reduce-scatter of the unsharded gradients into the sharded ``.grad``, or
    their accumulation under ``set_requires_gradient_sync(False)``; the sharded parameters'
    post-accumulate-grad hooks; reshard), then the per-iteration state reset."""
    state._root_post_backward_final_callback()


def fsdp_reset(state: Any) -> None:
    """FSDP's recovery after an aborted backward (``FSDPModule.reset_iter_state`` on the root of ``state``'s tree):
    reshard every group, every training state back to idle, nothing reduced."""
    for s in state._state_ctx.all_states or [state]:
        if s._is_root:
            s._reset_iter_state()


#: the autograd functions of ``DTensor.from_local`` and ``DTensor.to_local`` (``full_tensor`` ends with the latter)
_DTENSOR_BOUNDARIES = frozenset({"_FromTorchTensorBackward", "_ToTorchTensorBackward"})


def is_dtensor_boundary(node: Node) -> bool:
    """Whether ``node`` is where activations become ``DTensor`` s or plain tensors again (by its class name)."""
    return type(node).__name__ in _DTENSOR_BOUNDARIES
