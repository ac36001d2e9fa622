"""``block="params"`` without forming ``J``: the Gram matrix from each Linear layer's input and per-task output
gradients, then each layer's direction from its weighted output gradient.

For a matrix-product layer (``nn.Linear``: ``AddmmBackward0`` / ``MmBackward0``) with input ``X`` ``[N, in]``, task
``i``'s weight gradient is ``Δ_iᵀ X`` for its output gradient ``Δ_i`` ``[N, out]``, so
``⟨Δ_iᵀX, Δ_jᵀX⟩ = ⟨Δ_i, (X Xᵀ) Δ_j⟩``, and the bias adds ``(1ᵀΔ_i)·(1ᵀΔ_j)``.  The batched backward through the trunk
then computes the ``Δ_i`` only (no weight gradients), and the direction ``wᵀJ`` needs no backward: per layer the
weight's ``(Σ_i w_i Δ_i)ᵀ X`` and the bias's ``1ᵀ Σ_i w_i Δ_i`` (one ``[out, N] × [N, in]`` product, as autograd's own
for the plain sum).  ``keep_norm`` takes the plain sum's norm from ``Σ_i Δ_i``.

It runs only where the graph proves it applies (:func:`linear_layers`): through top-level automatic blocks, a
Gram-space solver, one process, and every shared parameter the weight or bias of one matrix product with
``alpha = beta = 1`` whose 2-D input autograd saved without a hook.  Elsewhere the J path runs;
``BlockReport.gram_from`` says which ran.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from . import _autograd
from ._autograd import Log, Rows, checked, choose, rows
from ._call import Call
from ._checks import Check, said
from ._report import BlockReport
from ._solve import rescale_pieces
from ._torch_compat import linear_saved
from .graph._trace import Graph
from .solvers import GramSolver, solve_dtype

__all__ = ["Layer", "linear_layers", "params_gram", "layer_gram"]

#: one matrix-product layer: its node, saved input ``X`` [N, in], weight and bias leaves, and whether the weight
#: is ``[out, in]`` (read transposed, as ``nn.Linear``'s) rather than ``[in, out]``
Layer = tuple[Node, Tensor, Node | None, Node | None, bool]


def linear_layers(call: Call, g: Graph, cut: object, shared: list[Node], others: list[Node]) -> list[Layer] | None:
    """The layers of the path without ``J``, or None where it does not apply."""
    blocks, heads = cut.blocks, cut.heads  # type: ignore[attr-defined]
    if call.group is not None or len(call.solvers) != 1 or not call.solvers[0].gram_space:
        return None
    if any(b.leaf is not None for b in blocks) or set(others) - set(heads):
        return None  # a parameter block, or a leaf below the blocks that wants its own per-task rows
    return matrix_layers(g, shared)


def matrix_layers(g: Graph, shared: list[Node]) -> list[Layer] | None:
    """The matrix-product layers that hold every shared parameter, or None unless the graph proves that each shared
    parameter is used once, as the weight (``mat2``, or its transpose) or the bias (a vector ``input``) of an
    ``addmm`` with ``alpha = beta = 1`` or an ``mm``, whose 2-D input autograd saved."""
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
    out = []
    for c, (w, b, tr) in layers.items():
        X, alpha, beta = linear_saved(c)
        if alpha != 1 or beta != 1 or X is None or X.dim() != 2 or X.dtype not in (torch.float32, torch.float64):
            return None
        out.append((c, X.detach(), w, b, tr))
    return out


def layer_gram(D: Tensor, X: Tensor, weight: bool, bias: bool, kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """The Gram matrix ``[k, k]`` of one layer's parameter gradients ``Δ_iᵀ X`` (weight) and ``1ᵀ Δ_i`` (bias), and the
    squared norm of their plain sum (from ``Σ_i Δ_i``), for output gradients ``Δ`` ``[k, N, out]`` and input ``X``
    ``[N, in]``.  ``kernel``: through ``X Xᵀ`` (True) or the weight gradients (False); None: the cheaper."""
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
    G = G.to(dt)
    return (G + G.mT) / 2, plain.to(dt)  # symmetric by construction (BLAS promises no bitwise symmetry)


def params_gram(
    call: Call,
    g: Graph,
    log: Log,
    blocks: list,
    heads: list[Node],
    layers: list[Layer],
    shared: list[Node],
    others: list[Node],
) -> tuple[BlockReport, list[tuple[Node, Tensor]]]:
    """The Gram matrix from the layers' inputs and per-task output gradients, the weights, then each layer's
    gradients from its weighted output gradient."""
    res, G, plain = _layer_rows(call, g, log, blocks, heads, layers)
    parts = [(n, p) for n, r in zip(heads, res.sparse) for p in r if p is not None]
    solver = call.solvers[0]  # one problem: the solver itself (its own state)
    assert isinstance(solver, GramSolver)  # linear_layers takes this path for Gram-space solvers only
    sol = solver.solve(G, losses=torch.stack(call.tasks.outs).detach(), precision=layers[0][1].dtype)
    w = sol.weights
    got: dict[Node, Tensor] = {}
    for Dl, (_, X, wn, bn, tr) in zip(res.dense, layers):
        dl = torch.tensordot(w.to(Dl.dtype), Dl, dims=1)  # [N, out]: the direction's output gradient
        if wn is not None:
            got[wn] = dl.T @ X if tr else X.T @ dl
        if bn is not None:
            got[bn] = dl.sum(0)
    ds = [got[n] for n in shared]
    flat, scale, status = rescale_pieces(call, ds, G, sol, layers[0][1].dtype, lambda c: plain.clamp_min(0) * c * c)
    D = sum(g.leaves[n].numel() for n in shared)
    name = f"{len(shared)} shared parameters [{D}]"
    rep = BlockReport(
        name, (D,), tuple(call.tasks.names), G, w, scale, task_grads=log.passes[-1], gram_from="linear", status=status
    )
    return rep, parts + [(n, f.view_as(d)) for n, f, d in zip(shared, flat, ds)]


def _layer_rows(
    call: Call, g: Graph, log: Log, blocks: list, heads: list[Node], layers: list[Layer]
) -> tuple[Rows, Tensor, Tensor]:
    """Every layer's per-task output gradients (one batched backward from the blocks), the heads' own gradients,
    checked; the Gram matrix ``[k, k]`` and the plain sum's squared norm from them."""
    from ._params import Cut, heads_pass

    k = g.k
    edges = [GradientEdge(node, 0) for node, *_ in layers]
    Gs: list[Tensor] = []  # the Gram matrix [k, k] and the plain sum's squared norm

    def compute(batched: bool) -> Rows:
        res = heads_pass(call, g, log, Cut(blocks, heads), batched)
        # every row seeds every block (as through the blocks): batched unless the loop is asked for; the last pass
        deltas = rows(
            log,
            [b.edge for b in blocks],
            edges,
            res.dense,
            n=k,
            onehot=0,
            dense=len(edges),
            needs=None,
            batched=(_autograd.FORCE or call.task_grads) != "loop",
            retain=call.keep,
            structure=(g.key, "deltas"),
        )
        log.passes.pop()  # the report names the per-task pass (the one above)
        return Rows(deltas.dense, res.sparse)

    def checks(res: Rows) -> list[Check]:
        parts = [layer_gram(D, X, w is not None, b is not None) for D, (_, X, w, b, _) in zip(res.dense, layers)]
        Gs[:] = [parts[0][0], parts[0][1]]
        for G_l, plain_l in parts[1:]:
            Gs[:] = [Gs[0] + G_l, Gs[1] + plain_l]
        names = call.tasks.names
        msgs = [(i, said("the gradient of {!r} w.r.t. the shared parameters", names[i])) for i in range(k)]
        return [Check(Gs[0].diagonal().isfinite(), msgs)]
        # the heads' gradients are checked with every leaf's total (impartial._final.check)

    res = checked(log, compute, checks, choose(call.task_grads, g, None, g.task_bits, disjoint=True), call.group)
    return res, Gs[0], Gs[1]
