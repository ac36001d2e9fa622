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
    """A float64 ``J [k, d]``."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(min_d, max_d))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rank = draw(st.integers(1, min(k, d))) if degenerate and draw(st.booleans()) else min(k, d)
    J = torch.randn(k, rank, generator=gen, dtype=DTYPE) @ torch.randn(rank, d, generator=gen, dtype=DTYPE)
    if draw(st.booleans()):  # rows of very different norms
        J = J * torch.exp(torch.empty(k, 1, dtype=DTYPE).uniform_(-4, 4, generator=gen))
    if degenerate and k > 1:
        n_special = draw(st.integers(0, min(3, k - 1)))
        for _ in range(n_special):
            i, j = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
            kind = draw(st.sampled_from(["zero", "duplicate", "antiparallel", "parallel"]))
            if kind == "zero":
                J[i] = 0
            elif kind == "duplicate":
                J[i] = J[j]
            elif kind == "antiparallel":
                J[i] = -J[j] * draw(st.sampled_from([1.0, 0.5, 3.0]))
            else:
                J[i] = J[j] * draw(st.sampled_from([0.5, 3.0]))
    if scales:
        J = J * 10.0 ** draw(st.sampled_from([0, 0, 0, -10, -5, -2, 2, 5, 10, 15]))
    return J


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
