"""``impartial.backward``: a drop-in for ``sum(losses + also).backward()`` that resolves task conflicts where they
meet.

The pipeline, one module per stage (read them in this order):

1. :mod:`._call`: the arguments, validated;
2. :mod:`.graph`: trace the losses' graphs and find the blocks; :mod:`._plan`: what each pass computes;
3. :mod:`._task_grads`: the per-task gradients at every block (and each head's own gradient);
4. :mod:`._resolve` with :mod:`._solve`: level by level, the solve at each block and its seed for the final pass
   (``block="params"``: :mod:`._params`, :mod:`._param_gram`);
5. :mod:`._final`: the final pass from the blocks, the checks, then the write through autograd's own
   ``AccumulateGrad``.

Every error (bad input, freed graph, non-finite gradient) is raised before any ``.grad`` is written
(:mod:`._checks`); every torch internal used is in :mod:`._torch_compat`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch  # noqa: F401  (the doctest's namespace)
from torch import Tensor
from torch.autograd.graph import Node

from . import _fsdp
from ._autograd import Log
from ._call import Call, check_solvers, parse
from ._checks import NonFinite, guard
from ._final import check, final_pass, totals, write
from ._params import params_stage
from ._plan import plan
from ._report import BlockReport, Report
from ._resolve import resolve
from ._task_grads import first_pass
from .graph._blocks import _find
from .graph._inputs import Losses, Params, _Losses
from .graph._trace import Graph, _build
from .solvers import Solver

__all__ = ["backward", "Report"]


def backward(
    losses: Losses,
    shared_params: Params = None,
    *,
    solver: Solver | str | Sequence[Solver | str] | None = None,
    block: str | Tensor | Sequence[Tensor] = "auto",
    also: Sequence[Tensor | float] = (),
    per_sample: bool = False,
    keep_norm: bool = True,
    retain_graph: bool = False,
    task_grads: str = "auto",
    nonfinite: str = "raise",
    process_group: Any = None,
    nested: str = "resolved",
) -> Report:
    """Backpropagate ``losses`` (one scalar per task), resolving their conflicts where their gradients meet.

    - ``losses``: one-element tensors (a list, a dict name → loss, or a 1-D tensor), one per task.
    - ``shared_params``: the parameters whose gradients are resolved (None: inferred, the leaves that two or more
      tasks reach); a module or ``named_parameters()`` gives readable names.  Parameters that do not require grad
      are left out.  With ``block="auto"`` every leaf below a block (listed or not) gets the resolved gradient,
      every leaf above the blocks (a head) its own task's gradient.
    - ``solver``: a :class:`~impartial.solvers.Solver` (default ``IMTLG()``), its name (stateless solvers only), or
      one solver per block.  A stateful solver keeps one state per block (``Solver.for_block``).
    - ``block``: ``"auto"`` (the blocks of :func:`impartial.graph.find_blocks`), ``"params"`` (solve on the shared
      parameters' own gradients; where the graph proves every shared parameter is a Linear layer's weight or
      bias, the Gram matrix comes from the layers' inputs and output gradients, without forming ``J``; with a
      1-D tensor of per-sample losses, every sample is a task and, where the graph proves each loss depends on
      its own sample only, the Gram matrix comes from one plain backward: :mod:`impartial._per_sample`), or the
      activation tensor(s) to use as blocks.
    - ``also``: terms added plainly, never tasks (a KL, a regulariser); constants add nothing.
    - ``per_sample``: a block's leading dim is the batch: B problems of size ``k × numel/B``.
    - ``keep_norm``: rescale each block's direction to the norm of the plain sum (per sample).  A Pareto-stationary
      block (its exact direction is 0) passes 0 (:mod:`impartial._solve`).
    - ``retain_graph``: as in torch: without it the graph is freed.
    - ``task_grads``: ``"batched"`` (one vmapped backward), ``"loop"`` (one backward per task) or ``"auto"``: the
      loop where the tasks' paths above the blocks are mostly disjoint, the batched pass where they share most.
    - ``nonfinite``: ``"raise"`` (a non-finite gradient raises, naming the task, ``also`` term or parameter, before
      any ``.grad`` is written) or ``"skip"``: the offending task or ``also`` term is dropped from the whole call
      (``Report.skipped`` names it; stateful solvers are restored), which needs the graph kept: with ``"skip"``
      the graph is retained as with ``retain_graph=True``.
    - ``process_group``: under ``torch.distributed`` the default group when initialised; ranks exchange the block
      Gram matrices (activation blocks) or shares of the per-task gradients (parameter blocks), under DDP or FSDP2
      (``fully_shard``: ``shared_params`` may be the sharded parameters), see docs/distributed.md.
    - ``nested``: what a block below others solves on: ``"resolved"`` (each task's gradient after the blocks above
      resolved it) or ``"direct"`` (only what reaches it on paths through no block above; what the blocks above
      send passes it unchanged: the paper's reference hooks).  Only nested blocks differ (docs/backward.md).

    Gradients accumulate into ``.grad`` through autograd's own ``AccumulateGrad``: every parameter's tensor hooks
    fire once with its whole gradient, then its post-accumulate-grad hooks, once (DDP's reducer included).  Every
    node below the blocks runs once, with the gradient it receives; a hook on a block tensor sees the resolved
    direction, once, when the block is marked or a head saved it for backward (docs/backward.md has the exact
    rules).  With ``Sum()`` and ``keep_norm=False`` the result equals ``sum(losses + also).backward()``.

    >>> from impartial.solvers import Sum
    >>> enc, x = torch.nn.Linear(3, 4), torch.randn(8, 3)
    >>> z = enc(x)
    >>> report = backward([z.sum(), z.pow(2).sum()], enc, solver=Sum(), keep_norm=False)
    >>> report.blocks[0].name, enc.weight.grad.shape
    ('AddmmBackward0 [8, 4]', torch.Size([4, 3]))
    """
    call = parse(
        losses,
        shared_params,
        solver,
        block,
        also,
        per_sample,
        keep_norm,
        retain_graph,
        task_grads,
        nonfinite,
        process_group,
        nested,
    )
    full, fsdp = _fsdp.session(call)  # FSDP2: the unsharded parameters are the leaves (None: no fully_shard)
    with _fsdp.hold(fsdp):  # FSDP's post-backward runs once, after the write
        (reports, total, g, log, notes), dropped = _attempts(full, fsdp)
        write(g, total)
    _fsdp.finish(fsdp)
    names = full.tasks.names + full.extra.names
    return Report(
        full.mode,
        full.solver_name,
        tuple(full.tasks.names),
        tuple(full.extra.names),
        tuple(reports),
        log.fallback,
        tuple(names[i] for i in sorted(dropped)),
        tuple(notes),
    )


def _attempts(full: Call, fsdp: _fsdp.Session | None) -> tuple[tuple, list[int]]:
    """``_run``'s result, and the losses dropped for a non-finite gradient (``nonfinite="skip"``: task indices, then
    ``k + j`` for the ``j``-th ``also`` term; each drop restores the stateful solvers and runs the call again)."""
    states = [copy.deepcopy(s.state_dict()) for s in full.solvers] if full.nonfinite == "skip" else []
    call, dropped = full, list[int]()
    while True:
        try:
            return _run(call, fsdp, strict=not dropped), dropped
        except NonFinite as err:
            if full.nonfinite == "raise" or err.task is None:
                raise FloatingPointError(str(err)) from None
            dropped.append(_original(full, call, err.task))
            for s, state in zip(full.solvers, states):
                s.load_state_dict(copy.deepcopy(state))
            call = _without(full, dropped)


def _run(
    call: Call, fsdp: _fsdp.Session | None, strict: bool
) -> tuple[list[BlockReport], dict[Node, Tensor], Graph, Log, list[str]]:
    """Every stage but the write: the block reports, each leaf's total, the plan, the log, warnings."""
    g = _build(call.tasks, call.extra, call.params if call.tasks.outs else None, strict=strict)
    _fsdp.prepare(fsdp, g)
    log = Log()
    with guard(g, call.tasks, call.extra):
        if call.mode == "params" and g.k > 1:
            check_solvers(call, 1)
            params_reports, params_parts, owner = params_stage(call, g, log)
            total = totals(params_parts)
            check(call, g, (), total, owner)
            return params_reports, total, g, log, []
        _find(g, call.tasks, explicit=None if call.mode == "auto" else call.marked if g.k > 1 else [])
        check_solvers(call, len(g.blocks))
        notes = _notes(call, g)
        p = plan(g, marked=call.mode != "auto")
        parts: list[tuple[Node, Tensor]] = []
        sigma: dict[int, Tensor] = {}
        reports: list[BlockReport] = []
        if p.blocks:
            first = first_pass(call, p, log)
            parts += first.heads
            sigma, reports, block_parts = resolve(call, p, log, first)
            parts += block_parts
        parts += final_pass(call, p, sigma).items()
        total = totals(parts)
        seeds = {n for n in p.finals}  # leaves the final pass reaches: not a head's alone
        owner = {n: tuple(p.layout.rows[r] for r in rs) for n, rs in zip(p.heads, p.layout.owner) if n not in seeds}
        check(call, g, p.layout.seeded, total, owner)
    return reports, total, g, log, notes


def _notes(call: Call, g: Any) -> list[str]:
    """Warnings for the report (also raised as ``UserWarning``)."""
    notes = []
    if (
        call.mode == "auto"
        and g.blocks
        and all(b.leaf is not None for b in g.blocks)
        and any(type(n).__name__ == "CompiledFunctionBackward" for n in g.nodes)
    ):
        notes.append(
            "the whole multi-loss forward was compiled as one graph (torch.compile): autograd sees one node "
            f"for it, so each of the {len(g.blocks)} shared parameters is its own block. Compile the trunk "
            "and the heads separately to resolve at the trunk's output (docs/compile.md)"
        )
    for n in notes:
        warnings.warn(n, stacklevel=4)
    return notes


def _original(full: Call, call: Call, index: int) -> int:
    """The index in the full call of loss ``index`` of the current (reduced) call."""
    k, k0 = len(call.tasks.outs), len(full.tasks.outs)
    if index < k:
        return full.tasks.names.index(call.tasks.names[index])
    return k0 + full.extra.names.index(call.extra.names[index - k])


def _without(full: Call, dropped: list[int]) -> Call:
    """The call without the dropped tasks and ``also`` terms (masks renumbered)."""
    k = len(full.tasks.outs)
    kept = [i for i in range(k) if i not in dropped]
    kept_also = [j for j in range(len(full.extra.outs)) if k + j not in dropped]
    order = kept + [k + j for j in kept_also]
    new = {old: i for i, old in enumerate(order)}

    def remask(m: int) -> int:
        return sum(1 << new[b] for b in range(m.bit_length()) if m >> b & 1 and b in new)

    roots = [(e, remask(m)) for e, m in full.tasks.roots]
    tasks = _Losses(
        [full.tasks.outs[i] for i in kept],
        [full.tasks.names[i] for i in kept],
        [(e, m) for e, m in roots if m],
        full.tasks.fused,
        full.tasks.stacked,
    )
    extra_roots = [(e, remask(m)) for e, m in full.extra.roots]
    extra = _Losses(
        [full.extra.outs[j] for j in kept_also],
        [full.extra.names[j] for j in kept_also],
        [(e, m) for e, m in extra_roots if m],
    )
    return replace(full, tasks=tasks, extra=extra)
