"""Level by level: the rows of each block (pulled from the blocks above), its solve, and its seed for the final
pass.

A block below others (nested) sees, with ``nested="resolved"``, each task's gradient when that task's resolved rows
leave every block above; the final pass seeds block ``b`` with ``σ_b = d_b − a_b``, ``d_b`` its direction and ``a_b``
what reaches it from the seeds of blocks above it (zero for a top-level block; the pull computes it on an extra
row), so that exactly ``d_b`` leaves every block.  With ``nested="direct"`` (the reference implementation's hooks) a
block sees only what reaches it on paths through no block above (the pull subtracts the rest), and what arrives
from the blocks above passes it unchanged: ``σ_b = d_b``, and ``a_b + d_b`` leaves it.  Where some task also
reaches a leaf on a path through no block (``Layout.plain``), the final pass seeds every task loss too and
``σ_b = d_b − Σ_i J_b[i]``: the same gradients, with the heads traversed once more.  A parameter block's ``σ`` is
its gradient part directly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import Node

from ._autograd import Log
from ._call import Call
from ._plan import Plan
from ._report import BlockReport
from ._solve import solve_level
from ._task_grads import First, pull

__all__ = ["resolve"]


def resolve(
    call: Call, plan: Plan, log: Log, first: First
) -> tuple[dict[int, Tensor], list[BlockReport], list[tuple[Node, Tensor]]]:
    """``(σ per block, the block reports, the parameter blocks' gradient parts)``."""
    blocks, K, plain = plan.blocks, plan.K, plan.layout.plain
    how = log.passes[-1]
    rows = {j: first.raw[j][plan.sel[j]] for j in plan.levels[0]}
    grams = dict(first.grams)
    corr: dict[int, Tensor] = {}  # block -> [K, *shape]: resolved minus incoming task gradients
    sigma: dict[int, Tensor] = {}
    arrival: dict[int, Tensor] = {}
    reports: dict[int, BlockReport] = {}
    parts: list[tuple[Node, Tensor]] = []
    for L, lvl in enumerate(plan.levels):
        if L:
            got, arr, gr = pull(call, plan, log, lvl, first.raw, corr, sigma)
            rows.update(got)
            arrival.update(arr)
            grams.update(gr)
        solved = solve_level(call, plan, lvl, rows, grams)
        for j in lvl:
            b, r, s = blocks[j], rows[j], solved[j]
            reports[j] = BlockReport(
                b.name,
                tuple(r.shape[1:]),
                tuple(call.tasks.names[i] for i in b.tasks),
                s.G,
                s.w,
                s.scale,
                above=b.above,
                task_grads=how,
                status=s.status,
            )
            if j in plan.has_below:  # the correction the pull carries down: resolved minus raw, or minus raw
                c = s.R - r if call.nested == "resolved" else -r  # type: ignore[operator]
                if isinstance(plan.sel[j], slice):
                    corr[j] = c
                else:
                    corr[j] = torch.zeros((K, *r.shape[1:]), dtype=r.dtype, device=r.device)
                    corr[j][plan.sel[j]] = c
            base = r.sum(0) if plain else arrival.get(j) if call.nested == "resolved" else None
            sigma[j] = s.d if base is None else s.d - base
            if b.leaf is not None:
                parts.append((b.edge.node, sigma[j]))
    return sigma, [reports[j] for j in range(len(blocks))], parts
