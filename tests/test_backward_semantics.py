"""Semantics of ``impartial.backward`` beyond the plain-backward equality: Pareto-stationary blocks under
``keep_norm``, scale extremes in float32, names in the report and errors, solvers given by name."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import impartial
from impartial import _solve
from impartial.solvers import IMTLG, MGDA, Status, Sum, UPGrad


def _two_heads(dtype: torch.dtype, scale: float = 1.0, opposed: bool = False, zero: bool = False) -> tuple:
    torch.manual_seed(0)
    enc = nn.Linear(4, 3).to(dtype)
    x = torch.randn(6, 4, dtype=torch.float64).to(dtype)  # the same numbers in either dtype
    z = enc(x)
    w = torch.randn(3, dtype=torch.float64).to(dtype)
    losses = [scale * (z @ w).sum(), scale * (-(z @ w).sum() if opposed else z.pow(2).sum())]
    if zero:
        losses.append(0.0 * z.sum())
    return enc, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["upgrad-opposed", "mgda-zero-task"])
def test_a_pareto_stationary_block_passes_zero_under_keep_norm(dtype: torch.dtype, case: str) -> None:
    """The exact direction is 0; rescaling rounding noise to the plain sum's norm would point anywhere (it used to:
    ~1e11x, float32 and float64 unrelated).  The block passes 0 and the report says STATIONARY."""
    solver = UPGrad() if case.startswith("upgrad") else MGDA()
    enc, losses = _two_heads(dtype, opposed=case.endswith("opposed"), zero=case.endswith("task"))
    report = impartial.backward(losses, enc, solver=solver)
    assert report.blocks[0].statuses == ("STATIONARY",) and "STATIONARY" in str(report)
    assert float(report.blocks[0].scale) == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in enc.parameters())


def test_without_keep_norm_a_stationary_block_passes_its_tiny_direction_and_says_so() -> None:
    enc, losses = _two_heads(torch.float64, opposed=True)
    report = impartial.backward(losses, enc, solver=UPGrad(), keep_norm=False)
    assert report.blocks[0].status is not None and int(report.blocks[0].status) == Status.STATIONARY
    assert float(enc.weight.grad.abs().max()) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [0.0, 1e-9, 1e-6, 1e-3, 1.0])
def test_without_keep_norm_the_gram_shortcut_marks_what_the_direction_norm_marks(
    dtype: torch.dtype, gap: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_norm=False on the CPU: where ``wᵀGw`` proves the direction far above the stationarity level, the pass
    over the direction is skipped; elsewhere it runs.  Either way the status and ``.grad`` are those of the pass."""
    passes: list[int] = []
    real = _solve._sq_norm
    monkeypatch.setattr(_solve, "_sq_norm", lambda *a: passes.append(1) or real(*a))

    def run() -> tuple[tuple[str, ...], list[Tensor]]:
        torch.manual_seed(0)
        enc = nn.Linear(4, 3).to(dtype)
        z = enc(torch.randn(6, 4, dtype=torch.float64).to(dtype))
        w = torch.randn(3, dtype=torch.float64)
        v = (w + gap * torch.randn(3, dtype=torch.float64)).to(dtype)
        report = impartial.backward([(z @ w.to(dtype)).sum(), -(z @ v).sum()], enc, solver=UPGrad(), keep_norm=False)
        return report.blocks[0].statuses, [p.grad for p in enc.parameters()]

    status, grads = run()
    shortcut = not passes
    monkeypatch.setattr(_solve, "_clearly_moving", lambda *a: False)  # the pass over the direction decides
    passes.clear()
    ref_status, ref_grads = run()
    assert passes and status == ref_status and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    if gap == 1.0:
        assert shortcut and status == ("OK",)  # far from stationary: no pass over the direction
    if gap == 0.0:
        assert status == ("STATIONARY",)


def test_a_small_but_real_direction_is_rescaled() -> None:
    """Nearly (not exactly) opposed tasks: a direction well above rounding noise keeps keep_norm's rescaling."""
    torch.manual_seed(1)
    enc = nn.Linear(4, 3).double()
    z = enc(torch.randn(6, 4, dtype=torch.float64))
    w = torch.randn(3, dtype=torch.float64)
    losses = [(z @ w).sum(), -(z @ (w + 1e-3 * torch.randn(3, dtype=torch.float64))).sum()]
    report = impartial.backward(losses, enc, solver=UPGrad())
    assert report.blocks[0].statuses == ("OK",) and float(report.blocks[0].scale) > 0


@pytest.mark.parametrize("scale", [1e-24, 1e-12, 1.0, 1e12, 1e19])
@pytest.mark.parametrize("solver", [IMTLG, UPGrad, Sum])
def test_float32_at_scale_extremes_matches_float64(scale: float, solver: type) -> None:
    """Losses times 1e-24 gave .grad == 0 and times 1e19 raised 'not finite' for finite gradients (the Gram and the
    keep_norm norms under- and overflowed in float32)."""
    got = {}
    for dtype in (torch.float32, torch.float64):
        enc, losses = _two_heads(dtype, scale=scale)
        impartial.backward(losses, enc, solver=solver())
        got[dtype] = torch.cat([p.grad.flatten() for p in enc.parameters()])
    ref = got[torch.float64]
    assert torch.isfinite(got[torch.float32]).all()
    assert float((got[torch.float32].double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_sibling_blocks_get_distinct_names_in_the_order_solvers_are_given() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    za, zb = a(x).tanh(), b(x).tanh()
    losses = [(za * zb).sum(), (za - zb).pow(2).sum(), za.sum() + zb.sum()]
    report = impartial.backward(losses, solver=Sum(), keep_norm=False)
    names = [blk.name for blk in report.blocks]
    assert len(set(names)) == len(names) == 2 and names == ["TanhBackward0 [5, 4] #1", "TanhBackward0 [5, 4] #2"]


def test_a_module_as_shared_params_names_its_parameters() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    z = trunk(torch.randn(5, 3))
    bad = [z.sum(), (z * float("nan")).sum()]
    with pytest.raises(FloatingPointError, match="losses\\[1\\]"):
        impartial.backward(bad, trunk, block="params")
    z = trunk(torch.randn(5, 3))
    report = impartial.backward([z.sum(), z.pow(2).sum()], trunk, block="params", also=[z.mean()])
    assert "also terms: also[0]" in str(report) and "also also" not in str(report)


def test_a_stateful_solver_by_name_raises_and_a_stateless_one_works() -> None:
    enc, losses = _two_heads(torch.float64)
    with pytest.raises(ValueError, match="GradNorm\\(\\)"):
        impartial.backward(losses, enc, solver="gradnorm")
    assert impartial.backward(losses, enc, solver="imtl-g").solver == "IMTLG()"


def _nested() -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    enc = nn.Linear(3, 4)
    h = enc(torch.randn(5, 3))
    z = h.tanh()
    return enc, [z.sum(), z.pow(2).sum(), h.pow(3).mean()]


def test_the_report_lists_blocks_in_the_order_one_solver_per_block_is_given() -> None:
    enc, losses = _nested()
    report = impartial.backward(losses, enc, solver=[Sum(), Sum()], keep_norm=False)
    assert [b.above for b in report.blocks] == [(), (0,)]


def test_the_whole_model_as_shared_params_names_head_parameters_and_keeps_heads_their_own() -> None:
    """In auto mode a parameter one task alone reaches is a head whatever ``shared_params`` lists, so passing the
    whole model only adds names: errors then name a head parameter by its module path."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Linear(3, 4), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    x = torch.randn(5, 3)

    def losses() -> list[Tensor]:
        z = model["trunk"](x)
        return [model["a"](z).pow(2).mean(), model["b"](z).sum()]

    impartial.backward(losses(), model, solver=IMTLG())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    impartial.backward(losses(), model["trunk"], solver=IMTLG())
    assert all(torch.equal(a, b.grad) for a, b in zip(got, model.parameters()))
    bad = losses()
    bad[1] = bad[1] + model["b"].weight.sum() * float("inf")
    with pytest.raises(FloatingPointError, match=r"'b\.weight \[1, 4\]'"):
        impartial.backward(bad, model, solver=IMTLG())


def _hivae() -> tuple[nn.Module, list[Tensor], list[Tensor], dict[str, Tensor]]:
    """Two latents read by every head, ``z ~ q(z | x, s)``: the block at ``s`` is nested below the one at ``z``."""
    torch.manual_seed(3)
    enc = nn.ModuleDict({"s": nn.Linear(4, 3), "z": nn.Linear(7, 2)}).double()
    heads = nn.ModuleList(nn.Linear(5, 2) for _ in range(3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    s = enc["s"](x).tanh()
    z = enc["z"](torch.cat([x, s], -1)).tanh()
    tasks = [(h(torch.cat([z, s], -1)) - i).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
    return enc, tasks, [1e-2 * s.pow(2).sum()], {"z": z, "s": s}


@pytest.mark.parametrize("mode", ["auto", "marked"])
@pytest.mark.parametrize("solver", [IMTLG, UPGrad, Sum])
def test_nested_direct_equals_the_reference_hooks(mode: str, solver: type) -> None:
    from reference.backward import backward_ref_direct

    enc, tasks, also, acts = _hivae()
    expected = backward_ref_direct(tasks, [acts["z"], acts["s"]], list(enc.parameters()), solver(), also=also)
    report = impartial.backward(
        tasks,
        enc,
        solver=solver(),
        also=also,
        nested="direct",
        block="auto" if mode == "auto" else [acts["z"], acts["s"]],
    )
    assert [b.above for b in report.blocks] == [(), (0,)]
    for p, e in zip(enc.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_nested_resolved_and_direct_differ_only_below_the_top_block() -> None:
    grads = {}
    for nested in ("resolved", "direct"):
        enc, tasks, also, _ = _hivae()
        impartial.backward(tasks, enc, solver=IMTLG(), also=also, nested=nested)
        grads[nested] = [p.grad for p in enc.parameters()]
    # the encoder of z sees only the top block: the same; the encoder of s sees the nested block: different
    torch.testing.assert_close(grads["resolved"][2], grads["direct"][2], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(grads["resolved"][0], grads["direct"][0], rtol=1e-6)


def _siblings() -> tuple[nn.Module, list[Tensor]]:
    """Two sibling blocks (the encoders of two modalities) read by three heads: one solver serves both."""
    torch.manual_seed(5)
    enc = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}).double()
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3)).double()
    za, zb = enc["a"](torch.randn(6, 3, dtype=torch.float64)), enc["b"](torch.randn(6, 2, dtype=torch.float64))
    return enc, [(h(torch.cat([za, zb], -1)) - i).pow(2).mean() for i, h in enumerate(heads)]


def test_one_stateful_solver_keeps_one_state_per_block_and_round_trips() -> None:
    """A GradNorm serving two blocks used to advance its one state twice per call (7x per call on the zoo's MVAE);
    each block now has its own, and ``state_dict`` restores them bit for bit."""
    from impartial.solvers import GradNorm

    solver = GradNorm(lr=0.1)
    for _ in range(3):
        enc, losses = _siblings()
        report = impartial.backward(losses, enc, solver=solver)
    assert len(report.blocks) == 2
    steps = {j: int(s["step"]) for j, s in solver.state_dict()["blocks"].items()}
    assert steps == {0: 3, 1: 3}
    twin = GradNorm(lr=0.1)
    twin.load_state_dict(solver.state_dict())
    grads = []
    for s in (solver, twin):
        enc, losses = _siblings()
        impartial.backward(losses, enc, solver=s)
        grads.append([p.grad.clone() for p in enc.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unlisted_leaves_below_a_block_get_the_resolved_gradient_and_heads_their_own() -> None:
    """What the docstring says of ``shared_params`` under ``block="auto"``: a leaf below the block that is not listed
    (the first layer here) gets the resolved gradient, as the listed ones do; a head gets its own task's gradient."""
    torch.manual_seed(0)
    first, second = nn.Linear(5, 4).double(), nn.Linear(4, 3).double()
    heads = [nn.Linear(3, 1).double() for _ in range(3)]
    x = torch.randn(7, 5, dtype=torch.float64)
    z = second(torch.tanh(first(x)))
    losses = [h(z).pow(2).sum() * s for h, s in zip(heads, (1.0, 10.0, 0.1))]
    params = [*first.parameters(), *second.parameters(), *(p for h in heads for p in h.parameters())]
    from reference.backward import backward_ref

    expected = backward_ref(losses, [z], params, IMTLG())
    plain = torch.autograd.grad(sum(losses), list(first.parameters()), retain_graph=True)
    assert not torch.allclose(plain[0], expected[0])  # the resolved gradient is not the plain one here
    report = impartial.backward(losses, second, solver=IMTLG())  # only `second` listed
    assert report.blocks[0].name.startswith("AddmmBackward0")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
