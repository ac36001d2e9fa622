"""Pictures of a recording: a PNG with matplotlib, and TensorBoard scalars (both optional, imported lazily).

One row per block: the conflict over steps (the fraction of task pairs with a negative cosine, and the smallest
cosine), the norm imbalance (largest over smallest task-gradient norm, log scale), the solver's weights, and the
cosine matrix at a few chosen steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..graph._draw import _PALETTE  # one colour per task, as in the graph pictures
from ._record import Recorder, Series

__all__ = ["plot", "to_tensorboard"]


def _figure(**kwargs: Any) -> Any:
    try:  # Figure without pyplot: no GUI backend, no global figure registry
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "impartial.diagnostics plots need matplotlib: pip install 'impartial[graph]' (or the 'examples' extra)"
        ) from None
    return Figure(**kwargs)


def _smooth(x: Tensor) -> Tensor:
    """A centred moving average over about a fiftieth of the run (NaN and inf left out)."""
    n = max(1, len(x) // 50)
    ok = x.isfinite()
    v = torch.where(ok, x, 0.0)
    kernel = torch.ones(1, 1, 2 * n + 1, dtype=x.dtype)
    num = torch.nn.functional.conv1d(v[None, None], kernel, padding=n)[0, 0]
    den = torch.nn.functional.conv1d(ok.to(x.dtype)[None, None], kernel, padding=n)[0, 0]
    return torch.where(den > 0, num / den.clamp_min(1), float("nan"))


def _line(ax: Any, s: Series, y: Tensor, colour: str, label: str) -> None:
    steps = s.steps.numpy()  # numpy for matplotlib: it converts tensors through a deprecated path
    ax.plot(steps, y.numpy(), color=colour, alpha=0.25, lw=0.8)
    ax.plot(steps, _smooth(y).numpy(), color=colour, lw=1.6, label=label)


def _block(fig: Any, axes: Sequence[Any], s: Series, at: list[int]) -> None:
    a_conf, a_imb, a_w, *a_cos = axes
    _line(a_conf, s, s.conflict, "#d62728", "negative pairs (fraction)")
    _line(a_conf, s, s.min_cosine, "#1f77b4", "smallest cosine")
    a_conf.axhline(0, color="#888888", lw=0.6)
    a_conf.set_ylim(-1.05, 1.05)
    a_conf.set_title("conflict", fontsize=9)
    a_conf.legend(fontsize=7, loc="lower left", frameon=False)
    imb = s.imbalance
    finite = imb[imb.isfinite()]
    _line(a_imb, s, torch.where(imb.isfinite(), imb, float("nan")), "#2ca02c", "largest / smallest norm")
    a_imb.set_yscale("log")
    med = f"median {float(finite.median()):.3g}×" if len(finite) else "a task gradient is zero"
    a_imb.set_title(f"norm imbalance ({med})", fontsize=9)
    if s.weights.isnan().all():
        a_w.text(0.5, 0.5, "the solver has no weights", ha="center", va="center", fontsize=8)
        a_w.set_axis_off()
    else:
        for i, t in enumerate(s.tasks):
            _line(a_w, s, s.weights[:, i], _PALETTE[i % len(_PALETTE)], t)
        a_w.set_title("solver weights", fontsize=9)
        if len(s.tasks) <= 10:
            a_w.legend(fontsize=6, loc="best", frameon=False)
    for ax in (a_conf, a_imb, a_w):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax, i in zip(a_cos, at):
        im = _heatmap(ax, s.cosine[i], s.tasks, f"cosines, step {int(s.steps[i])}")
    fig.colorbar(im, ax=list(a_cos), shrink=0.8)


def _heatmap(ax: Any, cos: Tensor, tasks: Sequence[str], title: str) -> Any:
    im = ax.imshow(cos.numpy(), cmap="RdBu", vmin=-1, vmax=1)
    k = len(tasks)
    names = [t if len(t) <= 12 else t[:11] + "…" for t in tasks]
    ax.set_xticks(range(k), names, rotation=90, fontsize=6)
    ax.set_yticks(range(k), names, fontsize=6)
    ax.set_title(title, fontsize=9)
    if k <= 6:  # small matrices: the numbers too
        for r in range(k):
            for c in range(k):
                ax.text(c, r, f"{float(cos[r, c]):.2f}", ha="center", va="center", fontsize=6)
    return im


def plot(
    rec: Recorder, path: str | Path, *, steps: Sequence[int] | None = None, blocks: Sequence[int | str] | None = None
) -> Path:
    """Save the recording as a PNG (or any format matplotlib writes) at ``path`` and return it.

    ``steps``: where to draw the cosine matrix (the nearest records; default: the first, middle and last);
    ``blocks``: which blocks (positions or labels; default: all).
    """
    chosen = range(len(rec.blocks)) if blocks is None else blocks
    series = [rec.series(b) for b in chosen]
    if not series:
        raise ValueError("nothing to plot: the recorder has no block (record the Report of impartial.backward)")
    n_cos = len(steps) if steps is not None else 3
    fig = _figure(figsize=(3.7 * max(3, n_cos), 6.6 * len(series)), layout="constrained")
    for s, sub in zip(series, fig.subfigures(len(series), 1, squeeze=False)[:, 0]):
        # per block: the curves over steps above, the cosine matrices below
        top, bottom = sub.subfigures(2, 1, height_ratios=[1, 1.1])
        sub.suptitle(f"{s.block} ({', '.join(s.tasks) if len(s.tasks) <= 6 else f'{len(s.tasks)} tasks'})", fontsize=11)
        T = len(s.steps)
        at = [s.at(st) for st in steps] if steps is not None else [0, T // 2, T - 1]
        _block(bottom, [*top.subplots(1, 3), *bottom.subplots(1, n_cos, squeeze=False)[0]], s, at)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def to_tensorboard(rec: Recorder, writer: Any, *, prefix: str = "impartial") -> None:
    """Write every record not written before as TensorBoard scalars (``<prefix>/block i/...``): conflict, smallest
    cosine, imbalance, ratio, and each task's norm and weight; and the last cosine matrix as a figure when
    matplotlib is installed.  ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` or a log directory."""
    if isinstance(writer, (str, Path)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "logging to TensorBoard needs the tensorboard package: pip install tensorboard"
            ) from None
        writer = SummaryWriter(str(writer))
    done = rec._written
    for i, label in enumerate(rec.blocks):
        s = rec.series(i)
        start = done.get(label, 0)
        tag = f"{prefix}/{label.split(':')[0]}"
        cols = {"conflict": s.conflict, "min_cosine": s.min_cosine, "imbalance": s.imbalance, "ratio": s.ratio}
        cols |= {f"norm/{t}": s.norms[:, j] for j, t in enumerate(s.tasks)}
        if not s.weights.isnan().all():
            cols |= {f"weight/{t}": s.weights[:, j] for j, t in enumerate(s.tasks)}
        for n in range(start, len(s.steps)):
            for name, v in cols.items():
                writer.add_scalar(f"{tag}/{name}", float(v[n]), int(s.steps[n]))
        if len(s.steps) > start:
            try:
                fig = _figure(figsize=(4, 3.4), layout="constrained")
            except ModuleNotFoundError:  # the scalars are written; the picture needs matplotlib
                pass
            else:
                fig.colorbar(_heatmap(fig.subplots(), s.cosine[-1], s.tasks, f"{label}: cosines"))
                writer.add_figure(f"{tag}/cosine", fig, int(s.steps[-1]))
        done[label] = len(s.steps)
    writer.flush()
