"""The solver protocol: precision through every entry point, status semantics, capabilities, state per block."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from torch import Tensor

from impartial import solvers
from impartial.solvers import (
    IMTLG,
    MGDA,
    NSGD,
    AlignedMTL,
    Compose,
    ConFIG,
    FairGrad,
    GradDrop,
    GradNorm,
    GradVac,
    GramSolver,
    Mean,
    NashMTL,
    PCGrad,
    Random,
    Solver,
    Status,
    Sum,
    UPGrad,
    gram,
)
from registry import SolverInfo, rows
from strategies import jacobians, losses_for

ALL = [pytest.param(r, id=r.id) for r in rows()]


def _near_degenerate() -> Tensor:
    """The issue's float32 example: rows g, 2g, −0.5g + 1e-4·noise, h (d = 4096)."""
    gen = torch.Generator().manual_seed(0)
    g, h, noise = (torch.randn(4096, generator=gen) for _ in range(3))
    return torch.stack([g, 2 * g, -0.5 * g + 1e-4 * noise, h])


@pytest.mark.parametrize("make", [IMTLG, ConFIG, NashMTL, FairGrad], ids=lambda m: m.__name__)
def test_float32_precision_reaches_every_entry_point(make) -> None:
    J = _near_degenerate()
    G = gram(J)  # float64, from a float32 J
    w = make().solve(G, precision=torch.float32).weights
    entries = {
        "__call__": make()(J).double(),
        "weights": make().weights(G, precision=torch.float32) @ J.double(),
        "mixing": make().mixing(G, precision=torch.float32).sum(-2) @ J.double(),
        "apply": make().apply(J).sum(-2).double(),
        "Compose": Compose(make())(J).double(),
        "Compose(Sum, ·)": Compose(Sum(), make())(J).double(),
        "Compose.weights": Compose(Sum(), make()).weights(G, precision=torch.float32) @ J.double(),
        "get": solvers.get(make.__name__)(J).double(),
    }
    expected = w @ J.double()
    for name, d in entries.items():
        assert torch.allclose(d, expected, rtol=0, atol=1e-5 * float(J.abs().max())), name
    # the cut-offs do matter here: with float64's, the same G gives other weights
    assert not torch.allclose(make().weights(G), w, atol=1e-3)


@pytest.mark.parametrize("make", [IMTLG, ConFIG, NashMTL, FairGrad, AlignedMTL], ids=lambda m: m.__name__)
@pytest.mark.parametrize("case", ["antiparallel", "three-at-120-degrees"])
def test_pareto_stationary_tasks_say_stationary(make, case: str) -> None:
    g = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = h - (h @ g) / (g @ g) * g
    u, v = g / g.norm(), h / h.norm()
    J = {
        "antiparallel": torch.stack([g, -g]),
        "three-at-120-degrees": 3.0 * torch.stack([u, (-u + 3**0.5 * v) / 2, (-u - 3**0.5 * v) / 2]),
    }[case]
    for dtype in (torch.float64, torch.float32):
        sol = make().solve(gram(J.to(dtype)), precision=dtype)
        assert int(sol.status) == Status.STATIONARY and torch.equal(sol.weights, torch.zeros_like(sol.weights))


@pytest.mark.parametrize("info", [pytest.param(r, id=r.id) for r in rows() if r.make().gram_space])
def test_zero_gradients_say_stationary(info: SolverInfo) -> None:
    J = torch.zeros(2, 3, 5, dtype=info.dtype)
    kw = {"losses": losses_for(J)} if info.needs_losses else {}
    sol = info.make().solve(gram(J), precision=J.dtype, **kw)
    assert (sol.status == Status.STATIONARY).all()


def test_a_zero_task_is_not_stationary_for_bargaining() -> None:
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    J[1] = 0
    for s in (NashMTL(), FairGrad(alpha=2.0), IMTLG()):
        sol = s.solve(gram(J))
        assert int(sol.status) == Status.OK and sol.weights[1] == 0 and (sol.weights[[0, 2]] != 0).all()


@pytest.mark.parametrize("make", [lambda: NashMTL(iters=1), lambda: FairGrad(alpha=2.0, iters=1)], ids=["Nash", "Fair"])
def test_a_budget_too_small_says_not_converged_and_keeps_the_iterate(make) -> None:
    J = (
        torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        * torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]
    )
    G = gram(J)
    host = make().solve(G)
    fixed = torch.func.vmap(lambda g: tuple(make().solve(g)[:3]))(G.unsqueeze(0))  # the sync-free schedule
    for w, status, residual in (host[:3], (fixed[0][0], fixed[1][0], fixed[2][0])):
        assert int(status) == Status.NOT_CONVERGED and residual > 1e-9
        assert w.isfinite().all() and (w > 0).all()  # the last iterate, not a silent 0
    assert int(NashMTL().solve(G).status) == Status.OK


@given(J=jacobians(max_k=24))
def test_bargaining_host_loop_and_fixed_schedule_agree(J: Tensor) -> None:
    # on the CPU the Newton steps stop at convergence; traced (vmap here) they run a fixed count: same answer
    G = gram(J)
    for s in (NashMTL(), FairGrad(alpha=2.0)):
        host = s.solve(G)
        w, status = torch.func.vmap(lambda g, s=s: tuple(s.solve(g)[:2]))(G.unsqueeze(0))
        assert int(host.status) != Status.NOT_CONVERGED
        if int(status[0]) == Status.NOT_CONVERGED:
            continue  # the fixed schedule ran out (reported, not hidden); the host loop did not
        assert int(status[0]) == int(host.status)
        assert torch.allclose(w[0], host.weights, rtol=1e-7, atol=1e-12 * float(host.weights.abs().max()))
        if int(host.status) == Status.OK:
            assert float(host.residual) <= 1e-9


def test_capabilities() -> None:
    expect = {  # (stateless, deterministic, gram_space)
        Sum(): (True, True, True),
        IMTLG(): (True, True, True),
        MGDA(): (True, True, True),
        PCGrad(): (True, False, True),
        Random(): (True, False, True),
        GradDrop(): (True, False, False),
        GradNorm(): (False, True, True),
        NSGD(): (False, True, True),
        GradVac(): (False, False, True),
        NashMTL(): (True, True, True),
        NashMTL(update_weights_every=2): (False, True, True),
        Compose(Sum(), IMTLG()): (True, True, True),
        Compose(NSGD(), PCGrad()): (False, False, True),
        Compose(PCGrad(), GradDrop()): (True, False, False),
    }
    for s, (stateless, deterministic, gram_space) in expect.items():
        assert (s.stateless, s.deterministic, s.gram_space) == (stateless, deterministic, gram_space), repr(s)
        assert s.batchable == (stateless and deterministic)


def test_get_by_name_is_stateless_exactly_for_the_stateless_methods() -> None:
    stateful = {"gradnorm", "nsgd", "gradvac"}
    for name in solvers._BY_NAME:
        assert solvers.get(name).stateless == (name not in stateful), name


def _leaves(state: dict) -> list:
    """Every value of a (nested) state dict but the generators' states."""
    out = []
    for key, v in state.items():
        out += _leaves(v) if isinstance(v, dict) else ([] if key == "generator" else [v])
    return out


@pytest.mark.parametrize("info", ALL)
def test_declared_capabilities_hold(info: SolverInfo) -> None:
    gen = torch.Generator().manual_seed(9)
    Js = [torch.randn(4, 7, generator=gen, dtype=torch.float64).to(info.dtype) for _ in range(3)]

    def kw(J: Tensor) -> dict:
        out = {"losses": losses_for(J)} if info.needs_losses else {}
        return out | (info.context(J) if info.context is not None else {})

    s = info.make()
    outs = [s(J, **kw(J)) for J in Js]
    if s.stateless:
        assert _leaves(s.state_dict()) == []
        assert s.for_block(0) is s and s.for_block(5) is s
    else:
        assert _leaves(s.state_dict()) != []
    if s.batchable:  # stateless and deterministic: every call is a fresh solver's
        assert all(torch.equal(o, info.make()(J, **kw(J))) for o, J in zip(outs, Js))


@pytest.mark.parametrize("info", ALL)
@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 12, 70_000), (2, 0, 4, 7)], ids=["B0", "B0-float32-Gram", "2x0"])
def test_an_empty_batch_gives_an_empty_answer(info: SolverInfo, shape: tuple[int, ...]) -> None:
    """No problem to solve: the right shapes, no reduction over nothing (those raise in torch)."""
    J = torch.randn(*shape).to(info.dtype)
    kw = {"losses": torch.ones(shape[:-1])} if info.needs_losses else {}
    kw |= info.context(J) if info.context is not None else {}
    s = info.make()
    assert s(J, **kw).shape == shape[:-2] + shape[-1:]
    if s.gram_space:
        sol = s.solve(torch.zeros(*shape[:-1], shape[-2], dtype=torch.float64), losses=kw.get("losses"))
        assert sol.weights.shape == shape[:-1] and sol.status.shape == shape[:-2] == sol.residual.shape


@pytest.mark.parametrize("info", ALL)
def test_state_holds_no_autograd_graph(info: SolverInfo) -> None:
    # backward twice through calls on inputs that require grad: the second fails if state kept the first graph
    s = info.make()
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        J = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(info.dtype).requires_grad_()
        kw = {"losses": losses_for(J.detach())} if info.needs_losses else {}
        kw |= info.context(J.detach()) if info.context is not None else {}
        s(J, **kw).sum().backward()
        assert J.grad is not None


def test_for_block_keeps_one_state_per_block_and_checkpoints_them() -> None:
    gen = torch.Generator().manual_seed(11)
    Js = [torch.randn(3, 8, generator=gen, dtype=torch.float64) for _ in range(6)]
    s = GradNorm(alpha=1.0, lr=0.3, progress="grad", reference_step=1)
    blocks = [s.for_block(j) for j in range(3)]
    assert blocks[0] is s.for_block(0) and len({id(b) for b in blocks} | {id(s)}) == 4
    assert all(repr(b) == repr(s) for b in blocks)
    for J in Js[:3]:  # one call per block per step, as impartial.backward makes them
        for b in blocks:
            b(J)
    for b in blocks:  # each block stepped 3 times, not 9
        assert int(b.state_dict()["step"]) == 3
    assert s.state_dict().keys() == {"blocks"} and sorted(s.state_dict()["blocks"]) == [0, 1, 2]
    # a lone solver fed block 1's inputs is block 1
    alone = GradNorm(alpha=1.0, lr=0.3, progress="grad", reference_step=1)
    for J in Js[:3]:
        alone(J)
    assert torch.equal(alone(Js[3]), blocks[1](Js[3]))
    # resume from a checkpoint (torch.save round trip, weights_only) into a fresh solver: bit-identical
    restored = GradNorm(alpha=1.0, lr=0.3, progress="grad", reference_step=1)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    for J in Js[4:]:
        for j in range(3):
            assert torch.equal(s.for_block(j)(J), restored.for_block(j)(J))
    s.reset()
    assert s.state_dict() == {}


def test_for_block_children_share_the_generator_and_compose_composes_them(tmp_path) -> None:
    gen = torch.Generator().manual_seed(12)
    Js = [torch.randn(4, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    make = lambda: Compose(NSGD(reference_step=1), GradVac(0.5, generator=torch.Generator().manual_seed(0)))  # noqa: E731
    s = make()
    a, b = s.for_block(0), s.for_block(1)
    assert a.solvers[1].generator is s.solvers[1].generator is b.solvers[1].generator
    for J in Js[:2]:
        a(J)
        b(J)
    path = tmp_path / "solver.pt"
    torch.save(s.state_dict(), path)
    restored = make()
    restored.load_state_dict(torch.load(path))
    for J in Js[2:]:
        for j in (0, 1):
            assert torch.equal(s.for_block(j)(J), restored.for_block(j)(J))
    with pytest.raises(ValueError, match="stateless"):
        IMTLG().load_state_dict({"blocks": {0: {}}})


def test_gram_solver_is_a_base_class() -> None:
    with pytest.raises(TypeError, match="base class"):
        GramSolver()
    assert isinstance(Mean(), Solver) and isinstance(UPGrad(), GramSolver)


@pytest.mark.parametrize("scale", [1e-24, 1e-12, 1e12, 1e19], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("make", [IMTLG, ConFIG, NashMTL, MGDA, UPGrad, AlignedMTL], ids=lambda m: m.__name__)
def test_float32_direction_matches_float64_at_extreme_scales(make, scale: float) -> None:
    # k d > 2^16: the float32 Gram path (a float32 product of J x 1e-24 underflowed to 0, of 1e19 overflowed)
    gen = torch.Generator().manual_seed(13)
    J = (torch.randn(6, 20_000, generator=gen, dtype=torch.float64) * scale).float()
    expected = make()(J.double())
    got = make()(J).double()
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max())), make.__name__


@pytest.mark.parametrize("base", [solvers.MGDA, solvers.UPGrad, solvers.DualProj, solvers.CAGrad, solvers.IMTLG])
def test_a_closed_form_below_a_solve_of_its_own_is_refused(base: type) -> None:
    """Overriding ``_weights`` under a solver whose ``_solve`` computes the weights would be silently ignored."""
    with pytest.raises(TypeError, match=r"overrides _weights, which \w+\._solve never calls"):
        type("Clamped", (base,), {"_weights": lambda self, G, *, losses: torch.ones(G.shape[:-1], dtype=G.dtype)})

    class Clamped(base):  # overriding _solve itself is the way, and works
        def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> solvers.Solution:
            sol = super()._solve(G, losses=losses, precision=precision, mixing=mixing)
            return sol._replace(weights=sol.weights.clamp_max(1e-3))

    J = torch.randn(3, 5, dtype=torch.float64)
    assert Clamped().weights(J @ J.T).max() <= 1e-3


def test_a_closed_form_on_gram_solver_is_the_way_for_new_methods() -> None:
    class Halves(solvers.GramSolver):
        def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
            return torch.full(G.shape[:-1], 0.5, dtype=G.dtype)

    J = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(Halves()(J), 0.5 * J.sum(0))
