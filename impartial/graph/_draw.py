"""Draw the traced graph: nodes coloured by the tasks that reach them, blocks highlighted, shared params marked.

Graphviz's ``dot`` lays the graph out when the ``graphviz`` Python package and its binary are installed;
otherwise a layered layout is drawn with matplotlib (both imported only when drawing).  The output format
follows the file suffix (``.svg``, ``.png``, ``.pdf``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.autograd.graph import Node

from ._inputs import Losses, Params
from ._trace import Graph, trace

__all__ = ["draw", "to_dot"]

_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_ALSO = "#bbbbbb"


def _rgb(hex_: str) -> tuple[float, float, float]:
    r, g, b = (int(hex_[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return r, g, b


def _colour(g: Graph, node: Node) -> str:
    """One task: its colour; several: the mean of their colours (lightened); only ``also``: grey."""
    ts = g.tasks(node)
    if not ts:
        return _ALSO
    cs = [_rgb(_PALETTE[t % len(_PALETTE)]) for t in ts]
    mean = [sum(c[i] for c in cs) / len(cs) for i in range(3)]
    if len(ts) > 1:
        mean = [0.5 * m + 0.5 for m in mean]
    return "#" + "".join(f"{round(255 * m):02x}" for m in mean)


def _label(g: Graph, node: Node) -> str:
    name = g.name(node)
    return name.replace("Backward0", "").replace("Backward1", "")


def _block_nodes(g: Graph) -> dict[Node, int]:
    return {b.edge.node: i for i, b in enumerate(g.blocks)}


def _roots(g: Graph) -> list[tuple[str, int, Node]]:
    """``(name, bit index, node)`` for every loss and ``also`` term."""
    names = g.task_names + g.also_names
    return [(names[i], i, node) for node, m in g.roots for i in range(len(names)) if m >> i & 1]


def to_dot(g: Graph) -> str:
    """The graph in graphviz DOT syntax (losses on top, parameters at the bottom)."""
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    blocks = _block_nodes(g)
    lines = ["digraph impartial {", '  rankdir=TB; node [style=filled, fontsize=10, fontname="Helvetica"];']
    for name, i, node in _roots(g):
        colour = _PALETTE[i % len(_PALETTE)] if i < g.k else _ALSO
        lines.append(f'  "loss{i}" [label="{name}", shape=plaintext, style="", fontcolor="{colour}"];')
        lines.append(f'  "loss{i}" -> {ids[node]} [color="{colour}"];')
    for n in g.nodes:
        attrs = [f'label="{_label(g, n)}"', f'fillcolor="{_colour(g, n)}"']
        if n in g.leaves:
            attrs.append("shape=box")
            if n in g.shared:
                attrs.append("peripheries=2")
        else:
            attrs.append("shape=ellipse")
        if n in blocks:
            attrs += ['color="#e00000"', "penwidth=3", f'xlabel="block {blocks[n]}"']
        lines.append(f"  {ids[n]} [{', '.join(attrs)}];")
    for n, c, _ in g.edges:
        lines.append(f"  {ids[n]} -> {ids[c]};")
    lines.append("}")
    return "\n".join(lines)


def _layers(g: Graph) -> dict[Node, int]:
    depth: dict[Node, int] = {}
    for n in g.nodes:  # topological: consumers first
        depth.setdefault(n, 0)
        for c, _ in n.next_functions:
            if c is not None:
                depth[c] = max(depth.get(c, 0), depth[n] + 1)
    return depth


def _matplotlib(g: Graph, path: Path) -> None:
    try:  # Figure without pyplot: no GUI backend, no global figure registry.
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "impartial.graph.draw needs matplotlib (or graphviz with its dot binary): pip install 'impartial[graph]'"
        ) from None
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch

    depth = _layers(g)
    rows: dict[int, list[Node]] = {}
    for n in g.nodes:
        rows.setdefault(depth[n], []).append(n)
    width = max(len(r) for r in rows.values())
    pos: dict[Node, tuple[float, float]] = {}
    for d, ns in rows.items():
        for j, n in enumerate(ns):
            pos[n] = ((j + 0.5) / len(ns) * width, -d)
    roots = _roots(g)
    fig = Figure(figsize=(max(6.0, 1.9 * width), max(4.0, 0.75 * (len(rows) + 2))))
    ax = fig.add_subplot()
    for n, c, _ in g.edges:
        (x0, y0), (x1, y1) = pos[n], pos[c]
        ax.annotate("", (x1, y1 + 0.18), (x0, y0 - 0.18), arrowprops=dict(arrowstyle="->", color="#888888", lw=0.8))
    for j, (name, i, node) in enumerate(roots):
        x, y = pos[node]
        colour = _PALETTE[i % len(_PALETTE)] if i < g.k else _ALSO
        lx = x + 0.5 * (j - (len(roots) - 1) / 2) / max(1, len(roots)) * width
        ax.annotate(
            name,
            (x, y + 0.18),
            (lx, y + 0.8),
            ha="center",
            fontsize=8,
            color=colour,
            arrowprops=dict(arrowstyle="->", color=colour, lw=1.0),
        )
    _boxes(ax, g, pos)
    handles: list[Any] = [
        Line2D([], [], color=_PALETTE[i % len(_PALETTE)], lw=6, label=name) for i, name in enumerate(g.task_names)
    ]
    handles += [
        Line2D([], [], color="#e00000", lw=2, label="block"),
        FancyBboxPatch((0, 0), 1, 1, fc="white", ec="#333333", hatch="//", label="shared parameter"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)
    ax.set_xlim(-0.6, width + 0.9)
    ax.set_ylim(-(len(rows) - 1) - 0.6, 1.3)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def _boxes(ax: Any, g: Graph, pos: dict[Node, tuple[float, float]]) -> None:
    """One box per node: leaves square, blocks outlined in red and labelled, shared parameters hatched."""
    from matplotlib.patches import FancyBboxPatch

    blocks = _block_nodes(g)
    for n, (x, y) in pos.items():
        is_block, is_leaf = n in blocks, n in g.leaves
        box = FancyBboxPatch(
            (x - 0.42, y - 0.17),
            0.84,
            0.34,
            boxstyle="square,pad=0.02" if is_leaf else "round,pad=0.02,rounding_size=0.12",
            fc=_colour(g, n),
            ec="#e00000" if is_block else "#333333",
            lw=3.0 if is_block else (2.0 if n in g.shared else 0.6),
            hatch="//" if n in g.shared else None,
        )
        ax.add_patch(box)
        ax.text(x, y, _label(g, n)[:22], ha="center", va="center", fontsize=6.5)
        if is_block:
            ax.text(x + 0.46, y, f"block {blocks[n]}", ha="left", va="center", fontsize=7, color="#e00000")


def _graphviz_available() -> bool:
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


def draw(
    losses: Losses,
    shared_params: Params = None,
    path: str | Path = "graph.svg",
    *,
    also: Sequence[Tensor] = (),
    engine: str | None = None,
) -> Path:
    """Render the traced graph of ``losses`` to ``path`` and return it.

    ``engine``: ``"graphviz"``, ``"matplotlib"``, or None (graphviz when its package and ``dot`` binary are
    installed, else matplotlib).
    """
    g = trace(losses, shared_params, also=also)
    path = Path(path)
    engine = engine or ("graphviz" if _graphviz_available() else "matplotlib")
    if engine == "graphviz":
        import graphviz

        src = graphviz.Source(to_dot(g))
        fmt = path.suffix.lstrip(".") or "svg"
        path.write_bytes(src.pipe(format=fmt))
    elif engine == "matplotlib":
        _matplotlib(g, path)
    else:
        raise ValueError(f"engine must be 'graphviz', 'matplotlib' or None, got {engine!r}")
    return path
