"""The per-sample rule for any node no closed form covers (:class:`Generic`), and the map of per-sample gradients
down a chain of re-indexing nodes to a parameter (:func:`unchain`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._autograd import Log, rows
from ._gram_base import budget
from ._sample_ops import norm_dim
from ._samples import Layer
from ._torch_compat import input_metadata, saved

__all__ = ["Generic", "unchain"]


class Generic:
    """Any node: the per-sample gradients at its broadcast inputs from the node's own backward seeded with one
    sample's rows of its output gradients at a time (``n`` samples per batched backward, the other rows zero; the
    pass stops at those inputs), then down the parameter side to the shared leaves (re-indexed, or one batched
    backward from those inputs).  Costs ``B`` backwards of that node (batched), so it serves the nodes no closed
    form covers."""

    kind = "generic"

    def __init__(self, layer: Layer, B: int, leaves: dict[Node, Tensor]) -> None:
        self.layer, self.B, self.leaves = layer, B, leaves
        self.kept: Tensor | None = None
        self._J: dict[Node, Tensor] | None = None

    def bind(self, delta: dict[int, Tensor], kept: Tensor | None) -> None:
        self.delta, self.kept = delta, kept

    def jacobians(self, log: Log) -> dict[Node, Tensor]:
        """Shared leaf → ``[B', *leaf shape]``, summed over this node's inputs that reach it."""
        if self._J is None:
            self._J = {}
            nexts = self.layer.node.next_functions
            for j, J in zip(self.layer.slots, self._at_slots(log)):
                if j in self.layer.chains:
                    leaf, chain = self.layer.chains[j]
                    got = {leaf: unchain(J, chain, 1)}
                else:
                    got = self._down(log, _edge(nexts[j]), J, self.layer.slots[j])
                for n, t in got.items():
                    self._J[n] = t if n not in self._J else self._J[n] + t
        return self._J

    def _at_slots(self, log: Log) -> list[Tensor]:
        """``[B', *slot shape]`` per broadcast input: one sample's rows of the output gradients at a time."""
        B, node = self.B, self.layer.node
        outs = list(self.layer.outs.items())
        nexts = node.next_functions
        edges = [_edge(nexts[j]) for j in self.layer.slots]
        which = torch.arange(B) if self.kept is None else self.kept.cpu()
        size = sum(self.delta[nr].numel() for nr, _ in outs) + sum(
            math.prod(s) for j, s in enumerate(self.layer.shapes) if j in self.layer.slots and s is not None
        )
        step = max(1, budget(B) // max(1, size))
        parts: list[list[Tensor]] = [[] for _ in edges]
        for s in range(0, len(which), step):
            chunk = which[s : s + step]
            seeds = []
            for nr, (outer, inner) in outs:
                D = self.delta[nr]
                mask = torch.nn.functional.one_hot(chunk.to(D.device), B).to(D.dtype)  # [n, B]
                seeds.append((D.reshape(1, outer, B, inner) * mask.view(-1, 1, B, 1)).reshape(-1, *D.shape))
            for p, r in zip(parts, _batched(log, [GradientEdge(node, nr) for nr, _ in outs], edges, seeds)):
                p.append(r)
        return [torch.cat(p) for p in parts]

    def _down(self, log: Log, edge: GradientEdge, J: Tensor, found: list[Node]) -> dict[Node, Tensor]:
        """The leaves' per-sample gradients from those at ``edge`` (a batched backward down the parameter side)."""
        tensors = [self.leaves[n] for n in found]
        step = max(1, budget(self.B) // max(1, J[0].numel() + sum(t.numel() for t in tensors)))
        parts: list[list[Tensor]] = [[] for _ in found]
        for s in range(0, J.shape[0], step):
            for p, r in zip(parts, _batched(log, [edge], tensors, [J[s : s + step]])):
                p.append(r)
        return {n: torch.cat(p) for n, p in zip(found, parts)}


def _edge(nxt: tuple[Node | None, int]) -> GradientEdge:
    node, nr = nxt
    assert node is not None  # a slot is an input that requires grad
    return GradientEdge(node, nr)


def unchain(t: Tensor, chain: list[Node], lead: int) -> Tensor:
    """Gradients at the top of a re-indexing chain (``lead`` leading per-sample dims) → at the leaf below it: each
    node's backward (a reshape, transpose, permute or cast), in order."""
    for node in chain:
        ((c, nr),) = [(c, nr) for c, nr in node.next_functions if c is not None]
        shape, dtype, _ = input_metadata(c, nr)
        name, r = node.name(), len(shape)
        if name == "TBackward0":
            t = t.transpose(lead, lead + 1) if r == 2 else t
        elif name == "TransposeBackward0":
            t = t.transpose(norm_dim(saved(node, "dim0"), r) + lead, norm_dim(saved(node, "dim1"), r) + lead)
        elif name == "PermuteBackward0":
            dims = [norm_dim(x, r) for x in saved(node, "dims")]
            t = t.permute(*range(lead), *[lead + i for i in sorted(range(r), key=dims.__getitem__)])
        elif name == "ToCopyBackward0":
            t = t.to(dtype)
        elif name not in ("CloneBackward0", "AliasBackward0"):  # views: the leaf's shape, same order
            t = t.reshape(*t.shape[:lead], *shape)
    return t


def _batched(log: Log, outputs: list, inputs: list, seeds: list[Tensor]) -> list[Tensor]:
    """One batched backward of ``seeds`` (``[n, ...]`` each) from ``outputs`` to ``inputs`` (dense rows), the graph
    kept; an inner pass, so the report does not list it."""
    got = rows(log, outputs, inputs, seeds, n=seeds[0].shape[0], onehot=0, dense=len(inputs), needs=None, batched=True)
    log.passes.pop()
    return got.dense
