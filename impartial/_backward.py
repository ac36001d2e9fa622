"""``impartial.backward``: a drop-in for ``sum(losses).backward()`` that resolves task conflicts where they meet.

Three steps (see ``DESIGN.md``, "The picture"):

1. **Trace** the graphs of the losses and find the blocks (:mod:`impartial.graph`).
2. **Per-task gradients at each block**, from one batched backward (``is_grads_batched``) or a loop of one
   backward per task, chosen by the graph's structure (:mod:`._engine`); the parameters of one task only
   (heads) get their task's gradient in the same pass.  Where vmap cannot run an op, the loop replaces the
   batched pass and the :class:`Report` says so.
3. **Solve, then continue**: the solver maps the block's ``J [k, numel]`` to one direction (rescaled to the
   norm of the plain sum when ``keep_norm``), and a single backward from all block edges and ``also`` terms
   writes the shared parameters' gradients.

The last backward seeds block ``b`` with ``σ_b = d_b − a_b`` where ``d_b`` is its direction and ``a_b`` what
reaches it from the seeds of blocks above it (zero for a top-level block), so that exactly ``d_b`` leaves
every block.  Where some task also reaches a shared parameter on a path through no block (possible with
``shared_params`` or marked blocks that do not cover every path), the last backward seeds every task loss
too and ``σ_b = d_b − Σ_i J_b[i]``: the same gradients, with the heads traversed once more.

Every autograd call is ``torch.autograd.grad``; ``.grad`` is written only at the end, so every error (bad
input, freed graph, non-finite task gradient) leaves ``.grad`` untouched.  Post-accumulate-grad hooks on
the parameters do not run (tensor hooks do).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

from . import solvers as _solvers
from . import _distributed as _dist
from ._blocks_pass import _BlocksPass
from ._params_pass import _ParamsPass
from ._engine import TASK_GRADS, NonFinite, _Engine
from ._report import BlockReport, Report
from ._solve import _Solving
from .graph._blocks import _find
from .graph._trace import Losses, Params, _as_losses, _as_params, _bits, _build, _Losses
from .solvers import Solver, gram

__all__ = ["backward", "Report"]


def backward(losses: Losses, shared_params: Params = None, *,
             solver: Solver | str | Sequence[Solver] | None = None,
             block: str | Sequence[Tensor] = "auto", also: Sequence[Tensor] = (), per_sample: bool = False,
             keep_norm: bool = True, retain_graph: bool = False, task_grads: str = "auto",
             nonfinite: str = "raise", process_group: Any = None) -> Report:
    """Backpropagate ``losses`` (one scalar per task), resolving their conflicts where their gradients meet.

    - ``losses``: scalar tensors (a list, a dict name → loss, or a 1-D tensor), one per task.
    - ``shared_params``: the parameters whose gradients are resolved (None: inferred, the leaves that two
      or more tasks reach); ``named_parameters()`` gives readable names in errors and the report.  Every
      other leaf gets its plain gradient.
    - ``solver``: a :class:`~impartial.solvers.Solver` (default ``IMTLG()``), its name, or one solver per
      block (a stateful solver shared by several blocks would mix their states).
    - ``block``: ``"auto"`` (the blocks of :func:`impartial.graph.find_blocks`), ``"params"`` (solve on the
      shared parameters' own gradients, k vector-Jacobian products in one batched call; where the graph
      proves every shared parameter is a Linear layer's weight or bias, the Gram matrix comes from the layers'
      inputs and output gradients, without forming ``J``: ``Report.blocks[0].gram_from``), or a list of
      activations to use as blocks.
    - ``also``: terms added plainly, never tasks (a KL, a regulariser).
    - ``per_sample``: a block's leading dim is the batch: B problems of size ``k × numel/B``.  A block that
      is a parameter (read directly by several tasks) is solved as one problem.
    - ``keep_norm``: rescale each block's direction to the norm of the plain sum (per sample).
    - ``retain_graph``: as in torch.  The backward through the shared parameters frees the graph; with
      ``block="params"`` the graph is not freed early but released with the losses.
    - ``task_grads``: how the per-task gradients are computed at each block: ``"batched"`` (one vmapped
      backward, ``is_grads_batched``), ``"loop"`` (one backward per task, from its own loss), or ``"auto"``:
      the loop where the tasks' paths above the block are mostly disjoint (separate heads: each head is then
      traversed once, as in a plain backward, where a batched pass would run it on all k rows), the batched
      pass where they share most of it.  ``Report.blocks[i].task_grads`` says which ran (docs/backward.md).
    - ``nonfinite``: ``"raise"`` (a non-finite task gradient raises, naming the task, before any ``.grad`` is
      written) or ``"skip"``: such a task is dropped from the whole call (as if it had not been passed: no
      block, head or parameter receives its gradient), the others are resolved, and ``Report.skipped`` names
      it.  Stateful solvers are restored to their state before the call when a task is dropped.
    - ``process_group``: under ``torch.distributed`` (e.g. inside ``DistributedDataParallel``, each rank on its
      local batch) the default group is used when initialised; this overrides it.  Ranks exchange the block
      Gram matrices (activation blocks) or the per-task gradients (parameter blocks) so that every rank
      computes the full-batch weights; ``.grad`` is then written through autograd, so DDP's gradient
      all-reduce fires once per parameter (:mod:`impartial._distributed`, docs/distributed.md).

    Gradients accumulate into ``.grad``.  With k = 1 this is a plain backward.
    Solvers get ``losses=`` (the detached losses of the block's tasks, ``[B, k_b]`` when per-sample).
    Coordinate solvers (GradDrop) also get ``inputs=``, the block's activation, at marked blocks; at automatic
    blocks autograd keeps no handle on the activation, so they run without it (GradDrop's form without the
    input sign).  Errors name the loss or parameter and leave every ``.grad`` untouched.

    >>> from impartial.solvers import Sum
    >>> enc, x = torch.nn.Linear(3, 4), torch.randn(8, 3)
    >>> z = enc(x)
    >>> report = backward([z.sum(), z.pow(2).sum()], enc.parameters(), solver=Sum(), keep_norm=False)
    >>> report.blocks[0].name, enc.weight.grad.shape
    ('AddmmBackward0 [8, 4]', torch.Size([4, 3]))
    """
    tasks = _as_losses(losses, "losses")
    extra = _as_losses(also, "also", offset=len(tasks.outs), allow_empty=True)
    params = _as_params(shared_params)
    solvers = [_as_solver(s) for s in solver] if isinstance(solver, (list, tuple)) else [_as_solver(solver)]
    if isinstance(block, str) and block not in ("auto", "params"):
        raise ValueError(f"block must be 'auto', 'params' or a list of tensors, got {block!r}")
    if per_sample and isinstance(block, str) and block == "params":
        raise ValueError("per_sample=True needs activation blocks (parameters have no batch dim); use block='auto'")
    if task_grads not in TASK_GRADS:
        raise ValueError(f"task_grads must be one of {TASK_GRADS}, got {task_grads!r}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    mode = block if isinstance(block, str) else "explicit"
    name = repr(solvers[0]) if len(solvers) == 1 else f"[{', '.join(map(repr, solvers))}]"
    states = [copy.deepcopy(s.state_dict()) for s in solvers] if nonfinite == "skip" else []
    group = _dist.resolve_group(process_group)
    names, skipped = list(tasks.names), []
    while True:
        kept = [i for i in range(len(names)) if i not in skipped]
        sub, sub_extra = (tasks, extra) if not skipped else _subset(tasks, extra, kept)
        g = _build(sub, sub_extra, params if sub.outs else None, strict=not skipped)
        run = _Run(g, sub, sub_extra, retain_graph, task_grads=task_grads, solvers=solvers, per_sample=per_sample,
                   keep_norm=keep_norm, check_one=nonfinite == "skip", group=group)
        try:
            run.run(mode, block)
        except NonFinite as err:
            if nonfinite == "raise":
                raise FloatingPointError(str(err)) from None
            skipped.append(kept[err.task])
            for s, state in zip(solvers, states):
                s.load_state_dict(copy.deepcopy(state))
            continue
        break
    run.write()
    return Report(mode, name, tuple(tasks.names), tuple(extra.names), tuple(run.reports), run.fallback,
                  tuple(names[i] for i in sorted(skipped)))


def _subset(tasks: _Losses, extra: _Losses, kept: list[int]) -> tuple[_Losses, _Losses]:
    """The losses without the dropped tasks: masks renumbered (task ``kept[j]`` becomes bit ``j``)."""
    k, k2 = len(tasks.outs), len(kept)

    def remask(m: int) -> int:
        out = 0
        for j, i in enumerate(kept):
            out |= (m >> i & 1) << j
        return out | (m >> k) << k2

    roots = [(e, remask(m)) for e, m in tasks.roots if remask(m)]
    return (_Losses([tasks.outs[i] for i in kept], [tasks.names[i] for i in kept], roots, tasks.fused),
            _Losses(extra.outs, extra.names, [(e, remask(m)) for e, m in extra.roots]))


def _as_solver(solver: Solver | str | None) -> Solver:
    if solver is None:
        return _solvers.IMTLG()
    if isinstance(solver, str):
        return _solvers.get(solver)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a Solver or its name, got {type(solver).__name__}")
    return solver


@dataclass
class _Run(_ParamsPass, _BlocksPass, _Solving, _Engine):
    """One call: the passes of ``block="params"`` (:mod:`._params_pass`) and of the blocks
    (:mod:`._blocks_pass`), and the solve at each block (:mod:`._solve`)."""

    #: one solver for every block, or one per block (stateful solvers keep one state per block)
    solvers: list[Solver] = field(default_factory=list)
    per_sample: bool = False
    keep_norm: bool = True
    #: nonfinite="skip": check a lone task's gradient too (k = 1 is otherwise a plain, unchecked backward)
    check_one: bool = False
    reports: list[BlockReport] = field(default_factory=list)

    def run(self, mode: str, block: str | Sequence[Tensor]) -> None:
        """Every pass of one call; gradients are collected, not written."""
        g, tasks = self.g, self.tasks
        if g.k == 0:  # every task was dropped (nonfinite="skip"): the also terms only
            for n, a in self.also_grads(retain=self.retain_graph):
                self.add(n, a)
            return
        if g.k == 1:  # nothing to resolve: a plain backward
            if self.check_one:  # nonfinite="skip": a lone task is still checked (and dropped if need be)
                leaves = [g.leaves[n] for n in g.nodes if n in g.leaves and g.mask(n) & 1]
                own = tuple(r for r in self.grad(tasks.outs[:1], leaves, [torch.ones_like(tasks.outs[0])])
                            if r is not None)
                bad = self.first_bad([([([f"the gradient of {tasks.names[0]!r}"] * len(own), 0)], own)])
                if bad is not None:
                    raise NonFinite(f"{bad[0]} is not finite", 0)
            _find(g, tasks, explicit=[])
            self.blocks_pass()
        elif mode == "params":
            self.check_solvers(1)
            self.params_pass()
        else:
            _find(g, tasks, explicit=None if mode == "auto" else list(block))
            self.check_solvers(len(g.blocks))
            self.blocks_pass(auto=mode == "auto")

    def check_solvers(self, n_blocks: int) -> None:
        if len(self.solvers) > 1 and len(self.solvers) != n_blocks:
            raise ValueError(f"{len(self.solvers)} solvers were given, one per block, but there are {n_blocks} "
                             "blocks (see impartial.graph.find_blocks)")

    def also_grads(self, retain: bool) -> list[tuple[Node, Tensor]]:
        """The plain gradient of the ``also`` terms, per leaf."""
        if not self.extra.outs:
            return []
        leaves = [n for n in self.g.nodes if n in self.g.leaves and self.g.mask(n) >> self.g.k]
        out = self.grad(self.extra.outs, [self.g.leaves[n] for n in leaves],
                        [torch.ones_like(a) for a in self.extra.outs], retain=retain)
        return [(n, a) for n, a in zip(leaves, out) if a is not None]
