"""Issue 10 points 5–7: inputs that plain ``backward`` accepts are accepted (or refused by an error that
names them), degenerate calls raise instead of silently running a plain backward, and non-finite ``also``
terms or a lone non-finite task follow ``nonfinite=``.  Every error leaves every ``.grad`` untouched.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

import impartial
from dropin.arch import DTYPE, MODES, Arch, Net, Tap
from dropin.harness import backward, block_arg, forward, step, twins
from dropin.observe import assert_grads
from impartial.solvers import IMTLG, Sum
from reference.backward import backward_ref

ARCH = Arch(features=("linear",), groups=(1, 1, 1), also=("kl",))


def _grads(net: Net) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _untouched(net: Net, before: list[Tensor | None]) -> None:
    for (n, p), b in zip(net.named_parameters(), before):
        assert (p.grad is None) == (b is None) and (b is None or torch.equal(p.grad, b)), f".grad of {n} changed"


def _seeded(arch: Arch = ARCH) -> tuple[Net, Net]:
    imp, plain = twins(arch)
    for net in (imp, plain):
        for i, p in enumerate(net.parameters()):
            if i % 2 == 0 and p.requires_grad:
                p.grad = torch.full_like(p, 0.25)
    return imp, plain


def _works_or_names(imp: Net, plain: Net, call, *patterns: str) -> None:
    """Either the call equals plain backward, or it raises an error matching every one of ``patterns``
    (case-insensitive) and leaves every ``.grad`` untouched."""
    before = _grads(imp)
    b = step(plain, "plain", "auto")
    a = forward(imp)
    try:
        call(imp, a)
    except Exception as err:  # noqa: BLE001 - any type, as long as it names the cause
        for pattern in patterns:
            assert re.search(pattern, str(err), re.IGNORECASE), f"{type(err).__name__} does not name {pattern!r}: {err}"
        _untouched(imp, before)
        return
    assert_grads(imp, plain, a.x, b.x)


# -- point 5: inputs plain backward accepts -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_among_the_shared_ones_are_skipped(mode: str) -> None:
    imp, plain = _seeded(Arch(features=("frozen", "linear"), groups=(1, 2), also=("kl",)))
    a, b = step(imp, "impartial", mode), step(plain, "plain", mode)
    assert_grads(imp, plain, a.x, b.x)


@pytest.mark.parametrize("mode", MODES)
def test_losses_of_shape_one_are_accepted(mode: str) -> None:
    imp, plain = _seeded()
    b = step(plain, "plain", mode)
    a = forward(imp)
    a.tasks = [t.reshape(1) for t in a.tasks]
    backward(imp, a, "impartial", mode)
    assert_grads(imp, plain, a.x, b.x)


@pytest.mark.parametrize("mode", MODES)
def test_a_constant_also_term_adds_nothing(mode: str) -> None:
    imp, plain = _seeded()
    b = forward(plain)
    b.also.append(torch.tensor(0.75, dtype=DTYPE))
    backward(plain, b, "plain", mode)
    a = forward(imp)
    a.also.append(torch.tensor(0.75, dtype=DTYPE))
    backward(imp, a, "impartial", mode)
    assert_grads(imp, plain, a.x, b.x)


@pytest.mark.parametrize("also", [("reg",), ("kl", "reg")])
def test_an_also_term_that_meets_the_tasks_at_leaves_only_is_freed_as_in_plain(also: tuple[str, ...]) -> None:
    """``block="params"``: weight decay (``reg``) meets the tasks only at the parameters, so its own nodes run in
    one pass, which frees them as plain does; a KL on the latent shares nodes and is freed by the trunk's pass.
    Found by the thorough profile (the graph of ``reg`` was kept after the call)."""
    for i in range(2):  # the first call of a structure and a later one
        net = Net(Arch(groups=(2,), also=also, seed=1))
        tasks, terms, _ = net.losses(net.input())
        impartial.backward(tasks, net.shared(), also=terms, solver=IMTLG(), block="params")
        # the KL's path runs through the trunk, whose batched pass frees it once vmap has run the structure
        # (docs/backward.md): from the second call on
        for name, t in zip(also, terms):
            if name == "reg" or i:
                with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                    torch.autograd.grad(t, [net.inp.bias], retain_graph=True)


def test_a_single_block_tensor_is_one_marked_block() -> None:
    imp, plain = _seeded()
    b = step(plain, "plain", "auto")
    a = forward(imp)
    impartial.backward(a.tasks, imp.shared(), solver=Sum(), keep_norm=False, also=a.also, block=a.acts["z"])
    assert_grads(imp, plain, a.x, b.x)


@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpoint_works_or_is_named(mode: str) -> None:
    imp, plain = _seeded(Arch(features=("linear", "checkpoint_reentrant"), groups=(1, 2), also=("kl",)))
    _works_or_names(imp, plain, lambda net, run: backward(net, run, "impartial", mode), "reentrant")


@pytest.mark.parametrize("mode", MODES)
def test_sparse_gradients_work_or_are_named(mode: str) -> None:
    imp, plain = twins(Arch(features=("embedding_sparse",), groups=(1, 2), also=("kl",)))  # .grad None: sparse
    _works_or_names(
        imp, plain, lambda net, run: backward(net, run, "impartial", mode), "sparse", r"shared_params\[\d+\]"
    )


def test_the_meta_device_works_or_is_named() -> None:
    with torch.device("meta"):
        enc, heads = torch.nn.Linear(3, 4), [torch.nn.Linear(4, 1) for _ in range(2)]
        z = enc(torch.randn(5, 3))
        tasks = [h(z).pow(2).mean() for h in heads]
    try:
        impartial.backward(tasks, enc.parameters(), solver=Sum(), keep_norm=False)
    except Exception as err:  # noqa: BLE001
        assert re.search(r"meta device|device\W+meta", str(err)), f"{type(err).__name__} names no meta device: {err}"
        assert all(p.grad is None for m in [enc, *heads] for p in m.parameters())
        return
    assert all(
        p.grad is not None and p.grad.device.type == "meta" and p.grad.shape == p.shape
        for m in [enc, *heads]
        for p in m.parameters()
    )


# -- point 6: degenerate calls raise ----------------------------------------------------------------------------


def _raises_untouched(call, error: type[BaseException], pattern: str) -> None:
    imp, _ = _seeded()
    before = _grads(imp)
    a = forward(imp)
    with pytest.raises(error, match=pattern):
        call(imp, a)
    _untouched(imp, before)


def test_empty_shared_params_raise() -> None:
    _raises_untouched(lambda net, a: impartial.backward(a.tasks, [], also=a.also), ValueError, "shared_params")


def test_an_exhausted_generator_of_shared_params_raises() -> None:
    def call(net: Net, a) -> None:
        params = net.shared_generator = net.parameters()
        list(params)
        impartial.backward(a.tasks, params, also=a.also)

    _raises_untouched(call, ValueError, "shared_params")


def test_an_empty_solver_list_raises() -> None:
    _raises_untouched(
        lambda net, a: impartial.backward(a.tasks, net.shared(), solver=[], also=a.also), ValueError, "solver"
    )


def test_a_list_of_one_loss_vector_finds_the_real_block_or_raises() -> None:
    imp, ref = _seeded()

    def losses(net: Net) -> tuple[list[Tensor], dict]:
        run = forward(net)
        Y = torch.cat(run.acts["y"], -1)
        return list((Y - net.targets).pow(2).flatten(0, -2).mean(0)), run.acts

    tasks, acts = losses(ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    expected = backward_ref(tasks, [acts["z"]], params, IMTLG(), keep_norm=True)
    for p, e in zip(params, expected):
        p.grad = e if p.grad is None else p.grad + e
    before = _grads(imp)
    tasks, _ = losses(imp)
    try:
        impartial.backward(tasks, imp.shared(), solver=IMTLG())
    except ValueError:
        _untouched(imp, before)
        return
    for (n, p), (_, q) in zip(imp.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_a_compiled_forward_that_makes_every_parameter_a_block_warns() -> None:
    net = Net(ARCH)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def tasks(x: Tensor) -> list[Tensor]:
        return net._losses(x, Tap())[0]  # no dropout: no RNG to reseed

    with pytest.warns(UserWarning, match="(?i)compil|own block|every parameter"):
        report = impartial.backward(tasks(net.input()), net.shared())
    assert re.search("(?i)compil|own block|every parameter", str(report)), str(report)


# -- point 7: non-finite also terms and lone tasks follow nonfinite= ------------------------------------------


def _nan_grad(t: Tensor) -> Tensor:
    """A finite value whose gradient is NaN (d sqrt(0) = inf, times 0)."""
    return (t.flatten()[0] * 0).abs().sqrt()


@pytest.mark.parametrize("mode", MODES)
def test_a_nonfinite_also_term_raises_and_leaves_grad_untouched(mode: str) -> None:
    def call(net: Net, a) -> None:
        a.also = [a.also[0] + _nan_grad(a.acts["z"])]
        backward(net, a, "impartial", mode)

    _raises_untouched(call, FloatingPointError, "also")


@pytest.mark.parametrize("mode", MODES)
def test_a_nonfinite_also_term_is_skipped_and_named(mode: str) -> None:
    """Skipped like a task: the result is plain backward without the term, and the report names it."""
    imp, plain = _seeded()
    b = forward(plain)
    sum(b.tasks).backward()
    a = forward(imp)
    report = impartial.backward(
        a.tasks,
        imp.shared(),
        solver=Sum(),
        keep_norm=False,
        nonfinite="skip",
        also=[a.also[0] + _nan_grad(a.acts["z"])],
        block=block_arg(imp, mode, a.acts),
    )
    for n, p in imp.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f".grad of {n} is not finite"
    assert_grads(imp, plain, a.x, b.x)
    assert any("also" in s for s in report.skipped), report.skipped


@pytest.mark.parametrize(
    "nonfinite",
    [
        "raise",
        "skip",
    ],
)
def test_a_lone_nonfinite_task_follows_nonfinite(nonfinite: str) -> None:
    imp, plain = _seeded()
    b = forward(plain)
    b.also[0].backward()
    a = forward(imp)
    lone = [a.tasks[0] + _nan_grad(a.acts["z"])]
    before = _grads(imp)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"losses\[0\]"):
            impartial.backward(lone, imp.shared(), also=a.also)
        _untouched(imp, before)
    else:
        report = impartial.backward(lone, imp.shared(), also=a.also, nonfinite="skip")
        assert report.skipped == ("losses[0]",)
        assert_grads(imp, plain, a.x, b.x)
