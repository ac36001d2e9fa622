"""The inputs of :func:`impartial.backward` and :func:`impartial.graph.trace`, validated: the losses (tasks and
``also`` terms) with the graph edges they enter at, and the shared parameters with their names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["Losses", "Params"]

Losses = Sequence[Tensor] | Tensor | Mapping[str, Tensor]
Params = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | None


@dataclass
class _Losses:
    """Validated losses: scalar ``outs`` for autograd, trace ``roots`` (edge, mask) and display names."""

    outs: list[Tensor]
    names: list[str]
    roots: list[tuple[tuple[Node, int], int]]
    #: why the tasks cannot be told apart in the graph (a 1-D loss made by one op), else None
    fused: str | None = None
    #: the ``outs`` reach the traced roots through nodes of their own (entries of a stacked tensor), which every
    #: task's backward runs
    stacked: bool = False


def _as_losses(losses: Any, what: str, offset: int = 0, allow_empty: bool = False) -> _Losses:
    """Validated losses: each a one-element floating-point tensor that requires grad (``also`` terms may also be
    constants, which add nothing and are left out, as in ``sum(losses + also)``)."""
    if isinstance(losses, Mapping):
        names, items = [str(n) for n in losses], list(losses.values())
    elif isinstance(losses, Tensor) and losses.ndim == 1 and not (allow_empty and losses.numel() == 1):
        return _stacked(losses, what, offset)
    elif isinstance(losses, Tensor):
        names, items = [what], [losses]
    else:
        items = list(losses)
        names = [f"{what}[{i}]" for i in range(len(items))]
    if not items and not allow_empty:
        raise ValueError(f"{what} is empty: pass at least one scalar loss")
    outs: list[Tensor] = []
    kept: list[str] = []
    roots: list[tuple[tuple[Node, int], int]] = []
    for name, loss in zip(names, items):
        if allow_empty and (isinstance(loss, (int, float)) or (isinstance(loss, Tensor) and not loss.requires_grad)):
            if isinstance(loss, Tensor) and loss.numel() != 1:
                raise ValueError(f"{what}: {name!r} has shape {list(loss.shape)}; every term must be a scalar")
            continue  # a constant: adds nothing to any gradient
        if not isinstance(loss, Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"{what}: {name!r} has shape {list(loss.shape)}; every loss must be a scalar")
        if not loss.is_floating_point():
            raise TypeError(f"{what}: {name!r} has dtype {loss.dtype}; a loss must be floating point")
        if not loss.requires_grad:
            raise ValueError(f"{what}: {name!r} does not require grad (no parameter produced it)")
        if loss.device.type == "meta":
            raise ValueError(
                f"{what}: {name!r} is on the meta device: it has no values, and impartial.backward "
                "needs the task gradients' values to resolve them"
            )
        if loss.ndim:  # a one-element loss of shape [1] (or [1, 1]): its scalar
            loss = loss.reshape(())
        roots.append(
            (
                (loss.grad_fn, loss.output_nr) if loss.grad_fn is not None else _leaf_edge(loss),
                1 << (offset + len(outs)),
            )
        )
        outs.append(loss)
        kept.append(name)
    return _Losses(outs, kept, roots)


def _stacked(L: Tensor, what: str, offset: int) -> _Losses:
    if L.numel() == 0:
        raise ValueError(f"{what} is an empty tensor: pass at least one loss")
    if not L.requires_grad:
        raise ValueError(f"{what}: the loss tensor does not require grad (no parameter produced it)")
    names = [f"{what}[{i}]" for i in range(L.shape[0])]
    outs = list(L.unbind(0))
    fn = L.grad_fn
    if fn is not None and fn.name() == "StackBackward0" and len(fn.next_functions) == L.shape[0]:
        roots = []
        for i, (node, nr) in enumerate(fn.next_functions):
            if node is None:
                raise ValueError(f"{what}: {names[i]!r} does not require grad (no parameter produced it)")
            roots.append(((node, nr), 1 << (offset + i)))
        return _Losses(outs, names, roots, stacked=True)
    # One op made all k losses (e.g. a per-column mean): autograd sees a single root.
    edge = (fn, L.output_nr) if fn is not None else _leaf_edge(L)
    mask = ((1 << L.shape[0]) - 1) << offset
    why = (
        f"{what} is a 1-D tensor made by one operation ({fn.name() if fn else 'a leaf'}), so its tasks share "
        "every node of the graph; pass a list (or torch.stack) of separately computed losses"
    )
    return _Losses(outs, names, [(edge, mask)], fused=why, stacked=True)


def _leaf_edge(t: Tensor) -> tuple[Node, int]:
    e = torch.autograd.graph.get_gradient_edge(t)
    return (e.node, e.output_nr)


def _as_params(params: Params, what: str = "shared_params") -> list[tuple[str, Tensor]] | None:
    """Validated shared parameters (None: infer them).  A module gives its parameters with their paths as names;
    parameters that do not require grad are left out, as optimizers leave them out."""
    if params is None:
        return None
    if isinstance(params, torch.nn.Module):
        params = list(params.named_parameters())
    elif isinstance(params, Tensor):
        params = [params]
    out, seen, frozen = [], set(), 0
    for i, p in enumerate(params):
        name, t = (str(p[0]), p[1]) if isinstance(p, tuple) else (f"{what}[{i}]", p)
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.grad_fn is not None:
            raise ValueError(
                f"{what}: {name!r} is not a leaf tensor (it has grad_fn {t.grad_fn.name()}); pass parameters"
            )
        if not t.requires_grad:
            frozen += 1
            continue
        if id(t) not in seen:  # a parameter listed twice is still one parameter
            seen.add(id(t))
            out.append((name, t))
    if not out:
        why = (
            f"all {frozen} of its parameters are frozen (requires_grad=False)"
            if frozen
            else ("it holds no parameter (an exhausted generator, e.g. model.parameters() used twice?)")
        )
        raise ValueError(f"{what} is empty: {why}; pass the parameters to resolve, or None to infer them")
    return out
