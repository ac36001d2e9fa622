"""The arguments of one :func:`impartial.backward` call, validated before any gradient is computed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import _distributed as _dist
from . import solvers as _solvers
from ._autograd import TASK_GRADS
from .graph._inputs import Losses, Params, _as_losses, _as_params, _Losses
from .solvers import Solver

__all__ = ["Call", "parse"]


@dataclass(frozen=True)
class Call:
    tasks: _Losses
    extra: _Losses
    params: list[tuple[str, Tensor]] | None
    #: one solver for every block, or one per block
    solvers: list[Solver]
    #: "auto", "params" or "explicit" (``marked`` holds the user's block tensors)
    mode: str
    marked: list[Tensor]
    per_sample: bool
    keep_norm: bool
    retain_graph: bool
    task_grads: str
    nonfinite: str
    group: Any
    #: how a block below others sees them: "resolved" (each task's resolved rows from above) or "direct"
    nested: str = "resolved"

    @property
    def solver_name(self) -> str:
        return repr(self.solvers[0]) if len(self.solvers) == 1 else f"[{', '.join(map(repr, self.solvers))}]"

    @property
    def keep(self) -> bool:
        """Whether every pass keeps the graph: the user asked for it, or ``nonfinite="skip"`` may have to recompute
        after dropping a task."""
        return self.retain_graph or self.nonfinite == "skip"


def parse(
    losses: Losses,
    shared_params: Params,
    solver: Solver | str | Sequence[Solver | str] | None,
    block: str | Tensor | Sequence[Tensor],
    also: Sequence[Tensor | float],
    per_sample: bool,
    keep_norm: bool,
    retain_graph: bool,
    task_grads: str,
    nonfinite: str,
    process_group: Any,
    nested: str = "resolved",
) -> Call:
    """The validated call; every error names the offending argument, loss or parameter."""
    tasks = _as_losses(losses, "losses")
    extra = _as_losses(also, "also", offset=len(tasks.outs), allow_empty=True)
    params = _as_params(shared_params)
    if isinstance(block, Tensor):
        marked, mode = [block], "explicit"
    elif isinstance(block, str):
        if block not in ("auto", "params"):
            raise ValueError(f"block must be 'auto', 'params', a tensor or a list of tensors, got {block!r}")
        marked, mode = [], block
    else:
        marked, mode = list(block), "explicit"
        if not marked:
            raise ValueError("block is an empty list: mark at least one tensor, or use block='auto'")
    if per_sample and mode == "params":
        raise ValueError("per_sample=True needs activation blocks (parameters have no batch dim); use block='auto'")
    if task_grads not in TASK_GRADS:
        raise ValueError(f"task_grads must be one of {TASK_GRADS}, got {task_grads!r}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if nested not in ("resolved", "direct"):
        raise ValueError(f"nested must be 'resolved' or 'direct', got {nested!r}")
    return Call(
        tasks,
        extra,
        params,
        _as_solvers(solver),
        mode,
        marked,
        per_sample,
        keep_norm,
        retain_graph,
        task_grads,
        nonfinite,
        _dist.resolve_group(process_group),
        nested,
    )


def _as_solvers(solver: Solver | str | Sequence[Solver | str] | None) -> list[Solver]:
    if isinstance(solver, Sequence) and not isinstance(solver, str):
        if not solver:
            raise ValueError("solver is an empty list: give one solver, or one per block")
        return [_as_solver(s, f"solver[{i}]") for i, s in enumerate(solver)]
    return [_as_solver(solver, "solver")]


def _as_solver(solver: Solver | str | None, what: str) -> Solver:
    if solver is None:
        return _solvers.IMTLG()
    if isinstance(solver, str):
        built = _solvers.get(solver)
        if not built.stateless:
            raise ValueError(
                f"{what}={solver!r} names a solver that keeps state between calls "
                f"({type(built).__name__}); built anew on every call it would never keep any. "
                f"Construct it once, e.g. s = impartial.solvers.{type(built).__name__}(), and pass the "
                "same instance on every call"
            )
        return built
    if not isinstance(solver, Solver):
        raise TypeError(f"{what} must be a Solver or its name, got {type(solver).__name__}")
    return solver


def check_solvers(call: Call, n_blocks: int) -> None:
    """One solver for all blocks, or exactly one per block."""
    if len(call.solvers) > 1 and len(call.solvers) != n_blocks:
        raise ValueError(
            f"{len(call.solvers)} solvers were given, one per block, but there are {n_blocks} blocks "
            "(see impartial.graph.find_blocks)"
        )
