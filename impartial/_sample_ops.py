"""Where the samples are in every tensor of a graph: one rule per autograd node type, for :mod:`impartial._samples`.

A tensor of ``numel = O · B · I`` entries *holds the samples at* ``(O, I)`` when, in row-major order, entry
``(o · B + b) · I + i`` belongs to sample ``b`` alone.  A view keeps ``(O, I)``; an op that works dim by dim needs the
samples inside one dim ``d`` of its shape: ``shape[d] = a · B · f`` with index ``(α · B + b) · f + φ`` (:func:`axis`),
so that ``O = a · prod(shape[:d])`` and ``I = f · prod(shape[d+1:])`` (:func:`lay`).

A rule reads the layout of a node's output gradient (the forward output) and returns its inputs' layouts: an input
that holds the samples where the output does gets its layout; an input broadcast over the samples (a parameter, a
bias) gets :data:`SUM` (its gradient is the sum of the samples' gradients); anything else raises :class:`Refuse`
with the reason, so that only ops known to keep every sample's entries apart pass.  The rules of layers (matrix
products, convolutions, norms, embeddings, attention) and the table of every rule are in
:mod:`impartial._sample_rules`.  Every rule is a transcription of
the op's forward semantics; node names and saved values are torch internals (:mod:`impartial._torch_compat`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch.autograd.graph import Node

from ._torch_compat import saved

__all__ = ["Lay", "SUM", "State", "Refuse", "Rule", "Shape", "axis", "lay", "moved", "norm_dim"]

#: where a tensor holds the samples: ``(O, I)`` elements outside and inside each sample's block
Lay = tuple[int, int]
#: the state of a tensor broadcast over the samples: its gradient is their sum
SUM = "sum"
State = Lay | str | None
Shape = tuple[int, ...]


class Refuse(Exception):
    """The graph does not prove that every loss entry depends on its own sample only; the message says where."""


def axis(shape: Shape, where: Lay, B: int) -> tuple[int, int, int] | None:
    """``(d, a, f)``: the samples lie in dim ``d`` as ``shape[d] = a · B · f`` (see the module doc), or None."""
    outer, inner = where
    total, P = math.prod(shape), 1
    for d, s in enumerate(shape):
        if s > 1 and outer % P == 0:
            Q = total // (P * s)
            if inner % Q == 0 and (outer // P) * B * (inner // Q) == s:
                return d, outer // P, inner // Q
        P *= s
    return None


def lay(shape: Shape, d: int, a: int, f: int) -> Lay:
    """The ``(O, I)`` of samples in dim ``d`` of ``shape`` as ``a · B · f``."""
    return a * math.prod(shape[:d]), f * math.prod(shape[d + 1 :])


Rule = Callable[[Node, dict[int, Lay], list[Shape], list[Shape | None], int], list[State]]


def _out(node: Node, outs: dict[int, Lay], oshapes: list[Shape], B: int) -> tuple[int, int, int]:
    """The sample axis of the node's only output."""
    if set(outs) != {0}:
        raise Refuse(f"{node.name()}: samples in an output other than the first")
    found = axis(oshapes[0], outs[0], B)
    if found is None:
        raise Refuse(f"{node.name()}: the samples are spread over several dims of its output {list(oshapes[0])}")
    return found


def norm_dim(v: int, rank: int) -> int:
    """Dim ``v`` counted from the start."""
    return v + rank if v < 0 else v


def _broadcast(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    """Elementwise ops with broadcasting: an input aligned with the sample dim holds them; one of size 1 there (or
    without that dim) is broadcast over the samples."""
    d, a, f = _out(node, outs, oshapes, B)
    S = oshapes[0]
    res: list[State] = []
    for s in ishapes:
        if s is None:
            res.append(None)
            continue
        ds = d - (len(S) - len(s))
        if ds >= 0 and s[ds] == S[d]:
            res.append(lay(s, ds, a, f))
        elif ds < 0 or s[ds] == 1:
            res.append(SUM)
        else:
            raise Refuse(f"{node.name()}: input {list(s)} does not broadcast to {list(S)}")
    return res


def _view(node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int) -> list[State]:
    """Views and reshapes keep the row-major order, so the samples stay at the same ``(O, I)``."""
    return [None if s is None else outs[0] for s in ishapes]


def moved(node: Node, d: int, rank: int) -> int:
    """The input dim that output dim ``d`` of a transpose or permute (output rank ``rank``) comes from."""
    name = node.name()
    if name == "TBackward0":
        return 1 - d if rank == 2 else d
    if name == "PermuteBackward0":
        return norm_dim(saved(node, "dims")[d], rank)
    d0, d1 = norm_dim(saved(node, "dim0"), rank), norm_dim(saved(node, "dim1"), rank)
    return d1 if d == d0 else d0 if d == d1 else d


def _permute(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    d, a, f = _out(node, outs, oshapes, B)
    src = moved(node, d, len(oshapes[0]))
    return [None if s is None else lay(s, src, a, f) for s in ishapes]


def _reduce(node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int) -> list[State]:
    """Reductions over some dims (``keepdim`` or not): fine unless they reduce the sample dim."""
    d, a, f = _out(node, outs, oshapes, B)
    s = ishapes[0]
    assert s is not None
    dims = saved(node, "dim")
    dims = tuple(range(len(s))) if dims is None or dims == () else (dims,) if isinstance(dims, int) else dims
    red = {norm_dim(x, len(s)) for x in dims}
    kept = list(range(len(s))) if saved(node, "keepdim") else [j for j in range(len(s)) if j not in red]
    src = kept[d]
    if src in red:
        raise Refuse(f"{node.name()} reduces over the samples")
    return [lay(s, src, a, f)] + [None] * (len(ishapes) - 1)


def _along(names: Sequence[str]) -> Rule:
    """Ops along one dim (softmax, cumsum, flip, roll, slice, cat): fine unless that dim holds the samples."""

    def rule(
        node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
    ) -> list[State]:
        d, a, f = _out(node, outs, oshapes, B)
        rank = len(oshapes[0])
        for name in names:
            v = saved(node, name)
            if d in {norm_dim(x, rank) for x in (v if isinstance(v, tuple) else (v,))}:
                if node.name() == "SliceBackward0" and _whole(node, oshapes[0][d]):
                    break
                raise Refuse(f"{node.name()} works along the samples' dim")
        return [None if s is None else lay(s, d, a, f) for s in ishapes]

    return rule


def _whole(node: Node, size: int) -> bool:
    return (
        saved(node, "start") == 0
        and saved(node, "step") == 1
        and size == saved(node, "self_sym_sizes")[norm_dim(saved(node, "dim"), len(saved(node, "self_sym_sizes")))]
    )


def _select(node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int) -> list[State]:
    """``x.select(dim, i)`` / ``torch.stack`` (one dim fewer / more on the input side)."""
    d, a, f = _out(node, outs, oshapes, B)
    name = node.name()
    if name == "StackBackward0":
        dim = norm_dim(saved(node, "dim"), len(oshapes[0]))
        if d == dim:
            raise Refuse("StackBackward0 stacks along the samples' dim")
        return [None if s is None else lay(s, d - (d > dim), a, f) for s in ishapes]
    s = ishapes[0]
    assert s is not None
    dim = norm_dim(saved(node, "dim"), len(s))
    return [lay(s, d + (d >= dim), a, f)]


def _split(node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int) -> list[State]:
    """``split`` / ``unbind``: every output that gets a gradient must place the samples in the same input dim."""
    s = ishapes[0]
    assert s is not None
    dim = norm_dim(saved(node, "dim"), len(s))
    found = set()
    for nr, where in outs.items():
        ax = axis(oshapes[nr], where, B)
        if ax is None:
            raise Refuse(f"{node.name()}: the samples are spread over several dims of an output")
        d, a, f = ax
        if node.name() == "UnbindBackward0":
            d += d >= dim
        elif d == dim:
            raise Refuse(f"{node.name()} splits the samples' dim")
        found.add(lay(s, d, a, f))
    if len(found) != 1:
        raise Refuse(f"{node.name()}: its outputs place the samples differently")
    return [found.pop()]
