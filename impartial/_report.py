"""What :func:`impartial.backward` did: blocks, tasks at each, task-gradient cosines and solver weights.

Values are kept as tensors (no device sync while training); they are read only when the report is printed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import Status

__all__ = ["Report", "BlockReport"]


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
    #: shared parameters were formed) or "linear" (from each matrix-product layer's input and per-task output
    #: gradients, then one weighted backward; ``J`` never formed); None at activation blocks
    gram_from: str | None = None
    #: how the solve ended: :class:`impartial.solvers.Status` codes, one per problem (``[B]`` per sample); read
    #: with :attr:`statuses`
    status: Tensor | None = None

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


@dataclass(frozen=True)
class Report:
    """The result of one :func:`impartial.backward` call; ``print(report)`` shows it as a table.

    Each block's ``task_grads`` says how its per-task gradients were computed ("batched": one vmapped
    backward; "loop": one backward per task).  ``fallback`` is None unless a batched pass was chosen and
    replaced by the loop: then it gives the reason (torch's vmap could not run an op, or ``0 × inf`` NaNs).
    ``skipped`` names the tasks dropped for a non-finite gradient (``nonfinite="skip"``).  With
    ``block="params"``, the block's ``gram_from`` says whether ``J`` was formed ("J") or the Gram matrix came
    from the Linear layers' inputs ("linear").
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
        lines = [f"impartial.backward: {len(self.tasks)} tasks ({', '.join(self.tasks)}){also}; "
                 f"solver {self.solver}; block={self.mode!r}"]
        if not self.blocks:
            lines.append("no block: a plain backward")
        for i, b in enumerate(self.blocks):
            below = f", below block {', '.join(map(str, b.above))}" if b.above else ""
            via = {"J": "; Gram from J", "linear": "; Gram from the layers' inputs (J not formed)"}.get(
                b.gram_from or "", "")
            st = "" if b.statuses == ("OK",) else f"; status {'/'.join(b.statuses)}"
            lines.append(f"block {i}: {b.name}{below}; {len(b.tasks)} tasks; keep_norm scale "
                         f"{float(b.scale.double().mean()):.4g}{via}{st}")
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
        if self.blocks:
            how = {"batched": "one batched backward (is_grads_batched)", "loop": "a loop over tasks"}
            lines.append("per-task gradients: " + "; ".join(f"block {i}: {how[b.task_grads]}"
                                                            for i, b in enumerate(self.blocks)))
        if self.fallback is not None:
            lines.append(f"a batched pass was replaced by a loop over tasks: {self.fallback}")
        if self.skipped:
            lines.append(f"skipped (non-finite gradient): {', '.join(self.skipped)}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def cosine(G: Tensor) -> Tensor:
    """Cosine matrix of a Gram matrix ``G`` ``[k, k]``; rows of zero gradients get cosine 0."""
    n = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    outer = n.unsqueeze(-1) * n.unsqueeze(-2)
    # torch.where: a zero task gradient has no direction; report 0 rather than NaN.
    return torch.where(outer > 0, G / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(G))
