"""``block="params"`` without forming ``J``: the Gram matrix from the Linear layers' inputs and per-task output
gradients, then one weighted backward.  Exact against the J path (the oracle: ``_linear_plan`` switched off)
in float64, and taken only where the graph proves it applies (``BlockReport.gram_from`` says which ran)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import impartial
import impartial._param_gram as PP
from impartial.solvers import IMTLG, MGDA, GradDrop, Sum, UPGrad

D = torch.float64
SOLVERS = {"Sum": Sum, "UPGrad": UPGrad, "MGDA": MGDA, "IMTLG": IMTLG}


class Trunk(nn.Module):
    def __init__(self, bias: bool = True, middle: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16, bias=bias)
        self.middle = middle if middle is not None else nn.Tanh()
        self.b = nn.Linear(16, 12, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.b(self.middle(self.a(x))))


def _setup(
    k: int, trunk: nn.Module, shape: tuple[int, ...], seed: int = 0
) -> tuple[nn.Module, list[nn.Module], Tensor]:
    torch.manual_seed(seed)
    trunk = trunk.to(D)
    heads = [nn.Linear(12, 3).to(D) for _ in range(k)]
    return trunk, heads, torch.randn(*shape, dtype=D)


def _run(
    trunk: nn.Module,
    heads: list[nn.Module],
    x: Tensor,
    gram: bool,
    loss: Callable[[int, Tensor], Tensor] | None = None,
    times: int = 1,
    **kw,
) -> tuple[list, object]:
    params = list(trunk.parameters()) + [p for h in heads for p in h.parameters()]
    for p in params:
        p.grad = None
    orig = PP.matrix_layers
    if not gram:
        PP.matrix_layers = lambda g, shared: None
    try:
        h = trunk(x)
        losses = [loss(i, hd(h)) if loss is not None else (hd(h) - i).pow(2).mean() for i, hd in enumerate(heads)]
        for _ in range(times):
            rep = impartial.backward(losses, block="params", **kw)
    finally:
        PP.matrix_layers = orig
    return [None if p.grad is None else p.grad.clone() for p in params], rep


def _same(a: list, b: list, tol: float = 1e-12) -> None:
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, rtol=tol, atol=tol * float(y.abs().max())), float((x - y).abs().max())


def _paths(trunk: nn.Module, heads: list[nn.Module], x: Tensor, expect: str, tol: float = 1e-12, **kw) -> None:
    a, ra = _run(trunk, heads, x, True, **kw)
    b, rb = _run(trunk, heads, x, False, **kw)
    assert [blk.gram_from for blk in ra.blocks] == [expect]
    assert [blk.gram_from for blk in rb.blocks] == ["J"]
    _same(a, b, tol)
    _same([ra.blocks[0].gram, ra.blocks[0].scale], [rb.blocks[0].gram, rb.blocks[0].scale], tol)
    assert "J not formed" in str(ra) if expect == "linear" else "Gram from J" in str(ra)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("keep_norm", [True, False])
@pytest.mark.parametrize("shape", [(16, 6), (4, 5, 6), (40, 6), (3, 6)], ids=["2d", "3d", "batch>in", "batch<in"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k", [2, 8])
def test_linear_trunk_matches_J(k: int, bias: bool, shape: tuple, keep_norm: bool, solver: str) -> None:
    trunk, heads, x = _setup(k, Trunk(bias), shape)
    _paths(trunk, heads, x, "linear", solver=SOLVERS[solver](), keep_norm=keep_norm)


@pytest.mark.parametrize("kernel", [True, False], ids=["XXt", "weight-grads"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("N", [3, 40])
def test_layer_gram_both_ways(N: int, bias: bool, kernel: bool) -> None:
    torch.manual_seed(N)
    Dl, X = torch.randn(5, N, 7, dtype=D), torch.randn(N, 4, dtype=D)
    J = torch.cat([(Dl.transpose(1, 2) @ X).reshape(5, -1)] + ([Dl.sum(1)] if bias else []), dim=1)
    G, plain = PP.layer_gram(Dl, X, True, bias, kernel=kernel)
    tol = 1e-13 * float((J @ J.T).abs().max())
    assert torch.allclose(G, J @ J.T, rtol=0, atol=tol)
    assert torch.allclose(plain, J.sum(0).pow(2).sum(), rtol=1e-13, atol=0)
    assert PP.layer_gram(Dl, X, True, bias)[0].allclose(G, rtol=0, atol=tol)


@pytest.mark.parametrize("task_grads", ["batched", "loop"])
def test_forced_task_passes(task_grads: str) -> None:
    trunk, heads, x = _setup(3, Trunk(), (10, 6))
    _paths(trunk, heads, x, "linear", solver=UPGrad(), task_grads=task_grads)


def test_k1_is_plain() -> None:
    trunk, heads, x = _setup(1, Trunk(), (10, 6))
    a, rep = _run(trunk, heads, x, True)
    assert rep.blocks == ()
    b, _ = _run(trunk, heads, x, False, solver=Sum())
    _same(a, b)


def test_raw_matmul_weight() -> None:
    """``x @ W`` (the parameter itself as ``mat2``, no transpose) and ``addmm(b, x, W)``."""

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W, self.c = nn.Parameter(torch.randn(6, 16)), nn.Parameter(torch.randn(16))
            self.V = nn.Parameter(torch.randn(16, 12))

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(torch.addmm(self.c, x, self.W)) @ self.V

    trunk, heads, x = _setup(4, Raw(), (10, 6))
    _paths(trunk, heads, x, "linear", solver=MGDA())


class _Scaled(nn.Module):
    """``addmm`` with ``beta = 2``: not a plain bias."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 12)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.lin.bias, x, self.lin.weight.t(), beta=2).tanh()


class _Tied(nn.Module):
    """One weight used twice: its gradient is a sum over uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)
        self.inp = nn.Linear(6, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.lin(self.inp(x))))


@pytest.mark.parametrize(
    "trunk",
    [
        lambda: Trunk(middle=nn.LayerNorm(16)),  # a parameter of another op
        lambda: Trunk(middle=nn.Sequential(nn.Unflatten(1, (1, 16)), nn.Conv1d(1, 1, 3, padding=1), nn.Flatten())),
        _Scaled,
        _Tied,
    ],
    ids=["layernorm", "conv", "beta2", "tied"],
)
def test_other_trunks_take_the_J_path(trunk: Callable[[], nn.Module]) -> None:
    trunk, heads, x = _setup(3, trunk(), (10, 6))
    _paths(trunk, heads, x, "J", solver=UPGrad())


def test_coordinate_solver_takes_the_J_path() -> None:
    trunk, heads, x = _setup(3, Trunk(), (10, 6))
    torch.manual_seed(1)
    a, ra = _run(trunk, heads, x, True, solver=GradDrop(generator=torch.Generator().manual_seed(0)))
    b, rb = _run(trunk, heads, x, False, solver=GradDrop(generator=torch.Generator().manual_seed(0)))
    assert ra.blocks[0].gram_from == rb.blocks[0].gram_from == "J"
    _same(a, b)


def test_partial_shared_params_take_the_J_path() -> None:
    """A trunk parameter left out of ``shared_params`` gets its plain gradient: it needs its own rows."""
    trunk, heads, x = _setup(3, Trunk(), (10, 6))
    _paths(trunk, heads, x, "J", solver=UPGrad(), shared_params=list(trunk.b.parameters()))


def test_retain_graph_twice() -> None:
    trunk, heads, x = _setup(3, Trunk(), (10, 6))
    _paths(trunk, heads, x, "linear", solver=UPGrad(), retain_graph=True, times=2)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_task(nonfinite: str) -> None:
    trunk, heads, x = _setup(4, Trunk(), (10, 6))

    def loss(i: int, y: Tensor) -> Tensor:  # task 2's gradient is NaN (sqrt at 0)
        return y.sub(y.detach()).abs().sqrt().sum() if i == 2 else (y - i).pow(2).mean()

    if nonfinite == "raise":
        for gram in (True, False):
            with pytest.raises(FloatingPointError, match=r"losses\[2\]"):
                _run(trunk, heads, x, gram, loss=loss, solver=UPGrad())
        return
    a, ra = _run(trunk, heads, x, True, loss=loss, solver=UPGrad(), nonfinite="skip")
    b, rb = _run(trunk, heads, x, False, loss=loss, solver=UPGrad(), nonfinite="skip")
    assert ra.skipped == rb.skipped == ("losses[2]",)
    assert ra.blocks[0].gram_from == "linear"
    _same(a, b)


def test_float32_close() -> None:
    trunk, heads, x = _setup(4, Trunk(), (10, 6))
    trunk, heads, x = trunk.float(), [h.float() for h in heads], x.float()
    a, ra = _run(trunk, heads, x, True, solver=UPGrad())
    b, _ = _run(trunk, heads, x, False, solver=UPGrad())
    assert ra.blocks[0].gram_from == "linear" and ra.blocks[0].gram.dtype == torch.float64
    _same(a, b, 1e-5)


@pytest.mark.parametrize("shape", [(10, 6), (2, 5, 6)], ids=["2d", "3d"])
def test_trunk_ending_in_linear(shape: tuple) -> None:
    """The block is a Linear layer's output itself: its output gradients are the blocks' task gradients."""
    trunk, heads, x = _setup(3, nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12)), shape)
    _paths(trunk, heads, x, "linear", solver=UPGrad())
