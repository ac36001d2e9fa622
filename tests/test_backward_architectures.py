"""``impartial.backward`` on random small architectures drawn by hypothesis.

A shared trunk of 1–3 blocks (a Conv, optionally with BatchNorm; or two parallel Conv branches, added or
concatenated), flattened into a shared Linear with optional Dropout, then 2–4 task heads, each of 0–2 own
hidden layers (Linear, optional BatchNorm1d / Dropout) and possibly an own Conv branch reading the trunk
midway.  Dropout runs in train mode: its mask is drawn once, in the one forward both backward passes share.

- ``Sum()`` with ``keep_norm=False``: every ``.grad`` is the plain backward's.
- Every other solver that builds with no arguments: every ``.grad`` is finite, and every task-specific
  parameter gets exactly its own task's gradient.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import impartial
import impartial.solvers as solvers
from impartial.solvers import Solver, Sum
from models import DTYPE

#: relative tolerance (float64; the per-task pass is a batched backward, the reference a plain one)
TOL = 1e-10


def _no_arg_solvers() -> list[type[Solver]]:
    out = []
    for name in solvers.__all__:
        cls = getattr(solvers, name)
        if not (inspect.isclass(cls) and issubclass(cls, Solver)) or inspect.isabstract(cls) or cls is Sum:
            continue
        try:
            cls()
        except (TypeError, ValueError):  # needs arguments (Compose)
            continue
        out.append(cls)
    return out


class Branches(nn.Module):
    def __init__(self, c_in: int, c_out: int, bn: bool, cat: bool) -> None:
        super().__init__()
        self.cat = cat
        half = c_out // 2 if cat else c_out
        self.a = nn.Sequential(nn.Conv2d(c_in, half, 3, padding=1), *([nn.BatchNorm2d(half)] if bn else []))
        self.b = nn.Conv2d(c_in, c_out - half if cat else c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.cat([self.a(x), self.b(x)], 1) if self.cat else self.a(x) + self.b(x))


class Net(nn.Module):
    def __init__(self, arch: dict) -> None:
        super().__init__()
        c, blocks = 2, []
        for kind, bn, width in arch["blocks"]:
            if kind == "conv":
                blocks.append(
                    nn.Sequential(
                        nn.Conv2d(c, width, 3, padding=1), *([nn.BatchNorm2d(width)] if bn else []), nn.Tanh()
                    )
                )
            else:
                blocks.append(Branches(c, width, bn, cat=kind == "cat"))
            c = width
        self.trunk = nn.ModuleList(blocks)
        self.mid = len(blocks) // 2  # where task-specific conv branches read the trunk
        c_mid = ([2] + [w for _, _, w in arch["blocks"]])[self.mid]
        self.shared = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 16, arch["d_z"]), *([nn.Dropout(0.3)] if arch["dropout"] else [])
        )
        self.heads, self.side = nn.ModuleList(), nn.ModuleList()
        for depth, norm, side in arch["heads"]:
            layers, d = [], arch["d_z"] + (16 if side else 0)  # side branch: 1 channel, 4 × 4
            for _ in range(depth):
                extra = {"bn": nn.BatchNorm1d(5), "drop": nn.Dropout(0.2), None: nn.Identity()}[norm]
                layers += [nn.Linear(d, 5), extra, nn.Tanh()]
                d = 5
            self.heads.append(nn.Sequential(*layers, nn.Linear(d, 1)))
            self.side.append(nn.Sequential(nn.Conv2d(c_mid, 1, 3, padding=1), nn.Flatten()) if side else nn.Identity())
        self.has_side = [side for _, _, side in arch["heads"]]

    def losses(self, x: Tensor) -> list[Tensor]:
        h, mid = x, x
        for i, block in enumerate(self.trunk):
            if i == self.mid:
                mid = h
            h = block(h)
        if self.mid == len(self.trunk):
            mid = h
        z = self.shared(h)
        out = []
        for i, (head, side) in enumerate(zip(self.heads, self.side)):
            inp = torch.cat([z, side(mid)], -1) if self.has_side[i] else z
            out.append((head(inp) - (i - 1.0)).pow(2).mean())
        return out

    def own_params(self, i: int) -> list[nn.Parameter]:
        return [*self.heads[i].parameters(), *self.side[i].parameters()]


@st.composite
def architectures(draw: st.DrawFn) -> dict:
    block = st.tuples(st.sampled_from(["conv", "sum", "cat"]), st.booleans(), st.sampled_from([2, 4]))
    head = st.tuples(st.integers(0, 2), st.sampled_from([None, "bn", "drop"]), st.booleans())
    return {
        "blocks": draw(st.lists(block, min_size=1, max_size=3)),
        "d_z": draw(st.integers(2, 6)),
        "dropout": draw(st.booleans()),
        "heads": draw(st.lists(head, min_size=2, max_size=4)),
        "seed": draw(st.integers(0, 2**16)),
        "eval": draw(st.booleans()),
    }


def _build(arch: dict) -> tuple[Net, list[Tensor]]:
    torch.manual_seed(arch["seed"])
    net = Net(arch).to(DTYPE)
    if arch["eval"]:
        net.eval()
    x = torch.randn(4, 2, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(arch["seed"]))
    return net, net.losses(x)


def _close(actual: Tensor, expected: Tensor, scale: float, what: str) -> None:
    err = float((actual - expected).abs().max())
    assert err <= TOL * max(scale, 1e-300), f"{what}: max |Δ| = {err:.3e} (scale {scale:.3e})"


@given(arch=architectures())
def test_sum_without_keep_norm_equals_a_plain_backward(arch: dict) -> None:
    net, tasks = _build(arch)
    params = list(net.parameters())
    expected = torch.autograd.grad(sum(tasks), params, retain_graph=True, allow_unused=True)
    impartial.backward(tasks, solver=Sum(), keep_norm=False)
    scale = max(float(e.abs().max()) for e in expected if e is not None)
    for (name, p), e in zip(net.named_parameters(), expected):
        if e is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            _close(p.grad, e, scale, name)


@pytest.mark.parametrize("solver", _no_arg_solvers(), ids=lambda c: c.__name__)
@given(arch=architectures())
def test_any_solver_gives_finite_grads_and_leaves_task_specific_grads_untouched(solver: type, arch: dict) -> None:
    net, tasks = _build(arch)
    own = [net.own_params(i) for i in range(len(tasks))]
    expected = [torch.autograd.grad(t, ps, retain_graph=True) for t, ps in zip(tasks, own)]
    impartial.backward(tasks, solver=solver())
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for i, (ps, es) in enumerate(zip(own, expected)):
        scale = max(float(e.abs().max()) for e in es)
        for p, e in zip(ps, es):
            _close(p.grad, e, scale, f"task {i}'s own parameter")
