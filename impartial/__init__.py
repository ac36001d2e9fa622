"""impartial: resolve gradient conflicts between tasks where their gradients meet.

``impartial.backward(losses, shared_params)`` is a drop-in for ``sum(losses).backward()`` that finds the
*impartiality blocks* of the autograd graph (where the paths of several task losses meet), computes each
task's gradient there, resolves their conflicts with a solver from :mod:`impartial.solvers`, and finishes the
backward pass once.
"""

from __future__ import annotations

from . import diagnostics, graph, solvers
from ._backward import Report, backward

__all__ = ["backward", "Report", "diagnostics", "graph", "solvers"]
__version__ = "0.1.0"
