"""What :func:`impartial.backward` did: blocks, tasks at each, task-gradient cosines and solver weights.

Values are kept as tensors (no device sync while training); they are read only when the report is printed.  A block
of up to :data:`TABLE_TASKS` tasks prints its cosine matrix; a larger one (every sample a task: hundreds) prints
:meth:`BlockReport.summary` (the spread of the task-gradient norms, the fraction of conflicting pairs, the spread
of the weights), and the full matrices stay available as tensors (``gram``, ``cosine``, ``weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import Status

__all__ = ["Report", "BlockReport", "TABLE_TASKS"]

#: the most tasks a block prints as a cosine table; above it, summary statistics
TABLE_TASKS = 12


@dataclass(frozen=True)
class BlockReport:
    """One block: its name (``grad_fn`` and shape), its tasks, and the task gradients' geometry there.

    ``gram`` ``[k_b, k_b]`` is the Gram matrix of the task gradients at the block (over the whole block, all
    samples) and ``cosine`` its cosine matrix (computed when read); ``weights`` the solver's weights
    (Gram-space solvers; ``[B, k_b]`` when per-sample), else None (the mean over samples is printed when
    per-sample); ``scale`` the ``keep_norm`` factor (1 when off).
    """

    name: str
    shape: tuple[int, ...]
    tasks: tuple[str, ...]
    gram: Tensor
    weights: Tensor | None
    scale: Tensor
    above: tuple[int, ...] = ()
    #: how the per-task gradients were computed: "batched" (one vmapped backward) or "loop" (one per task)
    task_grads: str = "batched"
    #: ``block="params"`` only: how ``gram`` and the direction were computed: "J" (the per-task gradients of the
    #: shared parameters were formed), "linear" (from each matrix-product layer's input and per-task output
    #: gradients, then one weighted backward; ``J`` never formed) or "per-sample" (every task one sample: from each
    #: layer's input and the rows of one plain backward, :mod:`impartial._per_sample`); None at activation blocks
    gram_from: str | None = None
    #: how the solve ended: :class:`impartial.solvers.Status` codes, one per problem (``[B]`` per sample); read
    #: with :attr:`statuses`
    status: Tensor | None = None
    #: ``gram_from="per-sample"``: ``(parameter, rule)`` for each shared parameter, the rule its part of the Gram
    #: came from ("linear", "conv", "embedding", "norm", "broadcast", "generic"; "+"-joined for a tied one)
    rules: tuple[tuple[str, str], ...] = ()
    #: why a faster path was not taken (the per-sample proof's reason), else None
    note: str | None = None

    @property
    def statuses(self) -> tuple[str, ...]:
        """The names of the statuses that occurred (e.g. ``("OK",)``, ``("STATIONARY",)``), worst last."""
        if self.status is None:
            return ("OK",)
        codes = sorted(set(self.status.reshape(-1).tolist()))
        return tuple(Status(c).name for c in codes)

    @property
    def cosine(self) -> Tensor:
        return cosine(self.gram)

    @property
    def norms(self) -> Tensor:
        """``[k_b]``: each task gradient's norm at the block, ``√G_ii``."""
        return self.gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()

    def summary(self) -> dict[str, float]:
        """Statistics that stay readable at any number of tasks (read from the tensors: one device sync).

        ``norm_min/median/max`` and ``norm_spread`` (max / median) of the task-gradient norms; ``conflicting``: the
        fraction of task pairs whose gradients conflict (``G_ij < 0``), ``cosine_min/median`` over the pairs;
        with weights (averaged over samples when per sample), ``weight_min/median/max``, ``weight_spread``
        (max / median of ``|w|``) and ``effective_tasks = (Σ|w|)² / Σw²`` (k for equal weights, 1 for one task).

        >>> G = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 1.0]])
        >>> s = BlockReport("z", (3,), ("a", "b", "c"), G, torch.tensor([0.2, 0.4, 0.4]), torch.tensor(1.0)).summary()
        >>> round(s["norm_spread"], 3), round(s["conflicting"], 3), round(s["effective_tasks"], 3)
        (2.0, 0.333, 2.778)
        """
        G = self.gram.double()
        k = G.shape[-1]
        n = self.norms.double()
        out = {"norm_min": n.min(), "norm_median": n.median(), "norm_max": n.max()}
        out["norm_spread"] = n.max() / n.median() if n.median() > 0 else torch.tensor(float("inf"))
        if k > 1:
            i, j = torch.triu_indices(k, k, 1)
            pairs = cosine(G)[i, j]
            out.update(conflicting=(G[i, j] < 0).double().mean(), cosine_min=pairs.min(), cosine_median=pairs.median())
        if self.weights is not None:
            w = self.weights.double().reshape(-1, k).mean(0)
            a = w.abs()
            out.update(
                weight_min=w.min(),
                weight_median=w.median(),
                weight_max=w.max(),
                effective_tasks=a.sum() ** 2 / (w * w).sum().clamp_min(1e-300),
            )
            out["weight_spread"] = a.max() / a.median() if a.median() > 0 else torch.tensor(float("inf"))
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(G.device) for v in out.values()]).tolist()
        return dict(zip(out, values))


@dataclass(frozen=True)
class Report:
    """The result of one :func:`impartial.backward` call; ``print(report)`` shows it as a table.

    Each block's ``task_grads`` says how its per-task gradients were computed ("batched": one vmapped
    backward; "loop": one backward per task).  ``fallback`` is None unless a batched pass was chosen and
    replaced by the loop: then it gives the reason (torch's vmap could not run an op, or ``0 × inf`` NaNs).
    ``skipped`` names the tasks dropped for a non-finite gradient (``nonfinite="skip"``).  With
    ``block="params"``, the block's ``gram_from`` says whether ``J`` was formed ("J") or the Gram matrix came
    from the Linear layers' inputs ("linear") or, every task one sample, from each layer's rows of one plain
    backward ("per-sample"; ``task_grads`` is then "plain").
    """

    mode: str
    solver: str
    tasks: tuple[str, ...]
    also: tuple[str, ...]
    blocks: tuple[BlockReport, ...]
    fallback: str | None = None
    skipped: tuple[str, ...] = ()
    #: things the caller should know that are not errors (e.g. a whole-forward-compiled model)
    warnings: tuple[str, ...] = ()

    @property
    def vmap_fallback(self) -> bool:
        return self.fallback is not None

    def __str__(self) -> str:
        also = f"; also terms: {', '.join(self.also)}" if self.also else ""
        lines = [
            f"impartial.backward: {len(self.tasks)} tasks ({_names(self.tasks)}){also}; "
            f"solver {self.solver}; block={self.mode!r}"
        ]
        if not self.blocks:
            lines.append("no block: a plain backward")
        for i, b in enumerate(self.blocks):
            lines += _block_lines(i, b)
        if self.blocks:
            how = {
                "batched": "one batched backward (is_grads_batched)",
                "loop": "a loop over tasks",
                "plain": "one plain backward (every task one sample)",
            }
            lines.append(
                "per-task gradients: "
                + "; ".join(f"block {i}: {how.get(b.task_grads, b.task_grads)}" for i, b in enumerate(self.blocks))
            )
        if self.fallback is not None:
            lines.append(f"a batched pass was replaced by a loop over tasks: {self.fallback}")
        if self.skipped:
            lines.append(f"skipped (non-finite gradient): {_names(self.skipped)}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _names(names: tuple[str, ...]) -> str:
    """All names up to :data:`TABLE_TASKS`, else the first three and the last."""
    if len(names) <= TABLE_TASKS:
        return ", ".join(names)
    return ", ".join(names[:3]) + f", …, {names[-1]}"


def _block_lines(i: int, b: BlockReport) -> list[str]:
    below = f", below block {', '.join(map(str, b.above))}" if b.above else ""
    via = {
        "J": "; Gram from J",
        "linear": "; Gram from the layers' inputs (J not formed)",
        "per-sample": "; Gram from each layer's per-sample rows of one backward (J not formed)",
    }.get(b.gram_from or "", "")
    if b.rules:
        kinds: dict[str, int] = {}
        for _, kind in b.rules:
            kinds[kind] = kinds.get(kind, 0) + 1
        via += " [" + ", ".join(f"{kind} ×{c}" for kind, c in kinds.items()) + "]"
    st = "" if b.statuses == ("OK",) else f"; status {'/'.join(b.statuses)}"
    lines = [
        f"block {i}: {b.name}{below}; {len(b.tasks)} tasks; keep_norm scale "
        f"{float(b.scale.double().mean()):.4g}{via}{st}"
    ]
    if b.note:
        lines.append(f"  note: {b.note}")
    if len(b.tasks) > TABLE_TASKS:
        return lines + _summary_lines(i, b)
    col = max(9, *(len(t) for t in b.tasks))
    head = f"  {'cosine':<{col}}" + "".join(f" {t:>{col}}" for t in b.tasks)
    w = None
    if b.weights is not None:
        head += f" {'weight':>{col}}"
        w = b.weights.double().reshape(-1, len(b.tasks)).mean(0).tolist()
    lines.append(head)
    for j, (t, cos) in enumerate(zip(b.tasks, b.cosine.double().tolist())):
        row = f"  {t:<{col}}" + "".join(f" {c:>{col}.3f}" for c in cos)
        lines.append(row + (f" {w[j]:>{col}.4g}" if w is not None else ""))
    return lines


def _summary_lines(i: int, b: BlockReport) -> list[str]:
    s, k = b.summary(), len(b.tasks)
    lines = [
        f"  task-gradient norms: min {s['norm_min']:.4g}, median {s['norm_median']:.4g}, max "
        f"{s['norm_max']:.4g} (max/median {s['norm_spread']:.3g})",
        f"  cosines over {k * (k - 1) // 2} pairs: {100 * s['conflicting']:.1f}% conflicting (< 0); min "
        f"{s['cosine_min']:.3f}, median {s['cosine_median']:.3f}",
    ]
    if "weight_min" in s:
        lines.append(
            f"  weights: min {s['weight_min']:.4g}, median {s['weight_median']:.4g}, max "
            f"{s['weight_max']:.4g} (max/median {s['weight_spread']:.3g}); effective tasks "
            f"{s['effective_tasks']:.1f} of {k}"
        )
    full = ".gram, .cosine" + (", .weights" if b.weights is not None else "")
    return lines + [f"  (full matrices as tensors: report.blocks[{i}]{full})"]


def cosine(G: Tensor) -> Tensor:
    """Cosine matrix of a Gram matrix ``G`` ``[k, k]``; rows of zero gradients get cosine 0."""
    n = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    outer = n.unsqueeze(-1) * n.unsqueeze(-2)
    # torch.where: a zero task gradient has no direction; report 0 rather than NaN.
    return torch.where(outer > 0, G / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(G))
