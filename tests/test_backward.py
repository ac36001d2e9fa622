"""``impartial.backward``: the semantics of issue 3, exact in float64, on the models of ``models.py``."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import impartial
from impartial.solvers import IMTLG, Mean, Solver, Sum
from models import DTYPE, MLP, MODELS, make, shared_params

MODES = ["auto", "params", "explicit"]


@pytest.fixture(autouse=True)
def _force_task_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``IMPARTIAL_TASK_GRADS=batched`` (or ``loop``) runs every test of this module with that per-task pass
    forced (tests that choose ``task_grads=`` themselves are then skipped)."""
    import impartial._autograd as A

    monkeypatch.setattr(A, "FORCE", os.environ.get("IMPARTIAL_TASK_GRADS") or None)


chooses = pytest.mark.skipif(
    bool(os.environ.get("IMPARTIAL_TASK_GRADS")),
    reason="checks the per-task pass itself; IMPARTIAL_TASK_GRADS forces one",
)


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _close(a: list[Tensor | None], b: list[Tensor | None], tol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), i
        if x is not None:
            err = float((x - y).abs().max())
            assert err <= tol * max(1.0, float(y.abs().max())), (i, err)


def _block(mode: str, acts: dict[str, Tensor]) -> str | list[Tensor]:
    return list(acts.values()) if mode == "explicit" else mode


def _seed_grads(model: nn.Module) -> None:
    """Put existing gradients on half the parameters: .grad must accumulate like Tensor.backward."""
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 0.25)


class UnitSum(Solver):
    """A nonlinear test solver: the sum of the unit task gradients (zero rows stay zero)."""

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        n = J.norm(dim=-1, keepdim=True)
        return torch.where(n > 0, J / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(J))


class Spy(Solver):
    """Records the ``J`` (and context) it is given; returns ``inner``'s rows."""

    def __init__(self, inner: Solver) -> None:
        self.inner, self.seen = inner, []

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        self.seen.append((J.clone(), losses, context))
        return self.inner.apply(J, losses=losses, **context)


# -- 1. Sum reproduces the plain backward --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_sum_without_keep_norm_equals_plain_backward(name: str, mode: str) -> None:
    ref, x = make(name)
    _seed_grads(ref)
    tasks, also, _ = ref.losses(x)
    sum(tasks + also).backward()
    model, x = make(name)
    _seed_grads(model)
    tasks, also, acts = model.losses(x)
    impartial.backward(tasks, shared_params(model), solver=Sum(), keep_norm=False, also=also, block=_block(mode, acts))
    _close(_grads(model), _grads(ref))


@given(
    k=st.integers(2, 5),
    d_z=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(MODES),
    infer=st.booleans(),
)
def test_sum_equals_plain_backward_for_any_mlp(k: int, d_z: int, seed: int, mode: str, infer: bool) -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(MLP(d_z=d_z, k=k).to(DTYPE))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    tasks, also, _ = models[0].losses(x)
    sum(tasks + also).backward()
    tasks, also, acts = models[1].losses(x)
    impartial.backward(
        tasks,
        None if infer else models[1].trunk.parameters(),
        solver="sum",
        keep_norm=False,
        also=also,
        block=_block(mode, acts),
    )
    _close(_grads(models[1]), _grads(models[0]))


def test_mean_with_keep_norm_equals_sum() -> None:
    """``keep_norm`` rescales the block direction to the norm of the plain sum: Mean becomes Sum."""
    ref, x = make("vae")
    tasks, also, _ = ref.losses(x)
    sum(tasks + also).backward()
    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    report = impartial.backward(tasks, model.trunk.parameters(), solver=Mean(), also=also)
    _close(_grads(model), _grads(ref), 1e-11)
    assert abs(float(report.blocks[0].scale) - 3.0) < 1e-12


# -- 2. task-specific parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_single_task_parameters_get_exactly_their_task_gradient(name: str, mode: str) -> None:
    model, x = make(name)
    tasks, also, acts = model.losses(x)
    expected = []
    for i, head in enumerate(model.heads):
        ps = list(head.parameters())
        expected.append(
            torch.autograd.grad(
                tasks[i] + sum(also, torch.zeros((), dtype=DTYPE)), ps, retain_graph=True, allow_unused=True
            )
        )
    impartial.backward(tasks, shared_params(model), solver=UnitSum(), also=also, block=_block(mode, acts))
    for head, exp in zip(model.heads, expected):
        _close([p.grad for p in head.parameters()], list(exp))


# -- 3. the block on encoder → z → heads ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", [Mean(), UnitSum(), IMTLG()], ids=repr)
def test_auto_block_rows_are_task_gradients_and_trunk_gets_the_direction(solver: Solver) -> None:
    model, x = make("mlp")
    tasks, also, acts = model.losses(x)
    z, trunk = acts["z"], list(model.trunk.parameters())
    rows = torch.stack([torch.autograd.grad(t, z, retain_graph=True)[0] for t in tasks])
    J = rows.reshape(len(tasks), -1)
    d = solver(J)
    d = d * J.sum(0).norm() / d.norm()
    expected = torch.autograd.grad(
        [z, also[0]], trunk, [d.reshape(z.shape), torch.ones_like(also[0])], retain_graph=True
    )
    spy = Spy(solver)
    report = impartial.backward(tasks, trunk, solver=spy, also=also)
    assert [b.name for b in report.blocks] == ["AddmmBackward0 [6, 6]"]
    torch.testing.assert_close(spy.seen[0][0], J, rtol=1e-13, atol=0)
    torch.testing.assert_close(spy.seen[0][1], torch.stack(tasks).detach(), rtol=0, atol=0)
    _close([p.grad for p in trunk], list(expected))


# -- 4. several blocks, a block below another, losses reaching no shared parameter -----------------------------


def _resolved(solver: Solver, rows: Tensor, keep_norm: bool = True) -> Tensor:
    """The block's resolved task gradients ``[k, *shape]`` (their sum is the direction)."""
    J = rows.reshape(rows.shape[0], -1)
    R = solver.apply(J)
    if keep_norm:
        R = R * J.sum(0).norm() / R.sum(0).norm()
    return R.reshape(rows.shape)


def test_two_latents_give_two_blocks_each_resolved() -> None:
    model, x = make("hivae")
    tasks, also, acts = model.losses(x)
    z, s = acts["z"], acts["s"]
    d = [
        _resolved(UnitSum(), torch.stack([torch.autograd.grad(t, a, retain_graph=True)[0] for t in tasks])).sum(0)
        for a in (z, s)
    ]
    shared = model.shared()
    expected = torch.autograd.grad([z, s, also[0]], shared, [d[0], d[1], torch.ones_like(also[0])], retain_graph=True)
    report = impartial.backward(tasks, shared, solver=UnitSum(), also=also)
    assert sorted(b.name for b in report.blocks) == ["SigmoidBackward0 [6, 2]", "TanhBackward0 [6, 3]"]
    _close([p.grad for p in shared], list(expected))


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_block_below_another_sees_the_resolved_gradients_of_the_block_above(mode: str) -> None:
    """Heads 0, 1 on ``z = g(h)``, head 2 on ``h``: ``z`` resolves tasks 0, 1; ``h`` resolves their
    resolved gradients (pulled back through ``g``) against task 2's."""
    model, x = make("lower")
    tasks, also, acts = model.losses(x)
    z, h = acts["z"], acts["h"]
    solver = UnitSum()
    Rz = _resolved(solver, torch.stack([torch.autograd.grad(t, z, retain_graph=True)[0] for t in tasks[:2]]))
    rows_h = torch.stack(
        [
            torch.autograd.grad(z, h, Rz[0], retain_graph=True)[0],
            torch.autograd.grad(z, h, Rz[1], retain_graph=True)[0],
            torch.autograd.grad(tasks[2], h, retain_graph=True)[0],
        ]
    )
    dh = _resolved(solver, rows_h).sum(0)
    mid, trunk = list(model.mid.parameters()), list(model.trunk.parameters())
    exp_mid = torch.autograd.grad(z, mid, Rz.sum(0), retain_graph=True)
    exp_trunk = torch.autograd.grad(h, trunk, dh, retain_graph=True)
    report = impartial.backward(tasks, model.shared(), solver=solver, block=_block(mode, {"z": z, "h": h}))
    assert [b.above for b in report.blocks] == [(), (0,)]
    assert [b.tasks for b in report.blocks] == [("losses[0]", "losses[1]"), ("losses[0]", "losses[1]", "losses[2]")]
    _close([p.grad for p in mid], list(exp_mid))
    _close([p.grad for p in trunk], list(exp_trunk))


def test_a_parameter_two_heads_read_directly_is_a_leaf_block() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, dtype=DTYPE))
    x = torch.randn(6, 4, dtype=DTYPE)
    tasks = [(x * w).sum().pow(2), (x * w).tanh().sum(), ((x - 1) * w).pow(2).mean()]
    rows = torch.stack([torch.autograd.grad(t, w, retain_graph=True)[0] for t in tasks])
    expected = _resolved(UnitSum(), rows).sum(0)
    report = impartial.backward(tasks, [w], solver=UnitSum())
    assert report.blocks[0].name == "shared_params[0] [4]"
    _close([w.grad], [expected])


def test_a_leaf_block_below_a_block_gets_the_resolved_gradients_from_above() -> None:
    """``W`` feeds ``z`` (read by heads 0, 1) and is read directly by loss 2: a leaf block below ``z``."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))
    heads = [nn.Linear(4, 1).to(DTYPE) for _ in range(2)]
    x = torch.randn(5, 3, dtype=DTYPE)
    z = torch.tanh(x @ W)
    tasks = [heads[0](z).pow(2).mean(), heads[1](z).sum(), W.pow(3).sum()]
    Rz = _resolved(UnitSum(), torch.stack([torch.autograd.grad(t, z, retain_graph=True)[0] for t in tasks[:2]]))
    rows = torch.stack(
        [
            torch.autograd.grad(z, W, Rz[0], retain_graph=True)[0],
            torch.autograd.grad(z, W, Rz[1], retain_graph=True)[0],
            torch.autograd.grad(tasks[2], W, retain_graph=True)[0],
        ]
    )
    expected = _resolved(UnitSum(), rows).sum(0)
    report = impartial.backward(tasks, solver=UnitSum())
    assert [b.above for b in report.blocks] == [(), (0,)]
    _close([W.grad], [expected])


def test_a_loss_reaching_no_shared_parameter_is_just_backpropagated() -> None:
    model, x = make("mlp")
    lone = nn.Linear(5, 1).to(DTYPE)
    tasks, also, _ = model.losses(x)
    extra = lone(x).pow(2).mean()
    expected = torch.autograd.grad(extra, list(lone.parameters()), retain_graph=True)
    report = impartial.backward(tasks + [extra], model.trunk.parameters(), solver=UnitSum())
    assert report.blocks[0].tasks == ("losses[0]", "losses[1]", "losses[2]")
    _close([p.grad for p in lone.parameters()], list(expected))


@pytest.mark.parametrize("how", ["marked", "declared"])
def test_a_path_around_the_blocks_is_backpropagated_plainly(how: str) -> None:
    """Blocks that do not cover every path (a marked ``z`` only, or only ``mid`` declared shared): task 2's
    path to the trunk passes no block and flows plainly; the trunk gets Σ resolved + task 2's gradient."""
    model, x = make("lower")
    tasks, _, acts = model.losses(x)
    z, trunk = acts["z"], list(model.trunk.parameters())
    Rz = _resolved(UnitSum(), torch.stack([torch.autograd.grad(t, z, retain_graph=True)[0] for t in tasks[:2]]))
    expected = torch.autograd.grad([z, tasks[2]], trunk, [Rz.sum(0), torch.ones_like(tasks[2])], retain_graph=True)
    if how == "marked":
        impartial.backward(tasks, model.shared(), solver=UnitSum(), block=[z])
    else:
        impartial.backward(tasks, model.mid.parameters(), solver=UnitSum())
    _close([p.grad for p in trunk], list(expected))


# -- 5. block="params" ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_params_mode_equals_solving_the_stacked_task_gradients(name: str) -> None:
    model, x = make(name)
    tasks, also, _ = model.losses(x)
    shared = shared_params(model)
    J = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(t, shared, retain_graph=True, materialize_grads=True)]
            )
            for t in tasks
        ]
    )
    d = UnitSum()(J)
    d = d * J.sum(0).norm() / d.norm()
    also_g = torch.autograd.grad(also, shared, retain_graph=True) if also else [0] * len(shared)
    expected = [piece.reshape(p.shape) + a for piece, p, a in zip(d.split([p.numel() for p in shared]), shared, also_g)]
    impartial.backward(tasks, shared, solver=UnitSum(), block="params", also=also)
    _close([p.grad for p in shared], expected)


# -- 6. per_sample ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "vae"])
def test_per_sample_equals_a_loop_over_the_batch(name: str) -> None:
    model, x = make(name)
    tasks, also, acts = model.losses(x)
    z, trunk = acts["z"], list(model.trunk.parameters())
    rows = torch.stack([torch.autograd.grad(t, z, retain_graph=True)[0] for t in tasks])
    d = torch.stack([_resolved(UnitSum(), rows[:, b]).sum(0) for b in range(z.shape[0])])
    expected = torch.autograd.grad([z] + also, trunk, [d] + [torch.ones_like(a) for a in also], retain_graph=True)
    report = impartial.backward(tasks, trunk, solver=UnitSum(), per_sample=True, also=also)
    assert report.blocks[0].scale.shape == (z.shape[0],)
    _close([p.grad for p in trunk], list(expected))


def test_per_sample_gives_the_solver_one_problem_per_sample() -> None:
    model, x = make("mlp")
    tasks, _, acts = model.losses(x)
    spy = Spy(Mean())
    impartial.backward(tasks, model.trunk.parameters(), solver=spy, per_sample=True)
    assert spy.seen[0][0].shape == (6, 3, 6) and spy.seen[0][1].shape == (6, 3)


# -- 7. one batched backward; the loop fallback -------------------------------------------------------------------


@chooses
@pytest.mark.parametrize(
    "task_grads, expected", [("batched", [True, False]), ("loop", [False] * 4), ("auto", [False] * 4)]
)
def test_per_task_gradients_come_from_one_batched_backward_or_a_loop(
    monkeypatch: pytest.MonkeyPatch, task_grads: str, expected: list
) -> None:
    """Batched: one vmapped pass, then the one backward through the trunk.  Loop: one pass per task.  The VAE's
    decoders are disjoint above the block, so ``auto`` picks the loop (each decoder is traversed once)."""
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    monkeypatch.setattr(torch.autograd, "grad", counting)
    report = impartial.backward(tasks, model.trunk.parameters(), solver=Mean(), also=also, task_grads=task_grads)
    assert calls == expected
    assert report.fallback is None and not report.vmap_fallback
    assert report.blocks[0].task_grads == ("batched" if task_grads == "batched" else "loop")
    assert ("one batched backward" if task_grads == "batched" else "a loop over tasks") in str(report)


@chooses
def test_auto_loops_from_the_losses_and_batches_only_when_asked() -> None:
    """Losses that are columns of one shared head, with the block marked below the head: a batched pass would run
    the head once, but each loss has nodes of its own (its column, its square), whose hooks would see batched
    tensors under vmap: ``"auto"`` loops; ``task_grads="batched"`` batches."""
    model, x = make("mlp")
    z = model.trunk(x)
    out = model.heads[0](z)  # one shared head, two columns
    tasks = [out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]
    report = impartial.backward(tasks, model.trunk.parameters(), block=[z], retain_graph=True)
    assert report.blocks[0].task_grads == "loop"
    report = impartial.backward(tasks, model.trunk.parameters(), block=[z], retain_graph=True, task_grads="batched")
    assert report.blocks[0].task_grads == "batched"
    assert impartial.backward(tasks, model.trunk.parameters()).blocks[0].task_grads == "loop"


class _NoVmap(torch.autograd.Function):
    """A backward that reads a value on the host: torch's vmap cannot batch ``.item()``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * g * x * (1.0 if g.abs().sum().item() >= 0 else 0.0)


@chooses
def test_vmap_failure_falls_back_to_a_loop_and_says_so() -> None:
    grads = []
    for use in (False, True):
        torch.manual_seed(0)
        enc, heads = nn.Linear(3, 4).to(DTYPE), [nn.Linear(4, 1).to(DTYPE) for _ in range(2)]
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        z = enc(x)
        tasks = [_NoVmap.apply(h(z)).sum() for h in heads]
        if use:
            report = impartial.backward(tasks, enc.parameters(), solver=Sum(), keep_norm=False, task_grads="batched")
            assert report.vmap_fallback and "loop" in str(report) and report.blocks[0].task_grads == "loop"
        else:
            sum(tasks).backward()
        grads.append([p.grad.clone() for p in [*enc.parameters(), *heads[0].parameters(), *heads[1].parameters()]])
    _close(grads[1], grads[0])


# -- k = 1, retain_graph, losses as a tensor, solver names, the report ----------------------------------------------


def test_one_task_is_a_plain_backward() -> None:
    ref, x = make("vae")
    tasks, also, _ = ref.losses(x)
    (tasks[0] + also[0]).backward()
    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    report = impartial.backward([tasks[0]], also=also)
    assert report.blocks == ()
    _close(_grads(model), _grads(ref), 0)


def test_retain_graph_behaves_like_torch() -> None:
    model, x = make("mlp")
    tasks, also, _ = model.losses(x)
    impartial.backward(tasks, solver=Sum(), keep_norm=False, also=also, retain_graph=True)
    once = _grads(model)
    impartial.backward(tasks, solver=Sum(), keep_norm=False, also=also)
    _close(_grads(model), [2 * g for g in once])
    with pytest.raises(RuntimeError, match="freed"):
        impartial.backward(tasks, solver=Sum(), also=also)
    _close(_grads(model), [2 * g for g in once])


def test_a_stacked_loss_tensor_is_the_same_as_the_list() -> None:
    out = []
    for stacked in (False, True):
        model, x = make("mlp")
        tasks, also, _ = model.losses(x)
        impartial.backward(torch.stack(tasks) if stacked else tasks, solver=UnitSum(), also=also)
        out.append(_grads(model))
    _close(out[1], out[0])


def test_a_loss_tensor_made_by_one_op_needs_marked_blocks_or_params() -> None:
    model, x = make("mlp")
    z = model.trunk(x)
    L = torch.cat([h(z) for h in model.heads], dim=1).pow(2).mean(0)  # one op makes all k losses
    with pytest.raises(ValueError, match="one operation"):
        impartial.backward(L, model.trunk.parameters())
    report = impartial.backward(L, model.trunk.parameters(), solver=UnitSum(), block=[z], retain_graph=True)
    assert len(report.blocks[0].tasks) == L.numel()
    impartial.backward(L, model.trunk.parameters(), solver=UnitSum(), block="params")


def test_the_default_solver_is_imtlg_and_names_work() -> None:
    model, x = make("mlp")
    tasks, _, _ = model.losses(x)
    assert impartial.backward(tasks, retain_graph=True).solver == "IMTLG()"
    assert impartial.backward(tasks, solver="imtl-g").solver == "IMTLG()"


def test_one_solver_per_block() -> None:
    model, x = make("hivae")
    tasks, _, _ = model.losses(x)
    spies = [Spy(Mean()), Spy(UnitSum())]
    report = impartial.backward(tasks, solver=spies, retain_graph=True)
    assert [s.seen[0][0].shape[-1] for s in spies] == [12, 18] and report.solver == "[Spy(), Spy()]"
    with pytest.raises(ValueError, match="3 solvers"):
        impartial.backward(tasks, solver=[Mean()] * 3)


def test_marked_blocks_give_coordinate_solvers_the_block_inputs() -> None:
    model, x = make("mlp")
    tasks, _, acts = model.losses(x)
    spy = Spy(Mean())
    impartial.backward(tasks, solver=spy, block=[acts["z"]])
    assert torch.equal(spy.seen[0][2]["inputs"], acts["z"].detach())  # [B, F], as GradDrop reads it


def test_graddrop_runs_on_marked_and_automatic_blocks() -> None:
    from impartial.solvers import GradDrop

    for block in ("auto", "explicit"):
        model, x = make("vae")
        tasks, also, acts = model.losses(x)
        impartial.backward(
            tasks,
            model.trunk.parameters(),
            solver=GradDrop(generator=torch.Generator()),
            also=also,
            block=_block(block, {"z": acts["z"]}),
        )
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_report_prints_blocks_tasks_cosines_and_weights() -> None:
    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    report = impartial.backward(
        {"image": tasks[0], "text": tasks[1], "tab": tasks[2]}, model.trunk.parameters(), solver=Mean(), also=also
    )
    text = str(report)
    assert "block 0: AddBackward0 [6, 3]" in text and "image" in text and "weight" in text
    b = report.blocks[0]
    assert b.cosine.shape == (3, 3) and torch.allclose(b.cosine.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(b.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


# -- bad input: a clear error, and .grad untouched --------------------------------------------------------------


def _bad_cases():
    def nonscalar(m, t, a, acts):
        return [t[0], torch.stack([t[1], t[2]])], {}

    def empty(m, t, a, acts):
        return [], {}

    def no_grad(m, t, a, acts):
        return [t[0], t[1].detach()], {}

    def unreached(m, t, a, acts):
        return t, {
            "shared_params": [("stray.weight", nn.Parameter(torch.ones(2, dtype=DTYPE))), *m.trunk.named_parameters()]
        }

    def nonfinite(m, t, a, acts):
        return [t[0], t[1] + (acts["z"][0, 0] * 0).abs().sqrt()], {}  # d sqrt(0) = inf, times 0: NaN

    def nonfinite_params(m, t, a, acts):
        return [t[0], t[1] + (acts["z"][0, 0] * 0).abs().sqrt()], {"block": "params"}

    def freed_trunk(m, t, a, acts):
        a[0].backward()  # frees the trunk's graph (the KL term runs through it); the heads are intact
        return t, {}

    def freed_all(m, t, a, acts):
        sum(t).backward()
        return t, {}

    return [
        ("nonscalar", nonscalar, ValueError, "shape"),
        ("empty", empty, ValueError, "empty"),
        ("no-grad", no_grad, ValueError, r"losses\[1\]' does not require grad"),
        ("unreached-param", unreached, ValueError, "stray.weight"),
        ("nonfinite-task-gradient", nonfinite, FloatingPointError, r"losses\[1\]' at block"),
        ("nonfinite-params", nonfinite_params, FloatingPointError, r"losses\[1\]' w.r.t."),
        ("freed-trunk", freed_trunk, RuntimeError, "freed"),
        ("freed-graph", freed_all, RuntimeError, r"graph of 'losses\[0\]' has already been freed"),
    ]


@pytest.mark.parametrize("case, make_input, error, match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_before_any_grad_is_written(case, make_input, error, match) -> None:
    model, x = make("vae")
    _seed_grads(model)
    tasks, also, acts = model.losses(x)
    losses, kw = make_input(model, tasks, also, acts)
    before = _grads(model)
    kw.setdefault("shared_params", model.trunk.parameters())
    with pytest.raises(error, match=match):
        impartial.backward(losses, solver=Mean(), **kw)
    _close(_grads(model), before, 0)


# -- nonfinite="skip": drop a task whose gradient is not finite ------------------------------------------------------


def _nan_task(tasks: list[Tensor], acts: dict[str, Tensor], i: int) -> list[Tensor]:
    """Task ``i`` gets a NaN gradient at the block (and a NaN loss): ``0 · log(0)`` style poison."""
    out = list(tasks)
    out[i] = out[i] + (acts["z"] * float("nan")).sum()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_a_nonfinite_task_raises_by_default_with_every_grad_untouched(mode: str) -> None:
    model, x = make("vae")
    _seed_grads(model)
    tasks, also, acts = model.losses(x)
    before = _grads(model)
    with pytest.raises(FloatingPointError, match=r"losses\[1\]"):
        impartial.backward(_nan_task(tasks, acts, 1), model.trunk.parameters(), also=also, block=_block(mode, acts))
    _close(_grads(model), before, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", [UnitSum(), IMTLG()], ids=repr)
def test_skip_equals_the_call_without_the_nonfinite_task(mode: str, solver: Solver) -> None:
    """``nonfinite="skip"`` drops the task from the whole call: the result equals passing the other tasks only
    (its head gets nothing), and the report names it."""
    ref, x = make("vae")
    _seed_grads(ref)
    tasks, also, acts = ref.losses(x)
    impartial.backward([tasks[0], tasks[2]], ref.trunk.parameters(), solver=solver, also=also, block=_block(mode, acts))
    model, x = make("vae")
    _seed_grads(model)
    tasks, also, acts = model.losses(x)
    report = impartial.backward(
        _nan_task(tasks, acts, 1),
        model.trunk.parameters(),
        solver=solver,
        also=also,
        block=_block(mode, acts),
        nonfinite="skip",
    )
    assert report.skipped == ("losses[1]",) and "skipped" in str(report)
    _close(_grads(model), _grads(ref))


def test_skip_restores_stateful_solvers_and_handles_every_task_dropped() -> None:
    from impartial.solvers import GradVac

    model, x = make("vae")
    tasks, also, acts = model.losses(x)
    solver = GradVac()
    state = repr(solver.state_dict())
    bad = [t + (acts["z"] * float("nan")).sum() for t in tasks]
    expected = torch.autograd.grad(also[0], list(model.trunk.parameters()), retain_graph=True)
    report = impartial.backward(bad, model.trunk.parameters(), solver=solver, also=also, nonfinite="skip")
    assert report.skipped == ("losses[0]", "losses[1]", "losses[2]") and report.blocks == ()
    assert repr(solver.state_dict()) == state
    _close([p.grad for p in model.trunk.parameters()], list(expected))
    assert all(p.grad is None for p in model.heads.parameters())


def test_bad_options_raise() -> None:
    model, x = make("mlp")
    tasks, _, _ = model.losses(x)
    with pytest.raises(ValueError, match="task_grads"):
        impartial.backward(tasks, task_grads="vmap")
    with pytest.raises(ValueError, match="nonfinite"):
        impartial.backward(tasks, nonfinite="ignore")


def test_skip_ignores_a_shared_parameter_only_the_dropped_task_reached() -> None:
    model, x = make("vae")
    tasks, also, acts = model.losses(x)
    head = list(model.heads[1].parameters())
    shared = [*model.trunk.parameters(), *head]  # declared shared, but only task 1 reaches the head
    report = impartial.backward(_nan_task(tasks, acts, 1), shared, also=also, nonfinite="skip")
    assert report.skipped == ("losses[1]",) and all(p.grad is None for p in head)


def test_the_overlap_plan_kept_per_structure_matches_a_fresh_one() -> None:
    """``overlap`` keeps which nodes it weighs per (structure, targets, tasks): every combination, asked in
    turn on graphs of two structures, gets the value computed from scratch."""
    from impartial import _autograd
    from impartial.graph import trace

    def cases() -> list:
        out = []
        for name in ("lower", "hivae"):
            model, x = make(name)
            tasks, also, _ = model.losses(x)
            g = trace(tasks, shared_params(model), also=also)
            for targets in ([b.edge.node for b in g.blocks], [g.blocks[-1].edge.node]):
                for mask in (g.task_bits, 3):  # 8 cases: as many as are kept
                    out.append((g, targets, mask))
        return out

    _autograd._RUNS.clear()
    fresh = [_autograd.overlap(g, t, m) for g, t, m in cases()]
    for _ in range(2):
        assert [_autograd.overlap(g, t, m) for g, t, m in cases()] == fresh
    assert len(set(fresh)) > 3 and len(_autograd._RUNS) == 8
