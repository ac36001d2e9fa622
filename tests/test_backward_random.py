"""``impartial.backward`` on random topologies, against the hook-based reference loop.

A trunk ``h_1 … h_L`` (``h_j = tanh(W_j h_{j-1})``); task ``i`` reads a random set of depths through its own
heads, so tasks join at different depths: nested blocks, blocks with raw and resolved streams, tasks that skip
past blocks.  Hypothesis draws the topology.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_backward import UnitSum, _close
from torch import Tensor, nn

import impartial
import impartial._autograd as A
from impartial.graph import find_blocks
from impartial.solvers import Sum
from models import DTYPE
from reference.backward import backward_ref


class Ladder(nn.Module):
    def __init__(self, depth: int, reads: list[list[int]], width: int = 3) -> None:
        super().__init__()
        self.reads = reads
        self.trunk = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.heads = nn.ModuleList(nn.ModuleList(nn.Linear(width, 1) for _ in r) for r in reads)

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        hs = []
        for lin in self.trunk:
            x = torch.tanh(lin(x))
            hs.append(x)
        tasks = [
            sum((head(hs[j - 1]) - 0.3 * i).pow(2).mean() for head, j in zip(heads, r))
            for i, (heads, r) in enumerate(zip(self.heads, self.reads))
        ]
        return tasks, hs


def _expected_blocks(depth: int, reads: list[list[int]]) -> list[tuple[int, tuple[int, ...]]]:
    """The block rule, by hand on the ladder: (depth, tasks) top-down."""
    out, raw_below, tasks_below = [], set(), set()
    for j in range(depth, 0, -1):
        direct = {i for i, r in enumerate(reads) if j in r}
        raw, tasks = direct | raw_below, direct | tasks_below
        if len(tasks) >= 2 and raw:
            out.append((j, tuple(sorted(tasks))))
            raw = set()
        raw_below, tasks_below = raw, tasks
    return out


@st.composite
def ladders(draw: st.DrawFn) -> tuple[int, list[list[int]], int]:
    depth = draw(st.integers(1, 4))
    k = draw(st.integers(2, 4))
    reads = [sorted(draw(st.sets(st.integers(1, depth), min_size=1, max_size=2))) for _ in range(k)]
    return depth, reads, draw(st.integers(0, 2**16))


@given(ladders(), st.booleans(), st.booleans())
def test_blocks_and_gradients_match_the_reference_on_random_ladders(ladder, also: bool, batched: bool) -> None:
    """Also with the per-task gradients from the loop (the vmap fallback) instead of the batched backward."""
    A.FORCE = "batched" if batched else "loop"
    try:
        _check_ladder(ladder, also)
    finally:
        A.FORCE = None


def _check_ladder(ladder: tuple[int, list[list[int]], int], also: bool) -> None:
    depth, reads, seed = ladder
    torch.manual_seed(seed)
    model = Ladder(depth, reads).to(DTYPE)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    tasks, hs = model.losses(x)
    extra = [hs[0].pow(2).sum() * 0.1] if also else []
    blocks = find_blocks(tasks, also=extra)
    by_edge = {(h.grad_fn, h.output_nr): j + 1 for j, h in enumerate(hs)}
    assert [(by_edge[(b.edge.node, b.edge.output_nr)], b.tasks) for b in blocks] == _expected_blocks(depth, reads)
    params = list(model.parameters())
    plain = torch.autograd.grad(
        sum(tasks + extra), params, retain_graph=True, materialize_grads=True, allow_unused=True
    )
    expected = backward_ref(
        tasks, [hs[d - 1] for d, _ in _expected_blocks(depth, reads)], params, UnitSum(), also=extra
    )
    impartial.backward(tasks, solver=UnitSum(), also=extra, retain_graph=True)
    _close([_grad(p) for p in params], expected, 1e-10)
    for p in params:
        p.grad = None
    impartial.backward(tasks, solver=Sum(), keep_norm=False, also=extra)
    _close([_grad(p) for p in params], list(plain))


def _grad(p: Tensor) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


@given(ladders())
def test_marked_blocks_match_the_reference(ladder) -> None:
    """Any set of marked activations (here: a random subset of the trunk) follows the same semantics."""
    depth, reads, seed = ladder
    torch.manual_seed(seed)
    model = Ladder(depth, reads).to(DTYPE)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    tasks, hs = model.losses(x)
    gen = torch.Generator().manual_seed(seed)
    marked = [
        h
        for h in reversed(hs)
        if torch.rand((), generator=gen) < 0.6
        and any(torch.autograd.grad(t, h, retain_graph=True, allow_unused=True)[0] is not None for t in tasks)
    ]
    assume(marked)
    params = list(model.parameters())
    expected = backward_ref(tasks, marked, params, UnitSum())
    impartial.backward(tasks, solver=UnitSum(), block=marked)
    _close([_grad(p) for p in params], expected, 1e-10)
