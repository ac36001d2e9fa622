"""PCGrad: the batched coefficient-space rounds equal the paper's sequential loop, and what projection implies."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_contract import assert_close
from torch import Tensor

from impartial.solvers import PCGrad, gram
from impartial.solvers._pcgrad import project_conflicts, random_orders
from reference.projection import pcgrad_ref
from strategies import batched_jacobians, jacobians


def _orders(k: int, seed: int, batch: tuple[int, ...] = ()) -> Tensor:
    return random_orders(batch, k, torch.Generator().manual_seed(seed))


@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_rounds_equal_the_sequential_loop_for_any_orders(J: Tensor, seed: int) -> None:
    orders = _orders(J.shape[0], seed)
    W = project_conflicts(gram(J), orders)
    assert_close(W.sum(-2) @ J, pcgrad_ref(J, orders), 1e-10, float(J.abs().max()))


@given(J=jacobians(min_k=2, max_k=2), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_two_tasks_conflict_with_neither(J: Tensor, seed: int) -> None:
    d = PCGrad(generator=torch.Generator().manual_seed(seed))(J)
    scale = float(J.norm(dim=-1).max())  # round-off of d is relative to the inputs, not to d
    for g in J:
        assert float(d @ g) >= -1e-12 * scale * float(g.norm()) - 1e-300


@given(J=jacobians(min_k=2), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_projected_gradient_does_not_conflict_with_its_last_partner(J: Tensor, seed: int) -> None:
    orders = _orders(J.shape[0], seed)
    projected = project_conflicts(gram(J), orders) @ J
    last = J[orders[:, -1]]
    dots = (projected * last).sum(-1)
    scale = float(J.norm(dim=-1).max())
    assert (dots >= -1e-10 * scale * last.norm(dim=-1) - 1e-300).all(), dots


@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_is_permutation_equivariant_with_relabelled_orders(J: Tensor, seed: int) -> None:
    k = J.shape[0]
    orders = _orders(k, seed)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1))
    inverse = perm.argsort()
    # task a of J[perm] is task perm[a] of J: it visits the same tasks, under their new labels
    relabelled = inverse[orders[perm]]
    a = project_conflicts(gram(J), orders).sum(-2) @ J
    b = project_conflicts(gram(J[perm]), relabelled).sum(-2) @ J[perm]
    assert_close(b, a, 1e-10, float(J.abs().max()))


@given(J=jacobians(degenerate=False))
def test_pcgrad_without_conflicts_is_the_sum(J: Tensor) -> None:
    J = J.abs()  # all inner products ≥ 0
    assert_close(PCGrad()(J), J.sum(0), 1e-12, float(J.abs().max()))


@given(J=batched_jacobians(), seed=st.integers(0, 2**31 - 1))
def test_pcgrad_rounds_vmap_over_random_orders(J: Tensor, seed: int) -> None:
    G = gram(J)
    orders = _orders(J.shape[-2], seed, (J.shape[0],))
    vmapped = torch.func.vmap(project_conflicts)(G, orders)
    looped = torch.stack([project_conflicts(G[b], orders[b]) for b in range(J.shape[0])])
    batched = project_conflicts(G, orders)
    assert torch.allclose(vmapped, looped, rtol=1e-12, atol=0) and torch.allclose(batched, looped, rtol=1e-12, atol=0)


def test_random_orders_are_uniform_permutations_of_the_other_tasks() -> None:
    k, n = 4, 6000
    orders = random_orders((n,), k, torch.Generator().manual_seed(0))
    others = torch.stack([torch.tensor([j for j in range(k) if j != i]) for i in range(k)])
    assert torch.equal(orders.sort(-1).values, others.expand(n, k, k - 1))
    # each of the (k-1)! orders of task 0 is equally likely: ≈ n/6 each, 5σ ≈ 140
    _, counts = torch.unique(orders[:, 0], dim=0, return_counts=True)
    assert len(counts) == 6 and (counts - n / 6).abs().max() < 140, counts


def test_pcgrad_generator_gives_reproducible_draws_and_checkpoints() -> None:
    J = torch.randn(6, 5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = PCGrad(generator=torch.Generator().manual_seed(3)), PCGrad(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a(J), b(J))
    state = a.state_dict()
    first = a(J)
    a.load_state_dict(state)
    assert torch.equal(a(J), first)


def test_pcgrad_draws_from_the_global_rng_without_a_generator() -> None:
    J = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(5)
    a = PCGrad()(J)
    torch.manual_seed(5)
    assert torch.equal(PCGrad()(J), a)
    assert PCGrad().state_dict() == {}
