"""Hypothesis strategies for task-gradient matrices ``J [k, d]`` with the structure that breaks solvers.

Values come from a seeded torch generator (hypothesis draws and shrinks the seed and the structure): low
rank, zero rows, duplicate rows, antiparallel pairs, rows of very different norms, and a global scale from
1e-10 to 1e15.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

DTYPE = torch.float64


@st.composite
def jacobians(
    draw: st.DrawFn,
    min_k: int = 1,
    max_k: int = 64,
    min_d: int = 1,
    max_d: int = 40,
    scales: bool = True,
    degenerate: bool = True,
) -> Tensor:
    """A float64 ``J [k, d]`` (:func:`build` of the drawn structure)."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(min_d, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.integers(1, min(k, d))) if degenerate and draw(st.booleans()) else None
    spread = draw(st.booleans())
    edits: list[tuple[str, int, int, float]] = []
    if degenerate and k > 1:
        for _ in range(draw(st.integers(0, min(3, k - 1)))):
            i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
            kind = draw(st.sampled_from(["zero", "duplicate", "antiparallel", "parallel"]))
            f = 1.0
            if kind == "antiparallel":
                f = draw(st.sampled_from([1.0, 0.5, 3.0]))
            elif kind == "parallel":
                f = draw(st.sampled_from([0.5, 3.0]))
            edits.append((kind, i, j, f))
    scale = draw(st.sampled_from([0, 0, 0, -10, -5, -2, 2, 5, 10, 15])) if scales else 0
    return build(k, d, seed, rank, spread, edits, scale)


def build(
    k: int,
    d: int,
    seed: int,
    rank: int | None = None,
    spread: bool = False,
    edits: list[tuple[str, int, int, float]] | tuple = (),
    scale: int = 0,
) -> Tensor:
    """The ``J`` that :func:`jacobians` draws from this structure (for explicit examples of its failures): rank
    ``rank`` (default full), rows scaled by ``e^U(-4, 4)`` where ``spread``, then each ``(kind, i, j, f)`` of
    ``edits`` (row ``i`` := 0, ``g_j``, ``−f g_j`` or ``f g_j``), then the global scale ``10^scale``."""
    gen = torch.Generator().manual_seed(seed)
    r = min(k, d) if rank is None else rank
    J = torch.randn(k, r, generator=gen, dtype=DTYPE) @ torch.randn(r, d, generator=gen, dtype=DTYPE)
    if spread:  # rows of very different norms
        J = J * torch.exp(torch.empty(k, 1, dtype=DTYPE).uniform_(-4, 4, generator=gen))
    for kind, i, j, f in edits:
        if kind == "zero":
            J[i] = 0
        elif kind == "duplicate":
            J[i] = J[j]
        elif kind == "antiparallel":
            J[i] = -J[j] * f
        else:
            J[i] = J[j] * f
    return J * 10.0**scale


@st.composite
def batched_jacobians(draw: st.DrawFn, max_b: int = 5, max_k: int = 12, max_d: int = 20) -> Tensor:
    """A float64 ``J [B, k, d]`` whose batch elements have independent structure (same k and d)."""
    k = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    B = draw(st.integers(1, max_b))
    return torch.stack([draw(jacobians(min_k=k, max_k=k, min_d=d, max_d=d)) for _ in range(B)])


def losses_for(J: Tensor, seed: int = 0) -> Tensor:
    """Positive task losses ``[..., k]`` to go with ``J`` (for loss-based solvers)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(J.shape[:-1], generator=gen, dtype=J.dtype) + 0.5
