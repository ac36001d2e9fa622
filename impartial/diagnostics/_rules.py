"""A plain-language summary of a recording, with a suggestion per block from explicit rules.

Per block, over the recorded steps: ``C`` the mean fraction of task pairs with a negative cosine, ``m`` the
median of the smallest cosine, ``I`` the median imbalance (largest task-gradient norm over the smallest).
Exactly one *diagnosis* applies:

=============  =========================================================  ==========================================
diagnosis      when                                                       suggestion
=============  =========================================================  ==========================================
``scale``      ``I ≥ IMBALANCED`` and not ``direction``                   a scale-invariant method (IMTL-G, NSGD)
``direction``  ``C ≥ CONFLICTING``, ``m ≤ STRONG``, ``I < IMBALANCED``    conflict removal (PCGrad, UPGrad, CAGrad)
``both``       ``C ≥ CONFLICTING``, ``m ≤ STRONG``, ``I ≥ IMBALANCED``    IMTL-G, or GradNorm(alpha=0) then PCGrad
``agree``      ``C < AGREEING`` and ``I < BALANCED``                      the plain sum; a solver changes little
``mild``       otherwise                                                  solvers differ little from the plain sum
=============  =========================================================  ==========================================

The reasons: PCGrad changes a task gradient only where its cosine with another is negative (with no negative
pair it *is* the plain sum) and never changes lengths, so it cannot correct a scale imbalance; IMTL-G (equal
projections on the unit task gradients) and NSGD (normalised gradients) do not depend on the tasks' scales, and
GradNorm learns weights that undo them.  ``examples/RESULTS.md`` found exactly this on the multimodal VAEs:
norms apart, rare conflicts, IMTL-G cured the neglected modality and PCGrad did not.

Further findings, each on its own: a block Pareto-stationary in at least ``STATIONARY`` of the steps; a task whose
gradient is zero at the block in at least ``ZERO`` of them; a task whose mean weight is below ``NEGLECTED`` times
the largest, in length (``|w_i| n_i``: a scale-invariant solver gives a large gradient a small weight); with
``keep_norm=False``, a solver direction shorter than ``SHRUNK`` times the plain sum's (median).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import torch

from ._record import Recorder, Series

__all__ = [
    "AGREEING",
    "BALANCED",
    "CONFLICTING",
    "IMBALANCED",
    "NEGLECTED",
    "SHRUNK",
    "STATIONARY",
    "STRONG",
    "ZERO",
    "BlockStats",
    "Finding",
    "Summary",
    "block_stats",
    "summarize",
]

#: median max/min norm ratio from which the scale of the tasks dominates the plain sum
IMBALANCED = 10.0
#: median max/min norm ratio under which the tasks count as balanced
BALANCED = 3.0
#: mean fraction of negative-cosine pairs from which directions conflict often
CONFLICTING = 0.3
#: mean fraction of negative-cosine pairs under which tasks count as agreeing
AGREEING = 0.1
#: a median smallest cosine at or below this makes the conflicts strong enough to matter
STRONG = -0.1
#: fraction of Pareto-stationary steps worth a finding
STATIONARY = 0.05
#: fraction of steps with a zero task gradient worth a finding
ZERO = 0.5
#: a mean share ``|w_i| n_i`` below this times the largest task's: the solver neglects the task
NEGLECTED = 0.01
#: a median direction-length ratio below this: the solver shrinks the step
SHRUNK = 0.2


@dataclass(frozen=True)
class BlockStats:
    """One block's numbers over the run, as the rules read them."""

    block: str
    tasks: tuple[str, ...]
    records: int
    #: mean fraction of task pairs with a negative cosine
    conflict: float
    #: fraction of records with at least one negative pair (where PCGrad changes anything)
    any_conflict: float
    #: median of the smallest cosine
    min_cosine: float
    #: median of max/min task-gradient norm
    imbalance: float
    #: tasks with the largest and the smallest median norm
    largest: str
    smallest: str
    #: median direction-length ratio (NaN when unknown)
    ratio: float
    #: mean fraction of Pareto-stationary problems
    stationary: float
    #: per task, the fraction of records where its gradient is zero
    zero: tuple[float, ...]
    #: per task, the mean solver weight (NaN without weights)
    weights: tuple[float, ...]
    #: per task, its mean share of the solver's direction, ``|w_i| n_i / max_j |w_j| n_j`` (NaN without weights)
    share: tuple[float, ...]
    #: the solvers the recorded calls used
    solvers: tuple[str, ...] = ()

    @property
    def diagnosis(self) -> str:
        """``"scale"``, ``"direction"``, ``"both"``, ``"agree"`` or ``"mild"`` (the module docstring's table)."""
        direction = self.conflict >= CONFLICTING and self.min_cosine <= STRONG
        if self.imbalance >= IMBALANCED:
            return "both" if direction else "scale"
        if direction:
            return "direction"
        if self.conflict < AGREEING and self.imbalance < BALANCED:
            return "agree"
        return "mild"


@dataclass(frozen=True)
class Finding:
    """One sentence about one block; ``rule`` names what triggered it."""

    block: str
    rule: str
    text: str


def block_stats(s: Series, solvers: tuple[str, ...] = ()) -> BlockStats:
    """The numbers the rules read, from one block's series."""
    med_norm = s.norms.median(0).values
    w = s.weights.nanmean(0) if not s.weights.isnan().all() else s.weights[0]
    part = s.weights.abs() * s.norms  # what each task puts into the direction wᵀJ, in length
    top = part.amax(-1, keepdim=True)
    share = torch.where(top > 0, part / torch.where(top > 0, top, 1.0), 0.0).mean(0)
    if s.weights.isnan().all():
        share = torch.full_like(share, math.nan)
    ratio = s.ratio[~s.ratio.isnan()]
    return BlockStats(
        block=s.block,
        tasks=s.tasks,
        records=len(s.steps),
        conflict=float(s.conflict.mean()),
        any_conflict=float((s.conflict > 0).double().mean()),
        min_cosine=float(s.min_cosine.median()),
        imbalance=float(s.imbalance.median()),
        largest=s.tasks[int(med_norm.argmax())],
        smallest=s.tasks[int(med_norm.argmin())],
        ratio=float(ratio.median()) if len(ratio) else math.nan,
        stationary=float(s.stationary.mean()),
        zero=tuple((s.norms == 0).double().mean(0).tolist()),
        weights=tuple(w.tolist()),
        share=tuple(share.tolist()),
        solvers=solvers,
    )


def _times(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.0f}×" if x >= 10 else f"{x:.1f}×"


def _facts(st: BlockStats) -> str:
    return (
        f"norms differ {_times(st.imbalance)} (median largest/smallest; largest {st.largest!r}, smallest "
        f"{st.smallest!r}); {st.conflict:.0%} of task pairs conflict (negative cosine; a conflict in "
        f"{st.any_conflict:.0%} of steps), median smallest cosine {st.min_cosine:.2f}"
    )


def _suggestion(st: BlockStats) -> str:
    none = f", none in {1 - st.any_conflict:.0%} of steps" if st.any_conflict < 1 else ""
    acts = (
        f"it acts only on conflicting pairs ({st.conflict:.0%} of pairs{none}; median smallest cosine "
        f"{st.min_cosine:.2f}) and never changes lengths"
    )
    return {
        "scale": "scale, not direction: a scale-invariant method such as IMTL-G or NSGD (also NashMTL, ConFIG; "
        f"GradNorm learns such weights over steps) evens out the tasks; PCGrad alone changes little ({acts})",
        "direction": "direction, at comparable scales: a conflict-removing method (PCGrad, UPGrad, CAGrad) or MGDA",
        "both": "scale and direction: IMTL-G (scale-invariant, equal projections) or GradNorm(alpha=0) then PCGrad "
        "(solvers.Compose(GradNorm(alpha=0.0), PCGrad()), the paper's chain)",
        "agree": "the tasks agree and are balanced: the plain sum is fine here; a solver changes little",
        "mild": "no strong conflict or imbalance: solvers will differ little from the plain sum here",
    }[st.diagnosis]


def _extra(st: BlockStats, keep_norm: bool) -> list[tuple[str, str]]:
    out = []
    if st.stationary >= STATIONARY:
        out.append(
            (
                "stationary",
                (
                    f"Pareto-stationary in {st.stationary:.0%} of steps: no direction improved every "
                    "task, and the block passed 0 (with keep_norm); MGDA-type methods (MGDA, UPGrad, "
                    "DualProj) stop wherever 0 is in the hull of the task gradients"
                ),
            )
        )
    for t, z in zip(st.tasks, st.zero):
        if z >= ZERO:
            out.append(
                (
                    "zero",
                    (
                        f"task {t!r} has a zero gradient here in {z:.0%} of steps: it does not depend on "
                        "this block there (check the graph) or its loss is flat"
                    ),
                )
            )
    for t, sh in zip(st.tasks, st.share):
        if sh < NEGLECTED:  # NaN (no weights) compares False
            out.append(
                (
                    "neglected",
                    (
                        f"task {t!r} has almost no part in the solver's direction here (its weight "
                        f"times its norm is {sh:.2g} of the largest task's, on average)"
                    ),
                )
            )
    if not keep_norm and st.ratio < SHRUNK:
        out.append(
            (
                "shrunk",
                (
                    f"the solver's direction is {st.ratio:.2g}× the plain sum's length (median), and with "
                    "keep_norm=False the step at this block shrinks by that factor: keep_norm=True (the "
                    "default) rescales it to the plain length"
                ),
            )
        )
    return out


_WIDTH = 100  # the summary's text width


@dataclass(frozen=True)
class Summary:
    """Findings per block (:attr:`findings`) and the numbers behind them (:attr:`stats`); ``str()`` reads it."""

    stats: tuple[BlockStats, ...]
    findings: tuple[Finding, ...]

    def __str__(self) -> str:
        lines = []
        for st in self.stats:
            used = f", solver {'/'.join(st.solvers)}" if st.solvers else ""
            head = f"{st.block} ({len(st.tasks)} tasks, {st.records} records{used}): {_facts(st)}."
            lines.append(textwrap.fill(head, _WIDTH, subsequent_indent="  "))
            lines += [
                textwrap.fill(f"→ {f.text}.", _WIDTH, initial_indent="  ", subsequent_indent="    ")
                for f in self.findings
                if f.block == st.block
            ]
        return "\n".join(lines) if lines else "nothing recorded"


def summarize(rec: Recorder) -> Summary:
    """The summary of a recording: for each block its numbers, its diagnosis and the further findings."""
    stats = [block_stats(rec.series(i), rec.solvers) for i in range(len(rec.blocks))]
    findings = []
    for st in stats:
        findings.append(Finding(st.block, st.diagnosis, _suggestion(st)))
        findings += [Finding(st.block, rule, text) for rule, text in _extra(st, rec.keep_norm)]
    return Summary(tuple(stats), tuple(findings))
