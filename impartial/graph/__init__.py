"""The autograd graph of several losses: tracing, impartiality blocks, drawing.

:func:`trace` walks the ``grad_fn`` graphs of the losses and marks each node with the tasks that reach it;
:func:`find_blocks` returns the edges where task streams first meet (see :mod:`impartial.graph._blocks` for
the rule); :func:`draw` renders the picture (graphviz when available, else matplotlib, imported lazily).
"""

from __future__ import annotations

from ._blocks import Block, find_blocks
from ._draw import draw
from ._trace import Graph, trace

__all__ = ["Block", "Graph", "find_blocks", "trace", "draw"]
