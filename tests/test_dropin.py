"""The drop-in contract (issue 10), proven against PyTorch itself: with ``solver=Sum(), keep_norm=False``,
``impartial.backward(tasks, shared, also=also)`` is indistinguishable from ``sum(tasks + also).backward()``.

Two identical copies of a drawn model (``tests/dropin/arch.py``) run the same forward (reseeded: Dropout draws
the same masks); one backward is plain, the other impartial; then every ``.grad``, every hook's calls and
received values, and the graph's freed/retained state are compared (``tests/dropin/observe.py`` says which
hooks are promised to fire once).  Summation orders differ, so values are compared to 1e-10, never bitwise.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dropin.arch import MODES, Arch, Net, archs
from dropin.features import FEATURES
from dropin.harness import FAST, backward, step, twins
from dropin.observe import Hooks, assert_close, assert_grads, assert_same_calls, freed_heads, unhandled_block
from impartial import _autograd

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


SIMPLE = Arch(groups=(1, 1))
SHARED = Arch(groups=(2,))
#: every structure: two latents read by every head, a shared head, a loss joining lower down, a long skip, weight
#: tying, also terms, an input with grad
RICH = Arch(latents=2, groups=(1, 2), lower=True, tie=True, skip=True, also=("kl", "reg"), x_grad=True)
#: each feature alone in the simplest architecture and in the richest
GRID = {"simple": Arch(groups=(1, 1), also=("kl",)), "rich": RICH}
#: hooks that return 0.5 * grad are drawn from these (``param …``: a parameter's hook)
SCALED = ("h0", "z", "s", "hout", "y0", "y1", "ylow", "param inp.weight", "param lat.0.bias", "param heads.0.out.bias")


def drawn(test: Callable) -> Callable:
    """In every mode, on drawn architectures, and always on the three pinned ones."""
    for arch, why in (
        (RICH, "every structure"),
        (SHARED, "one head shared by two tasks"),
        (SIMPLE, "two one-task heads"),
    ):
        test = example(arch=arch).via(why)(test)
    return pytest.mark.parametrize("mode", MODES)(FAST(given(arch=archs())(test)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", GRID)
@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature_gives_the_plain_grads(feature: str, where: str, mode: str) -> None:
    arch = dataclasses.replace(GRID[where], features=(feature,))
    imp, plain = twins(arch)
    a, b = step(imp, "impartial", mode), step(plain, "plain", mode)
    assert_grads(imp, plain, a.x, b.x)


@drawn
def test_grads_equal_plain_on_drawn_architectures(arch: Arch, mode: str) -> None:
    imp, plain = twins(arch)
    a, b = step(imp, "impartial", mode), step(plain, "plain", mode)
    assert_grads(imp, plain, a.x, b.x)


@drawn
def test_tensor_hooks_fire_once_with_the_plain_gradient(arch: Arch, mode: str) -> None:
    """Hooks on parameters, trunk activations below the blocks, one-task head activations and blocks that have a
    handle fire exactly once, with plain's gradient and (along the trunk) in plain's order."""
    imp, plain = twins(arch)
    hi, hp = Hooks(imp, mode), Hooks(plain, mode)
    a, b = step(imp, "impartial", mode, hi), step(plain, "plain", mode, hp)
    assert_same_calls(hi.calls, hp.calls, hi.once, "tensor hook")
    chain = [k for k in hp.order if k in hi.once and re.fullmatch(r"x|h\d+|hout", k)]  # each needs the next's grad
    assert [k for k in hi.order if k in chain] == chain, "trunk activation hooks fire out of plain's order"
    assert_grads(imp, plain, a.x, b.x)


@pytest.mark.parametrize("mode", MODES)
@FAST
@given(arch=archs(), scale=st.sets(st.sampled_from(SCALED), min_size=1, max_size=3))
@example(arch=SIMPLE, scale={"z"}).via("a hook on the block")
@example(arch=SHARED, scale={"y0"}).via("a hook above the block, on a head two tasks share")
def test_hooks_that_change_the_gradient_give_the_plain_grads(arch: Arch, mode: str, scale: set[str]) -> None:
    """``register_hook(lambda g: 0.5 * g)`` on a drawn set of activations and parameters: on any of them but
    the automatic blocks that no op saves (a linear hook that runs once on each task's gradient, above a block,
    still gives Sum's result; at an unsaved block it also runs on the resolved one: documented limitation)."""
    kept = frozenset(n for n in scale if not unhandled_block(arch, mode, n)) or frozenset({"h0"})
    imp, plain = twins(arch)
    a = step(imp, "impartial", mode, Hooks(imp, mode, scale=kept))
    b = step(plain, "plain", mode, Hooks(plain, mode, scale=kept))
    assert_grads(imp, plain, a.x, b.x)


@drawn
def test_post_accumulate_grad_hooks_fire_once_with_the_final_grad(arch: Arch, mode: str) -> None:
    imp, plain = twins(arch)
    hi, hp = (
        Hooks(imp, mode, tensors=False, params=False, post=True),
        Hooks(plain, mode, tensors=False, params=False, post=True),
    )
    step(imp, "impartial", mode, hi), step(plain, "plain", mode, hp)
    assert_same_calls(hi.post, hp.post, set(hp.post) | set(hi.post), "post-accumulate hook")
    for name, p in imp.named_parameters():
        for seen in hi.post.get(name, []):
            torch.testing.assert_close(seen, p.grad, rtol=0, atol=0, msg=f"{name}: .grad changed after its hook")


@drawn
def test_module_hooks_fire_as_in_plain(arch: Arch, mode: str) -> None:
    """``register_full_backward_pre_hook`` and ``register_full_backward_hook`` on the input layer, every trunk
    layer, the latents and the heads: same calls, same grad_output and grad_input as plain."""
    imp, plain = twins(arch)
    kw = {"tensors": False, "params": False, "modules": True}
    hi, hp = Hooks(imp, mode, **kw), Hooks(plain, mode, **kw)
    step(imp, "impartial", mode, hi), step(plain, "plain", mode, hp)
    assert_same_calls(
        hi.modules, hp.modules, {k.split(" ", 1)[1] for k in hi.once if k.startswith("module")}, "module hook"
    )


@drawn
@example(arch=Arch(features=("mha",), groups=(1, 1), tie=True)).via("batched passes in every mode")
def test_retain_grad_gives_the_plain_grad(arch: Arch, mode: str) -> None:
    """``retain_grad()`` on trunk activations below the blocks, one-task head outputs and handled blocks."""
    imp, plain = twins(arch)
    hi, hp = (
        Hooks(imp, mode, tensors=False, params=False, retain=True),
        Hooks(plain, mode, tensors=False, params=False, retain=True),
    )
    step(imp, "impartial", mode, hi), step(plain, "plain", mode, hp)
    assert hi.kept.keys() == hp.kept.keys()
    for name, t in hi.kept.items():
        assert (t.grad is None) == (hp.kept[name].grad is None), f"retained .grad of {name}: None differs from plain"
        if t.grad is not None:
            try:
                t.grad.tolist()
            except RuntimeError as err:  # a functorch BatchedTensor that escaped a vmapped pass
                raise AssertionError(f"retained .grad of {name} cannot be read: {err}") from None
            assert_close(t.grad, hp.kept[name].grad, f"retained .grad of {name}")


def _freed(net: Net, run, roots: list[torch.Tensor]) -> dict[tuple[int, str], str]:
    """For every (root, leaf): whether a backward from the root to the leaf finds the graph freed."""
    out = {}
    leaves = [(n, p) for n, p in net.named_parameters() if p.requires_grad] + (
        [("x", run.x)] if run.x.requires_grad else []
    )
    for i, r in enumerate(roots):
        for n, p in leaves:
            try:
                g = torch.autograd.grad(r, p, retain_graph=True, allow_unused=True)[0]
                out[(i, n)] = "unused" if g is None else "alive"
            except RuntimeError as err:
                if "second time" not in str(err):
                    raise
                out[(i, n)] = "freed"
    return out


def _compare_freed(imp: Net, plain: Net, mode: str, retain: bool) -> tuple:
    known = set(_autograd._VMAP_OK)
    a = step(imp, "impartial", mode, retain_graph=retain)
    b = step(plain, "plain", mode, retain_graph=retain)
    fi, fp = _freed(imp, a, a.tasks + a.also), _freed(plain, b, b.tasks + b.also)
    # docs/backward.md: where the per-task pass must also run shared nodes (a block nested below another, a path
    # around the marked blocks), the heads it runs are released with the losses, not during the call
    # (a backward through a kept head then runs as far as the next node with saved tensors, whatever the leaf);
    # and a batched pass frees the graph only once vmap has run that structure (the thorough profile drew a first
    # call: kept, then freed on every later call of the same structure)
    kept = not freed_heads(imp.arch, mode) or bool(set(_autograd._VMAP_OK) - known)
    wrong = sorted(k for k in fp if fi[k] != fp[k] and not (kept and fi[k] == "alive" and fp[k] == "freed"))
    assert not wrong, f"{len(wrong)} (loss, leaf) pairs differ, e.g. {wrong[0]}: {fi[wrong[0]]}, plain {fp[wrong[0]]}"
    return a, b


@drawn
def test_the_graph_is_freed_as_in_plain(arch: Arch, mode: str) -> None:
    """After a call without ``retain_graph``, a backward from every loss to every leaf raises (freed) or runs
    exactly where plain's does."""
    _compare_freed(*twins(arch), mode, retain=False)


@pytest.mark.parametrize("mode", MODES)
@FAST
@given(arch=archs())
@example(arch=RICH).via("every structure")
def test_a_retained_graph_takes_a_second_call_as_in_plain(arch: Arch, mode: str) -> None:
    """With ``retain_graph=True`` every backward still runs, and a second call accumulates plain's gradients."""
    imp, plain = twins(arch)
    a, b = _compare_freed(imp, plain, mode, retain=True)
    backward(imp, a, "impartial", mode), backward(plain, b, "plain", mode)
    assert_grads(imp, plain, a.x, b.x)


def _seed_some(net: Net, every: int) -> None:
    for i, p in enumerate(net.parameters()):
        if p.requires_grad and i % every == 0:
            p.grad = torch.full_like(p, 0.25)


@pytest.mark.parametrize("mode", MODES)
@FAST
@given(arch=archs(), set_to_none=st.booleans(), every=st.integers(1, 3))
@example(arch=RICH, set_to_none=False, every=2).via("every structure")
def test_micro_batches_accumulate_as_in_plain(arch: Arch, mode: str, set_to_none: bool, every: int) -> None:
    """Existing ``.grad`` on some parameters, two micro-batches; ``zero_grad(set_to_none=…)``, two more."""
    imp, plain = twins(arch)
    runs: dict[str, list] = {}
    for net, how in ((imp, "impartial"), (plain, "plain")):
        _seed_some(net, every)
        runs[how] = [step(net, how, mode, micro=0), step(net, how, mode, micro=1)]
    assert_grads(imp, plain, runs["impartial"][1].x, runs["plain"][1].x)
    for net, how in ((imp, "impartial"), (plain, "plain")):
        net.zero_grad(set_to_none=set_to_none)
        runs[how] += [step(net, how, mode, micro=2), step(net, how, mode, micro=3)]
    assert_grads(imp, plain, runs["impartial"][3].x, runs["plain"][3].x)


@pytest.mark.parametrize("mode", MODES)
@FAST
@given(arch=archs(), every=st.integers(1, 3))
@example(arch=SIMPLE, every=1).via("two one-task heads")
def test_existing_grads_are_accumulated_in_place_as_in_plain(arch: Arch, mode: str, every: int) -> None:
    """Plain backward adds into an existing ``.grad`` in place (DDP's bucket views and optimizers holding
    ``p.grad`` rely on it); the same tensor objects must hold the result."""
    imp, plain = twins(arch)
    same = {}
    for net, how in ((imp, "impartial"), (plain, "plain")):
        _seed_some(net, every)
        held = {n: p.grad for n, p in net.named_parameters()}
        step(net, how, mode)
        same[how] = {n: p.grad is held[n] for n, p in net.named_parameters() if held[n] is not None}
    wrong = sorted(n for n in same["plain"] if same["plain"][n] != same["impartial"][n])
    assert not wrong, f".grad of {wrong[0]} (and {len(wrong) - 1} more) is a new tensor; plain adds in place"
