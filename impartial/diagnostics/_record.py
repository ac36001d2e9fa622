"""The recorder: what every :func:`impartial.backward` call saw at each block, kept over a run.

Everything comes from the :class:`~impartial.Report` the call returns (no extra backward): per block the Gram
matrix ``G`` of the task gradients, the solver's weights ``w`` and the ``keep_norm`` scale.  While training the
recorder only keeps detached copies of those small tensors on their device (no host sync); they are moved to the
host and reduced when something reads them (:meth:`Recorder.series`, a plot, a summary, :meth:`state_dict`).

Per block and recorded step, from ``G`` ``[k, k]``:

- the task-gradient norms ``n_i = sqrt(G_ii)`` and the cosine matrix ``G_ij / (n_i n_j)`` (0 for a zero
  gradient);
- the *conflict*: the fraction of task pairs ``i < j`` with a negative cosine, and the smallest cosine;
- the *imbalance*: ``max_i n_i / min_i n_i`` (inf when a task's gradient is zero);
- the solver's weights (Gram-space solvers; the mean over samples with ``per_sample=True``; NaN otherwise);
- the *ratio* of the solver's direction's length to the plain sum's, before ``keep_norm``:
  ``sqrt(wᵀGw / 1ᵀG1)`` from the weights, else ``1 / scale`` (which needs ``keep_norm=True``: NaN without);
  0 where the block was Pareto-stationary and passed 0;
- the fraction of the block's problems the solver reported STATIONARY.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._report import Report, cosine
from ..solvers import Status

__all__ = ["Recorder", "Series"]


@dataclass(frozen=True)
class Series:
    """One block's recording, on the host in float64: ``T`` recorded steps of ``k`` tasks."""

    #: ``"block i: <grad_fn>"`` (the batch shape left out: it changes with the last batch of an epoch)
    block: str
    tasks: tuple[str, ...]
    #: ``[T]`` the step of each record (the call count, or the ``step=`` given)
    steps: Tensor
    #: ``[T, k, k]`` the Gram matrix of the task gradients at the block
    gram: Tensor
    #: ``[T, k]`` the solver's weights (NaN where the solver has none)
    weights: Tensor
    #: ``[T]`` the solver's direction's length over the plain sum's, before ``keep_norm``
    ratio: Tensor
    #: ``[T]`` the fraction of the block's problems that were Pareto-stationary
    stationary: Tensor

    @property
    def norms(self) -> Tensor:
        """``[T, k]`` the task-gradient norms."""
        return self.gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()

    @property
    def cosine(self) -> Tensor:
        """``[T, k, k]`` the cosine matrices."""
        return cosine(self.gram)

    def _pairs(self) -> Tensor:
        k = len(self.tasks)
        i, j = torch.triu_indices(k, k, offset=1)
        return self.cosine[:, i, j]

    @property
    def conflict(self) -> Tensor:
        """``[T]`` the fraction of task pairs whose gradients have a negative cosine."""
        return (self._pairs() < 0).double().mean(-1)

    @property
    def min_cosine(self) -> Tensor:
        """``[T]`` the smallest cosine between two tasks."""
        return self._pairs().amin(-1)

    @property
    def imbalance(self) -> Tensor:
        """``[T]`` the largest task-gradient norm over the smallest (inf when one is zero)."""
        n = self.norms
        top, low = n.amax(-1), n.amin(-1)
        return torch.where(low > 0, top / torch.where(low > 0, low, 1.0), math.inf)

    def at(self, step: int) -> int:
        """The index of the record nearest to ``step``."""
        return int((self.steps - step).abs().argmin())


@dataclass
class _Track:
    block: str
    tasks: tuple[str, ...]
    pending: list[tuple[int, Tensor, Tensor | None, Tensor, Tensor | None]] = field(default_factory=list)
    host: list[tuple[int, Tensor, Tensor, float, float]] = field(default_factory=list)


def _base(name: str) -> str:
    """A block's name without its shape (``"AddmmBackward0 [128, 16] #2"`` → ``"AddmmBackward0 #2"``)."""
    return re.sub(r" \[[0-9, ]*\]", "", name)


class Recorder:
    """Collects each block's task-gradient geometry and the solver's answer over training.

    ``every``: record every ``every``-th call (memory grows by ``k² + k + 2`` numbers per block per record);
    ``keep_norm``: whether the calls use ``keep_norm=True`` (the default of :func:`impartial.backward`; solvers
    without weights and ``per_sample=True`` blocks read the length ratio from the ``keep_norm`` scale).

    Blocks are told apart by their position in :attr:`Report.blocks`, their ``grad_fn`` and their tasks (a task
    dropped by ``nonfinite="skip"`` starts a new track).

    >>> import impartial
    >>> from impartial.diagnostics import Recorder
    >>> enc, x = torch.nn.Linear(3, 4), torch.randn(8, 3)
    >>> rec = Recorder()
    >>> for _ in range(3):
    ...     z = enc(x)
    ...     rec.record(impartial.backward([z.sum(), -z.pow(2).sum()], enc))
    >>> s = rec.series(0)
    >>> s.steps.tolist(), s.norms.shape, s.cosine.shape
    ([0, 1, 2], torch.Size([3, 2]), torch.Size([3, 2, 2]))
    """

    def __init__(self, every: int = 1, keep_norm: bool = True) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every, self.keep_norm = every, keep_norm
        self.calls = 0
        self._tracks: dict[tuple[int, str, tuple[str, ...]], _Track] = {}
        self._written: dict[str, int] = {}  # records already sent to TensorBoard, per block
        #: the solvers of the recorded calls (``Report.solver``), in the order first seen
        self.solvers: tuple[str, ...] = ()

    def record(self, report: Report, step: int | None = None) -> None:
        """Keep ``report``'s block values (detached copies, on their device) for step ``step`` (default: the
        number of calls recorded before, counting from 0)."""
        if not isinstance(report, Report):
            raise TypeError(f"record() takes the Report that impartial.backward returns, got {type(report).__name__}")
        step = self.calls if step is None else int(step)
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        if report.solver not in self.solvers:
            self.solvers += (report.solver,)
        for i, b in enumerate(report.blocks):
            key = (i, _base(b.name), b.tasks)
            track = self._tracks.setdefault(key, _Track(f"block {i}: {_base(b.name)}", b.tasks))
            # copies: a solver may update its weight tensor in place on the next call (async on a device)
            track.pending.append(
                (
                    step,
                    b.gram.detach().clone(),
                    None if b.weights is None else b.weights.detach().clone(),
                    b.scale.detach().clone(),
                    None if b.status is None else b.status.detach().clone(),
                )
            )

    @property
    def blocks(self) -> tuple[str, ...]:
        """The recorded blocks' labels, in the order first seen."""
        return tuple(t.block for t in self._tracks.values())

    def series(self, block: int | str) -> Series:
        """One block's recording (by position in :attr:`blocks` or label), moved to the host."""
        tracks = list(self._tracks.values())
        if isinstance(block, int):
            if not 0 <= block < len(tracks):
                raise IndexError(f"block {block} out of range: {len(tracks)} recorded ({', '.join(self.blocks)})")
            t = tracks[block]
        else:
            match = [t for t in tracks if t.block == block]
            if not match:
                raise KeyError(f"no recorded block {block!r}; recorded: {', '.join(self.blocks) or 'none'}")
            t = match[0]
        self._to_host(t)
        if not t.host:
            raise ValueError(f"{t.block!r} has no record")
        steps, G, w, r, s = zip(*t.host)
        return Series(
            t.block,
            t.tasks,
            torch.tensor(steps),
            torch.stack(G),
            torch.stack(w),
            torch.tensor(r, dtype=torch.float64),
            torch.tensor(s, dtype=torch.float64),
        )

    def _to_host(self, t: _Track) -> None:
        if not t.pending:
            return
        rows = [_reduce(G, w, scale, status, self.keep_norm) for _, G, w, scale, status in t.pending]
        k = len(t.tasks)
        for (step, *_), row in zip(t.pending, torch.stack(rows).cpu()):  # one transfer per track
            t.host.append((step, row[: k * k].reshape(k, k), row[k * k : k * k + k], float(row[-2]), float(row[-1])))
        t.pending.clear()

    def state_dict(self) -> dict[str, Any]:
        """The recording as plain Python values (JSON-serialisable), for :meth:`load_state_dict`."""
        out = []
        for (i, name, tasks), t in self._tracks.items():
            self._to_host(t)
            out.append(
                {
                    "index": i,
                    "name": name,
                    "block": t.block,
                    "tasks": list(tasks),
                    "steps": [h[0] for h in t.host],
                    "gram": [h[1].tolist() for h in t.host],
                    "weights": [h[2].tolist() for h in t.host],
                    "ratio": [h[3] for h in t.host],
                    "stationary": [h[4] for h in t.host],
                }
            )
        return {
            "every": self.every,
            "keep_norm": self.keep_norm,
            "calls": self.calls,
            "solvers": list(self.solvers),
            "tracks": out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the recording with one from :meth:`state_dict`."""
        self.every, self.keep_norm, self.calls = int(state["every"]), bool(state["keep_norm"]), int(state["calls"])
        self.solvers = tuple(state["solvers"])
        self._tracks, self._written = {}, {}
        for d in state["tracks"]:
            t = _Track(d["block"], tuple(d["tasks"]))
            t.host = [
                (
                    int(s),
                    torch.tensor(G, dtype=torch.float64),
                    torch.tensor(w, dtype=torch.float64),
                    float(r),
                    float(st),
                )
                for s, G, w, r, st in zip(d["steps"], d["gram"], d["weights"], d["ratio"], d["stationary"])
            ]
            self._tracks[(int(d["index"]), d["name"], t.tasks)] = t

    def summary(self) -> Any:
        """A plain-language :class:`~impartial.diagnostics.Summary` of the run, with a suggestion per block."""
        from ._rules import summarize

        return summarize(self)

    def plot(self, path: Any, **kwargs: Any) -> Any:
        """:func:`impartial.diagnostics.plot` of this recording."""
        from ._plot import plot

        return plot(self, path, **kwargs)

    def to_tensorboard(self, writer: Any, **kwargs: Any) -> None:
        """:func:`impartial.diagnostics.to_tensorboard` of the records not written before."""
        from ._plot import to_tensorboard

        to_tensorboard(self, writer, **kwargs)

    def __repr__(self) -> str:
        return f"Recorder({self.calls} calls, {len(self._tracks)} blocks, every={self.every})"


def _reduce(G: Tensor, w: Tensor | None, scale: Tensor, status: Tensor | None, keep_norm: bool) -> Tensor:
    """One record as a vector on its device: ``G`` (summed over samples), the mean weights, the ratio and the
    stationary fraction (see the module docstring)."""
    G = G.double()
    k = G.shape[-1]
    Gs = G.reshape(-1, k, k).sum(0)
    nan = torch.full((), math.nan, dtype=torch.float64, device=G.device)
    if w is not None and w.shape[:-1] == G.shape[:-2]:  # one Gram per problem: the ratio from the weights
        w = w.double()
        num = torch.einsum("...i,...ij,...j->...", w, G, w).clamp_min(0)
        den = G.sum((-1, -2))
        r = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), math.nan).sqrt().mean()
    elif keep_norm:
        s = scale.double()
        r = torch.where(s > 0, 1 / torch.where(s > 0, s, 1.0), 0.0).mean()
    else:
        r = nan
    wm = nan.expand(k) if w is None else w.double().reshape(-1, k).mean(0)
    st = (
        torch.zeros((), dtype=torch.float64, device=G.device)
        if status is None
        else (status == int(Status.STATIONARY)).double().mean()
    )
    return torch.cat([Gs.reshape(-1), wm, r.reshape(1), st.reshape(1)])
