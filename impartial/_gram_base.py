"""The shared machinery of the per-sample rules (:mod:`impartial._layer_grams`, :mod:`impartial._generic_gram`):
each sample's entries of a tensor, their sums, and the rule protocol (per-sample gradients of a layer's broadcast
inputs, their Gram matrix and the direction ``wᵀ J``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ._sample_ops import Lay, axis
from ._samples import Layer

__all__ = ["Unreadable", "Rule", "budget", "samples", "per_sample_sum", "reduce_to", "sq", "symmetric", "total"]

#: elements a chunk of per-sample gradients may take (one layer at a time)
_BUDGET = 2**22


def budget(B: int) -> int:
    return max(_BUDGET, 4 * B * B)


class Unreadable(Exception):
    """A layer's saved tensors cannot be read (saved through a hook, or a kind the rule does not cover): the generic
    rule serves it."""


def samples(t: Tensor, where: Lay, B: int) -> Tensor:
    """``t`` as ``[B, O, I]``: each sample's entries (a view where ``O = 1``)."""
    outer, inner = where
    return t.reshape(outer, B, inner).transpose(0, 1)


def per_sample_sum(t: Tensor, where: Lay, B: int, keep: list[int]) -> Tensor:
    """``[B, *t.shape[keep]]``: each sample's entries of ``t`` summed over every dim but those in ``keep`` (ascending,
    none of them the sample dim)."""
    found = axis(tuple(t.shape), where, B)
    assert found is not None  # the proof placed the samples in one dim of every layer's output
    d, a, f = found
    S = list(t.shape)
    x = t.reshape(S[:d] + [a, B, f] + S[d + 1 :])
    kx = [j if j < d else j + 2 for j in keep]
    drop = [j for j in range(x.dim()) if j != d + 1 and j not in kx]
    if drop:
        x = x.sum(drop)
    return x.movedim(sorted(kx + [d + 1]).index(d + 1), 0)


def reduce_to(t: Tensor, where: Lay, B: int, shape: tuple[int, ...]) -> Tensor:
    """``[B, *shape]``: the per-sample gradient of a tensor of ``shape`` that was broadcast to ``t``'s shape."""
    off = t.dim() - len(shape)
    keep = [off + j for j, s in enumerate(shape) if s != 1]
    return per_sample_sum(t, where, B, keep).reshape(B, *shape)


def symmetric(n: int, block: Callable[[int, int], Tensor], cap: int | None = None, inner: int = 0) -> Tensor:
    """An ``[n, n]`` symmetric matrix from its upper row blocks (``block(i, j)``: rows ``i:j`` against columns
    ``i:n``), mirrored: about half the products of the whole matrix at large ``n``.  Blocks of at most ``cap`` rows;
    ``inner``: the multiply-adds per entry."""
    # blocks of n // 4 rows (at least 32) pay where the products outweigh the extra ops, measured (one thread):
    # J Jᵀ of J [128, 12288] 0.81x the whole product, of J [128, 64] 2.2x; kernels of 16 tokens per sample
    # (n = 128, K + M = 256) 0.40x, of one row (K + M = 320) 1.4x; J [512, 4096] 0.67x
    step = max(32, n // 4) if n >= 256 or (n >= 64 and inner >= 2048) else n
    step = max(1, min(step, cap if cap is not None else n))
    if step >= n:
        return block(0, n)
    G: Tensor | None = None
    for i in range(0, n, step):
        j = min(n, i + step)
        rows = block(i, j)
        if G is None:
            G = rows.new_empty(n, n)
        G[i:j, i:] = rows
        G[j:, i:j] = rows[:, j - i :].T
    assert G is not None
    return G


def sq(J: Tensor) -> Tensor:
    """``J Jᵀ`` of per-sample gradients ``[B, ...]``."""
    J = J.reshape(J.shape[0], -1)
    return symmetric(J.shape[0], lambda i, j: J[i:j] @ J[i:].T, inner=J.shape[1])


class Rule:
    """One layer's per-sample gradients at its broadcast inputs (``slots``), from its saved tensors (read at
    construction, before any pass frees them) and its output gradient (:meth:`bind`)."""

    kind = "rule"

    def __init__(self, layer: Layer, B: int) -> None:
        self.layer, self.node, self.B = layer, layer.node, B
        self.kept: Tensor | None = None
        self._jac: dict[int, Tensor] = {}

    def bind(self, delta: dict[int, Tensor], kept: Tensor | None) -> None:
        """The output gradients (each output's whole tensor) and the samples that are tasks (None: all)."""
        self.delta, self.kept = delta, kept

    def sel(self, t: Tensor) -> Tensor:
        return t if self.kept is None else t.index_select(0, self.kept)

    def jac(self, slot: int) -> Tensor:
        """``[B', *slot shape]``: the per-sample gradients of the tensor at input ``slot``."""
        if slot not in self._jac:
            self._jac[slot] = self._jacobian(slot)
        return self._jac[slot]

    def gram(self, slots: list[int]) -> Tensor:
        """``Σ_slots J_slot J_slotᵀ`` ``[B', B']``."""
        return total(sq(self.jac(j)) for j in slots)

    def directions(self, slots: list[int], w: Tensor) -> list[Tensor]:
        """``wᵀ J_slot`` per slot (``w`` ``[B']`` in the layer's dtype)."""
        return [torch.tensordot(w, self.jac(j), dims=1) for j in slots]

    def _jacobian(self, slot: int) -> Tensor:
        raise NotImplementedError


def total(parts: Iterable[Tensor]) -> Tensor:
    out: Tensor | None = None
    for p in parts:
        out = p if out is None else out + p
    assert out is not None
    return out
