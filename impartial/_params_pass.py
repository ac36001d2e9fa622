"""``block="params"``: the per-task gradients of the shared parameters themselves, then one solve on them.

Two ways to get ``J`` (one row per task, one column per shared parameter entry), the same numbers:

- **through the blocks** (the usual case): where every task reaches the shared parameters only through the
  automatic top-level blocks (a trunk's output read by k heads), the per-task gradients at the blocks come
  from one pass over the heads (each head traversed once per task that reaches it, as in a plain backward),
  and ``J`` from **one** backward from the blocks down through the trunk, batched over the k rows
  (``is_grads_batched``): the heads never run on k rows.
- **from the losses**: otherwise (nested blocks, a task reaching a shared parameter beside every block, a
  loss tensor made by one op), one backward from the k losses, batched or a loop.

**Without J** (:func:`_linear_plan`): through the blocks, with a Gram-space solver, one process and every
shared parameter the weight or bias of a matrix product (``nn.Linear``: ``AddmmBackward0`` /
``MmBackward0``, proved from the graph, its input ``X`` read from the saved tensors), the Gram matrix needs
only each layer's per-task output gradients ``Δ_i`` ``[N, out]``: the weight's task gradient is ``Δ_iᵀ X``, so
``⟨Δ_iᵀX, Δ_jᵀX⟩ = ⟨Δ_i, (X Xᵀ) Δ_j⟩`` and the bias adds ``(1ᵀΔ_i)·(1ᵀΔ_j)``.  The batched backward through the
trunk then computes the ``Δ_i`` only (no weight gradients), and the direction ``wᵀJ`` needs no backward: per
layer, the weight's ``(Σ_i w_i Δ_i)ᵀ X`` and the bias's ``1ᵀ Σ_i w_i Δ_i`` (one ``[out, N] × [N, in]`` product, as
autograd's own for the plain sum).  ``keep_norm`` takes the plain sum's norm from ``Σ_i Δ_i`` (summed before the
quadratic form, as the J path sums ``J``'s rows before its norm) and the direction's from the direction.
``BlockReport.gram_from`` says which path ran; anything else (another op holds a shared parameter, a weight
used twice, ``alpha``/``beta`` ≠ 1, a coordinate solver, a process group, half precision) takes the J path.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from . import _distributed as _dist
from ._engine import _zeros
from ._report import BlockReport
from .graph._blocks import _find
from .graph._trace import Graph, _bits
from .solvers import gram, solve_dtype

#: one matrix-product layer of :func:`_linear_plan`: its node, saved input ``X`` [N, in], weight and bias leaves,
#: and whether the weight is ``[out, in]`` (read transposed, as ``nn.Linear``'s) rather than ``[in, out]``
_Layer = tuple[Node, Tensor, Node | None, Node | None, bool]


class _ParamsPass:
    """Mixin of :class:`impartial._backward._Run`: the pass of ``block="params"``."""

    def params_pass(self) -> None:
        """Per-task gradients of every leaf (through the blocks, or from the losses); solve on the shared ones."""
        g, k = self.g, self.g.k
        shared = [n for n in g.nodes if n in g.shared]
        others = [n for n in g.nodes if n in g.leaves and n not in g.shared and g.mask(n) & g.task_bits]
        eye = torch.eye(k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        also = self.also_grads(retain=True)
        inputs = [g.leaves[n] for n in shared + others]
        mask = 0
        for n in shared:
            mask |= g.mask(n) & g.task_bits
        ts = _bits(mask)  # tasks that reach no shared parameter take no part in the solve
        sel = slice(None) if len(ts) == k else list(ts)  # a slice: no copy of the k rows
        G = None
        cut = self.cut(shared, others)
        plan = self.linear_plan(cut, shared, others) if len(ts) == k else None
        if plan is not None:
            self.params_gram(cut, plan, shared, others, also)
            return

        def from_losses(batched: bool) -> list:
            # the loop asks row i only for the other leaves task i reaches
            needs = [[len(shared) + j for j, n in enumerate(others) if g.mask(n) >> i & 1] for i in range(k)]
            return self.task_rows(self.tasks.outs, inputs, seeds, rows=k, onehot=k, dense=len(shared), needs=needs,
                                  batched=batched)

        def compute(batched: bool) -> list:
            res = from_losses(batched) if cut is None else self.through_blocks(cut, shared, others, batched)
            if self.group is not None:  # the full-batch task gradients: the mean over the ranks
                res[:len(shared)] = [_dist.all_mean(r, self.group) for r in res[:len(shared)]]
            return res

        def named(res: list) -> list:
            nonlocal G
            out = []
            if shared:  # the Gram's diagonal is finite iff the rows are (it is needed anyway)
                G = sum(gram(r[sel].reshape(len(ts), -1)) for r in res[:len(shared)])
                out.append(([(f"the gradient of {self.tasks.names[i]!r} w.r.t. the shared parameters", i)
                             for i in ts], G.diagonal().isfinite()))
            return out + [([(f"the gradient of {self.tasks.names[i]!r} w.r.t. {g.name(n)!r}", i)
                            if i in g.tasks(n) else None for i in range(k)], r)
                          for n, r in zip(others, res[len(shared):]) if r is not None]

        # through the blocks, the per-task pass runs over the heads only: disjoint, so the loop
        rows = self.checked(compute, named, self.choose(None, g.task_bits, disjoint=cut is not None))
        for n, r in zip(others, rows[len(shared):]):
            if isinstance(r, Tensor):
                self.add(n, r.sum(0))
            elif r is not None:
                for part in r:
                    self.add(n, part)
        if shared:
            # per-parameter pieces of J: a Gram-space solver never needs them concatenated
            Js = [r[sel].reshape(len(ts), -1) for r in rows[:len(shared)]]
            ds, _, rep = self.solve(self.solvers[0], Js, ts, None, G=G)
            D = sum(J.shape[-1] for J in Js)
            self.reports.append(BlockReport(f"{len(shared)} shared parameters [{D}]", (D,),
                                            tuple(self.tasks.names[i] for i in ts), *rep,
                                            task_grads=self.passes[-1], gram_from="J"))
            for n, piece in zip(shared, ds):
                self.add(n, piece.reshape(g.leaves[n].shape))
        for n, a in also:
            self.add(n, a)

    def cut(self, shared: list[Node], others: list[Node]) -> tuple[list, list[Node]] | None:
        """``(blocks, heads)`` when every task reaches the shared parameters only through top-level automatic
        blocks (then ``J`` is one batched backward from them), else None."""
        g, tasks = self.g, self.tasks
        if tasks.fused is not None or not shared:
            return None
        _find(g, tasks)
        blocks = g.blocks
        if not blocks or any(b.above for b in blocks):
            return None
        in_block = 0
        for b in blocks:
            for i in b.tasks:
                in_block |= 1 << i
        if in_block != g.task_bits:
            return None
        leaf_blocks = {b.edge.node for b in blocks if b.leaf is not None}
        heads = []
        for n in others + shared:
            if n in leaf_blocks:
                continue
            raw = g.raw.get(n, 0)
            if raw and (n in g.shared or g.above.get(n, 0) or raw & (raw - 1)):
                return None  # a task reaches it beside every block: J needs the losses' own pass
            if raw:
                heads.append(n)
        return blocks, heads

    def _heads_pass_seeds(self, heads: list[Node]) -> tuple[list[Tensor], list[int]]:
        """One-hot seeds of the per-task pass over the heads, and the task that owns each head leaf."""
        eye = torch.eye(self.g.k, dtype=torch.float64)
        seeds = [eye[:, i].to(out.dtype) for i, out in enumerate(self.tasks.outs)]
        return seeds, [_bits(self.g.raw[n])[0] for n in heads]

    def through_blocks(self, cut: tuple[list, list[Node]], shared: list[Node], others: list[Node],
                       batched: bool) -> list:
        """The rows of ``shared + others`` (as :meth:`_Engine.task_rows` returns them) from the losses' gradients
        at the blocks (one pass over the heads) and one backward from the blocks through the trunk."""
        g, k = self.g, self.g.k
        blocks, heads = cut
        nb = len(blocks)
        seeds, owner = self._heads_pass_seeds(heads)
        targets = [b.leaf if b.leaf is not None else b.edge for b in blocks]
        needs = [[nb + h for h, c in enumerate(owner) if c == r] for r in range(k)]
        res = self.task_rows(self.tasks.outs, targets + [g.leaves[n] for n in heads], seeds, rows=k, onehot=k,
                             dense=nb, needs=needs, batched=batched)
        found: dict[Node, Tensor | list] = {b.edge.node: res[j] for j, b in enumerate(blocks) if b.leaf is not None}
        for n, c, r in zip(heads, owner, res[nb:]):
            if r is not None:  # only its task's row (the others are zeros or absent)
                found[n] = [r[c] if i == c else None for i in range(k)]
        act = [j for j, b in enumerate(blocks) if b.leaf is None]
        below = [n for n in shared + others if n not in found]
        if act and below:
            # every row seeds every block: batched (the loop only when asked for; a row's 0 × inf here is the
            # loop's too, as the rows at the blocks are the task gradients themselves)
            vjp = self.task_rows([blocks[j].edge for j in act], [g.leaves[n] for n in below], [res[j] for j in act],
                                 rows=k, onehot=0, dense=len(below), needs=None,
                                 batched=(self.force or self.task_grads) != "loop")
            self.passes.pop()  # the report names the per-task pass (the one above)
            found.update(zip(below, vjp))
        # a shared parameter no block reaches (only a leaf block does elsewhere): zero rows, as from the losses
        return [found[n] if n in found else _zeros(g.leaves[n], k) for n in shared] + [found.get(n) for n in others]

    def linear_plan(self, cut: tuple[list, list[Node]] | None, shared: list[Node],
                    others: list[Node]) -> list[_Layer] | None:
        """The layers of the path without ``J`` (see the module docstring), or None where it does not apply."""
        if cut is None or self.group is not None or len(self.solvers) != 1 or not self.solvers[0].gram_space:
            return None
        blocks, heads = cut
        if any(b.leaf is not None for b in blocks) or set(others) - set(heads):
            return None  # a parameter block, or a leaf below the blocks that wants its own per-task rows
        return _linear_plan(self.g, shared)

    def params_gram(self, cut: tuple[list, list[Node]], plan: list[_Layer], shared: list[Node],
                    others: list[Node], also: list) -> None:
        """``block="params"`` without forming ``J``: the Gram matrix from the layers' inputs and per-task output
        gradients, the weights, then each layer's gradients from its weighted output gradient."""
        g, k = self.g, self.g.k
        blocks, heads = cut
        nb = len(blocks)
        seeds, owner = self._heads_pass_seeds(heads)
        needs = [[nb + h for h, c in enumerate(owner) if c == r] for r in range(k)]
        edges = [GradientEdge(node, 0) for node, *_ in plan]
        Gs: list = []  # the Gram matrix [k, k] and the plain sum's squared norm

        def compute(batched: bool) -> list:
            res = self.task_rows(self.tasks.outs, [b.edge for b in blocks] + [g.leaves[n] for n in heads], seeds,
                                 rows=k, onehot=k, dense=nb, needs=needs, batched=batched)
            # every row seeds every block (as in through_blocks): batched unless the loop is asked for
            deltas = self.task_rows([b.edge for b in blocks], edges, res[:nb], rows=k, onehot=0, dense=len(edges),
                                    needs=None, batched=(self.force or self.task_grads) != "loop")
            self.passes.pop()  # the report names the per-task pass (the one above)
            return deltas + [[r[c] if i == c else None for i in range(k)] if r is not None else None
                             for c, r in zip(owner, res[nb:])]

        def named(res: list) -> list:
            parts = [_layer_gram(D, X, w is not None, b is not None)
                     for D, (_, X, w, b, _) in zip(res[:len(plan)], plan)]
            Gs[:] = [sum(p[0] for p in parts), sum(p[1] for p in parts)]
            out = [([(f"the gradient of {self.tasks.names[i]!r} w.r.t. the shared parameters", i)
                     for i in range(k)], Gs[0].diagonal().isfinite())]
            rows = {n: r for n, r in zip(heads, res[len(plan):])}
            return out + [([(f"the gradient of {self.tasks.names[i]!r} w.r.t. {g.name(n)!r}", i)
                            if i in g.tasks(n) else None for i in range(k)], rows[n])
                          for n in others if rows.get(n) is not None]

        rows = self.checked(compute, named, self.choose(None, g.task_bits, disjoint=True))
        for n, r in zip(heads, rows[len(plan):]):
            for part in r or ():
                self.add(n, part)
        G, plain = Gs
        solver = self.solvers[0]
        w = solver.weights(G, losses=torch.stack([out.detach() for out in self.tasks.outs]))
        got: dict[Node, Tensor] = {}
        for Dl, (_, X, wn, bn, tr) in zip(rows[:len(plan)], plan):
            dl = torch.tensordot(w.to(Dl.dtype), Dl, dims=1)  # [N, out]: the direction's output gradient
            if wn is not None:
                got[wn] = dl.T @ X if tr else X.T @ dl
            if bn is not None:
                got[bn] = dl.sum(0)
        ds = [got[n] for n in shared]
        leaves = [g.leaves[n] for n in shared]
        scale = torch.ones((), dtype=G.dtype, device=G.device)
        if self.keep_norm:
            plain = plain.clamp_min(0).sqrt()
            norm = sum(torch.linalg.vector_norm(d).to(G.dtype).pow(2) for d in ds).sqrt()
            # torch.where: a zero direction stays zero (no 0/0)
            scale = torch.where(norm > 0, plain / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                torch.zeros_like(norm))
            ds = [d.mul_(scale.to(d.dtype)) for d in ds]  # fresh products: scaled in place
        D = sum(p.numel() for p in leaves)
        self.reports.append(BlockReport(f"{len(shared)} shared parameters [{D}]", (D,), tuple(self.tasks.names),
                                        G, w, scale, task_grads=self.passes[-1], gram_from="linear"))
        for n, d in zip(shared, ds):
            self.add(n, d)
        for n, a in also:
            self.add(n, a)


def _linear_plan(g: Graph, shared: list[Node]) -> list[_Layer] | None:
    """The matrix-product layers that hold every shared parameter, or None unless the graph proves that each
    shared parameter is used once, as the weight (``mat2``, or its transpose) or the bias (a vector ``input``)
    of an ``addmm`` with ``alpha = beta = 1`` or an ``mm``, whose input ``X`` (2-D) autograd saved."""
    users: dict[Node, list[tuple[Node, int]]] = {}
    for n in g.nodes:
        for j, (c, _) in enumerate(n.next_functions):
            if c is not None:
                users.setdefault(c, []).append((n, j))
    layers: dict[Node, list] = {}
    for n in shared:
        use = users.get(n, [])
        if len(use) != 1:
            return None
        c, j = use[0]
        tr = c.name() == "TBackward0"
        if tr:  # nn.Linear: x @ weight.t()
            if len(users.get(c, [])) != 1:
                return None
            c, j = users[c][0]
        p = g.leaves[n]
        kind = c.name()
        if (kind, j) in (("AddmmBackward0", 2), ("MmBackward0", 1)) and p.dim() == 2:
            slot = 0
        elif (kind, j) == ("AddmmBackward0", 0) and p.dim() == 1:
            slot = 1
        else:
            return None
        entry = layers.setdefault(c, [None, None, False])
        if entry[slot] is not None:
            return None
        entry[slot] = n
        entry[2] |= tr and slot == 0
    plan = []
    for c, (w, b, tr) in layers.items():
        try:  # a freed graph: the J path names the error
            if c.name() == "AddmmBackward0":
                if c._saved_alpha != 1 or c._saved_beta != 1:
                    return None
                X = c._saved_mat1
            else:
                X = c._saved_self
        except RuntimeError:
            return None
        if X is None or X.dim() != 2 or X.dtype not in (torch.float32, torch.float64):
            return None
        plan.append((c, X.detach(), w, b, tr))
    return plan


def _layer_gram(D: Tensor, X: Tensor, weight: bool, bias: bool,
                kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """The Gram matrix ``[k, k]`` of one layer's parameter gradients ``Δ_iᵀ X`` (weight) and ``1ᵀ Δ_i`` (bias),
    and the squared norm of their plain sum (from ``Σ_i Δ_i``), for output gradients ``Δ`` ``[k, N, out]`` and
    input ``X`` ``[N, in]``.  ``kernel``: through ``X Xᵀ`` (True) or the weight gradients (False); None: the
    cheaper."""
    k, N, o = D.shape
    i = X.shape[1]
    S = D.sum(0)  # [N, o]: the plain sum's output gradient
    G = torch.zeros((k, k), dtype=D.dtype, device=D.device)
    plain = torch.zeros((), dtype=D.dtype, device=D.device)
    if weight:
        if kernel is None:  # multiply-adds of each way, the plain sum's row included
            kernel = N * N * i + (k + 1) * N * N * o + (k + 1) ** 2 * N * o <= (k + 1) * (N + k + 1) * i * o
        if kernel:  # through the N × N kernel X Xᵀ: no [k, out, in] gradient
            K = X @ X.T
            G = G + D.reshape(k, -1) @ (K @ D).reshape(k, -1).T
            plain = plain + (S * (K @ S)).sum()
        else:  # a batch larger than the layer: the per-task weight gradients are the cheaper way
            Jw = (D.transpose(1, 2) @ X).reshape(k, -1)
            G = G + Jw @ Jw.T
            plain = plain + (S.T @ X).pow(2).sum()
    if bias:
        b = D.sum(1)
        G = G + b @ b.T
        plain = plain + S.sum(0).pow(2).sum()
    dt = solve_dtype(D.dtype)
    return G.to(dt), plain.to(dt)
