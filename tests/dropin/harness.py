"""One forward and one backward of a drawn model: plain ``sum(tasks + also).backward()`` or ``impartial.backward``."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from hypothesis import Phase, settings
from torch import Tensor

import impartial
from dropin.arch import Arch, Net, Tap
from impartial.solvers import Solver, Sum

#: one failure per test (an ``xfail(raises=AssertionError)`` must not see an ExceptionGroup); the ci profile stops
#: at the first failing example instead of shrinking it (xfailed tests stay cheap), dev and thorough shrink
FAST = settings(
    phases=[p for p in Phase if p != Phase.shrink or os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci"],
    report_multiple_bugs=False,
)


@dataclass
class Run:
    x: Tensor
    tasks: list[Tensor]
    also: list[Tensor]
    acts: dict
    report: impartial.Report | None = None


def twins(arch: Arch) -> tuple[Net, Net]:
    """Two identical copies of the model: ``(for impartial, for plain)``."""
    net = Net(arch)
    return net, copy.deepcopy(net)


def block_arg(net: Net, mode: str, acts: dict) -> str | list[Tensor]:
    return net.marked(acts) if mode == "marked" else mode


def forward(net: Net, tap: Tap | None = None, micro: int = 0) -> Run:
    x = net.input(micro)
    tasks, also, acts = net.losses(x, tap or Tap(), micro)
    return Run(x, tasks, also, acts)


def backward(
    net: Net,
    run: Run,
    how: str,
    mode: str,
    *,
    retain_graph: bool = False,
    solver: Solver | list | None = None,
    keep_norm: bool = False,
) -> Run:
    """``how="plain"``: ``sum(tasks + also).backward()``; ``how="impartial"``: the drop-in call."""
    if how == "plain":
        sum(run.tasks + run.also).backward(retain_graph=retain_graph)
    else:
        run.report = impartial.backward(
            run.tasks,
            net.shared(),
            solver=Sum() if solver is None else solver,
            keep_norm=keep_norm,
            also=run.also,
            block=block_arg(net, mode, run.acts),
            retain_graph=retain_graph,
        )
    return run


def step(net: Net, how: str, mode: str, tap: Tap | None = None, micro: int = 0, **kw) -> Run:
    return backward(net, forward(net, tap, micro), how, mode, **kw)
