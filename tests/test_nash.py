"""Nash-MTL and FairGrad: the bargaining conditions, Pareto-stationary inputs, and the kept state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from impartial.solvers import FairGrad, NashMTL, Status, gram
from strategies import jacobians


def _solved(sol) -> bool:
    """OK, or STATIONARY with zero weights; never NOT_CONVERGED on the CPU (the loop runs to convergence)."""
    assert int(sol.status) in (Status.OK, Status.STATIONARY), sol
    if int(sol.status) == Status.STATIONARY:
        assert (sol.weights == 0).all()
        return False
    assert float(sol.residual) <= 1e-9
    return True


@given(J=jacobians(max_k=16))
def test_nash_alpha_times_G_alpha_is_one(J: Tensor) -> None:
    G = gram(J)
    sol = NashMTL().solve(G)
    w = sol.weights
    alpha = w / torch.linalg.matrix_norm(G).sqrt()  # the paper's α*, before our √‖G‖_F scale
    live = J.norm(dim=1) > 0
    if not _solved(sol):
        return
    assert (alpha[live] > 0).all() and (alpha[~live] == 0).all()
    assert torch.allclose(alpha[live] * (G @ alpha)[live], torch.ones_like(alpha[live]), rtol=0, atol=1e-6)
    # ‖α*ᵀJ‖² = Σ α_i (Gα)_i = k (tasks with a zero gradient do not bargain)
    assert math.isclose(float((alpha @ J).norm() ** 2), float(live.sum()), rel_tol=1e-6)


@given(J=jacobians(max_k=16), alpha=st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_fairgrad_utilities_are_alpha_fair(J: Tensor, alpha: float) -> None:
    G = gram(J)
    sol = FairGrad(alpha=alpha).solve(G)
    w = sol.weights
    live = J.norm(dim=1) > 0
    if not _solved(sol):
        return
    utility = (G @ w)[live]
    assert torch.allclose(utility, w[live] ** (-1 / alpha), rtol=1e-6, atol=0)


@given(J=jacobians(min_k=2, max_k=12, degenerate=False))
def test_fairgrad_alpha_one_is_nash_up_to_the_frobenius_scale(J: Tensor) -> None:
    G = gram(J)
    nash, fair = NashMTL().weights(G), FairGrad(alpha=1.0).weights(G)
    assert torch.allclose(nash, fair * torch.linalg.matrix_norm(G).sqrt(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("solver", [NashMTL(), FairGrad(), FairGrad(alpha=3.0)], ids=repr)
@pytest.mark.parametrize("case", ["antiparallel", "three-at-120-degrees", "pair-and-one-more"])
def test_pareto_stationary_tasks_give_the_zero_direction(solver, case: str) -> None:
    # Some nonnegative combination of the gradients is 0: no direction improves them all, F has no minimiser.
    g = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = h - (h @ g) / (g @ g) * g
    J = {
        "antiparallel": torch.stack([g, -3 * g]),
        "three-at-120-degrees": torch.stack(
            [g / g.norm(), (-g / g.norm() + 3**0.5 * h / h.norm()) / 2, (-g / g.norm() - 3**0.5 * h / h.norm()) / 2]
        )
        * 7.0,
        "pair-and-one-more": torch.stack([g, h, -0.5 * g]),
    }[case]
    assert torch.equal(solver(J), torch.zeros(5, dtype=torch.float64))


@given(J=jacobians(max_k=8, min_d=8, degenerate=False), where=st.integers(0, 8))
def test_zero_gradient_has_no_stake_in_the_bargain(J: Tensor, where: int) -> None:
    i = min(where, J.shape[0])
    Jz = torch.cat([J[:i], torch.zeros_like(J[:1]), J[i:]])
    for solver in (FairGrad(), FairGrad(alpha=2.0)):  # NashMTL's ‖G‖_F is unchanged too, FairGrad has no scale
        w, wz = solver.weights(gram(J)), solver.weights(gram(Jz))
        assert wz[i] == 0
        assert torch.allclose(torch.cat([wz[:i], wz[i + 1 :]]), w, rtol=1e-8, atol=0)


def test_nash_improves_every_task_and_maximises_the_log_utility() -> None:
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = NashMTL()(J)
    assert (J @ d > 0).all()
    # among directions of the same norm, d maximises Σ log(g_i·d): random perturbations do worse
    gen = torch.Generator().manual_seed(4)
    best = float(torch.log(J @ d).sum())
    for _ in range(200):
        e = d + 0.05 * d.norm() * torch.randn(9, generator=gen, dtype=torch.float64)
        e = e * d.norm() / e.norm()
        u = J @ e
        assert not (u > 0).all() or float(torch.log(u).sum()) <= best + 1e-12


def test_update_weights_every_reuses_the_weights_and_checkpoints() -> None:
    gen = torch.Generator().manual_seed(5)
    Js = [torch.randn(3, 7, generator=gen, dtype=torch.float64) for _ in range(5)]
    s = NashMTL(update_weights_every=2)
    w0 = NashMTL().weights(gram(Js[0]))
    assert torch.allclose(s(Js[0]), w0 @ Js[0])
    assert torch.allclose(s(Js[1]), w0 @ Js[1])  # kept weights, new gradients (as the official code does)
    assert torch.allclose(s(Js[2]), NashMTL()(Js[2]))
    state = s.state_dict()
    assert state["step"] == 3
    t = NashMTL(update_weights_every=2)
    t.load_state_dict(state)
    assert torch.equal(t(Js[3]), s(Js[3]))
    t(Js[4])  # a fresh solve; the next call reuses its weights, which do not fit 4 tasks
    with pytest.raises(ValueError, match="reset"):
        t(torch.randn(4, 7, dtype=torch.float64))
    t.reset()
    assert torch.equal(t(Js[4]), NashMTL()(Js[4]))
    assert repr(t) == "NashMTL(update_weights_every=2)"
    with pytest.raises(ValueError):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError):
        FairGrad(alpha=0.0)


def test_float32_input_matches_float64() -> None:
    J = torch.randn(6, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for solver in (NashMTL(), FairGrad(alpha=2.0)):
        expected = solver(J)
        assert torch.allclose(solver(J.float()).double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_hard_solvable_input_converges_and_a_short_fixed_schedule_says_so() -> None:
    # found by search: 24 sync-free Newton steps leave FairGrad(alpha=2) unconverged here (it used to return 0)
    gen = torch.Generator().manual_seed(633)
    J = torch.randn(24, 14, generator=gen, dtype=torch.float64) * torch.exp(
        torch.empty(24, 1, dtype=torch.float64).uniform_(-4, 4, generator=gen)
    )
    G = gram(J)
    sol = FairGrad(alpha=2.0).solve(G)
    assert _solved(sol)
    assert torch.allclose(G @ sol.weights, sol.weights ** (-1 / 2), rtol=1e-6, atol=0)

    def fixed(iters):
        s = FairGrad(alpha=2.0, iters=iters)
        return torch.func.vmap(lambda g: tuple(s.solve(g)[:3]))(G.unsqueeze(0))  # traced: the sync-free schedule

    w, status, _ = fixed(24)
    assert int(status[0]) == Status.NOT_CONVERGED and (w[0] > 0).all()
    w, status, _ = fixed(None)
    assert int(status[0]) == Status.OK and torch.allclose(w[0], sol.weights, rtol=1e-7, atol=0)
