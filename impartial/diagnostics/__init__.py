"""Seeing conflicts over a run: record what :func:`impartial.backward` saw at each block, plot it, summarise it.

::

    rec = impartial.diagnostics.Recorder()
    for batch in data:
        report = impartial.backward(losses(batch), model, solver=solver)
        rec.record(report)             # detached copies of a few small tensors: no host sync, no extra backward
    print(rec.summary())               # per block: conflict, imbalance, and a suggestion (the rules: _rules)
    rec.plot("conflicts.png")          # matplotlib (the 'graph' or 'examples' extra)
    rec.to_tensorboard("runs/diag")    # when torch.utils.tensorboard is available

The recorded values and how they are computed: :mod:`impartial.diagnostics._record`; the suggestion rules and
their thresholds: :mod:`impartial.diagnostics._rules`.
"""

from __future__ import annotations

from ._plot import plot, to_tensorboard
from ._record import Recorder, Series
from ._rules import BlockStats, Finding, Summary, block_stats, summarize

__all__ = [
    "BlockStats",
    "Finding",
    "Recorder",
    "Series",
    "Summary",
    "block_stats",
    "plot",
    "summarize",
    "to_tensorboard",
]
