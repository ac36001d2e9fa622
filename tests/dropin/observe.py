"""Hooks of every kind on a model run, and the comparisons of what they saw.

Which hooks ``impartial.backward`` promises to fire exactly once per call (issue 10, the drop-in contract):
hooks on parameters, on trunk activations below the blocks, on activations reached by one task, and on a
block tensor that is marked or that a head reads through an op saving it (a Linear).  Hooks on tensors that
two or more tasks reach *above* a block (a shared head, between nested blocks, above a marked block, every
activation in ``block="params"``) fire once per task in the per-task pass: their counts are not compared, and
neither are hooks on an automatic block read only through ops that save nothing (torch gives no handle on
it: a documented limitation).  Post-accumulate-grad hooks fire once on every parameter, in every mode.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from dropin.arch import Arch, Net, Tap

RTOL, ATOL = 1e-10, 1e-12


def _around(arch: Arch, mode: str) -> bool:
    """Whether a task reaches a shared parameter on a path through no block (docs/backward.md: the heads run again
    in the final pass): with marked blocks, head 0 reading the tied input weight directly."""
    return mode == "marked" and arch.tie


def freed_heads(arch: Arch, mode: str) -> bool:
    """Whether the per-task pass frees the heads it runs, as plain does: it runs nothing shared (no block nested
    below another, no path around the marked blocks)."""
    shared_head, latents = any(c > 1 for c in arch.groups), arch.latent_block
    if mode == "marked":  # a head two tasks share runs in both tasks' passes
        return not (arch.lower or arch.tie or shared_head)
    top = shared_head or latents
    nested = (shared_head and latents) or (arch.lower and top) or (arch.tied_block and top)
    return not nested


def once_tensor(arch: Arch, mode: str, name: str, role: str) -> bool:
    """Whether a tensor hook on activation ``name`` (of ``role``, see ``Net._losses``) must fire exactly once."""
    if role in ("head1", "lower"):  # once, unless a task reaches a shared parameter around every marked block (head
        # 0 reading the tied weight): then the final pass starts at the losses again and the heads run twice
        return not _around(arch, mode)
    if role == "head2" or mode == "params":
        return False
    if role == "input":
        return True
    if role == "out" and arch.lower:  # a block (marked, or automatic and read by the lower head's Linear)
        # automatic: read through views, silenced only while no block lies below it (the tied weight)
        return mode == "marked" or not arch.tied_block
    if role in ("trunk", "out"):  # in auto, the leaf block inp.weight lies below every trunk activation
        return mode == "marked" or not arch.tied_block
    assert role == "latent", role
    if mode == "marked":
        return True
    if arch.latent_block:
        # read through a Linear on [B, T, W]: the heads read views of it, whose gradients the per-task pass takes
        # instead (impartial._handles); with a block below it (the lower loss's at hout, the tied weight), the
        # per-task pass must run the latent's own node to reach that block, and no op saved the latent itself
        return arch.saved(name) and not arch.lower and not arch.tied_block
    return not arch.lower  # below the shared heads' blocks; with a lower loss also above the block at hout


def unhandled_block(arch: Arch, mode: str, name: str) -> bool:
    """Whether activation ``name`` is an automatic block that no op saves (a shared head's output read by
    column slices; latents read by relu-first or cat heads): its hooks also see each task's gradient.  With
    ``block="params"`` the automatic blocks split the heads' pass from the trunk's, so the same holds there."""
    if mode not in ("auto", "params"):
        return False
    if name.startswith("y") and name != "ylow":
        i = int(name[1:])
        return i < len(arch.groups) and arch.groups[i] > 1
    return name in ("z", "s") and arch.latent_block and not once_tensor(arch, mode, name, "latent")


def once_param(arch: Arch, mode: str, role: str) -> bool:
    """Whether a tensor hook on a parameter of ``role`` must fire exactly once."""
    if role == "head2":  # a shared head: below its own block in auto; reached raw by two tasks otherwise
        return mode == "auto"
    if role == "tied":  # raw from head 0: two raw tasks when head 0 is shared and its output is not a block
        return not (mode == "marked" and arch.groups[0] > 1)
    return True


def once_module(arch: Arch, mode: str, name: str) -> bool:
    """Whether the full backward (pre-)hooks of module ``name`` must fire exactly once: a module between
    two blocks (its output reached by two or more tasks, a block below its input) is not promised."""
    if name.startswith("heads."):
        return arch.groups[int(name.split(".")[1])] == 1 and not _around(arch, mode)
    if name == "lower":
        return not _around(arch, mode)
    if mode == "params" or (mode == "auto" and arch.tied_block):
        return False
    if name.startswith("lat."):
        return not arch.lower
    return True


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class Hooks(Tap):
    """Registers hooks on ``net`` (parameters, post-accumulate, modules) and on every activation it reports.

    ``scale``: names whose tensor hook returns ``0.5 * grad`` (a modifying hook) instead of observing.
    ``retain``: call ``retain_grad()`` on every activation whose hooks must fire once (kept in ``kept``).
    """

    def __init__(
        self,
        net: Net,
        mode: str,
        *,
        tensors: bool = True,
        params: bool = True,
        post: bool = False,
        modules: bool = False,
        scale: frozenset[str] = frozenset(),
        retain: bool = False,
    ):
        self.arch, self.mode, self.tensors, self.scale, self.retain = net.arch, mode, tensors, scale, retain
        self.calls: dict[str, list[Tensor]] = defaultdict(list)
        self.order: list[str] = []
        self.once: set[str] = set()
        self.post: dict[str, list[Tensor]] = defaultdict(list)
        self.modules: dict[str, list[tuple]] = defaultdict(list)
        self.kept: dict[str, Tensor] = {}
        self.handles: list = []
        roles = net.roles()
        for name, p in net.named_parameters():
            if not p.requires_grad:
                continue
            if params:
                self._tensor(f"param {name}", p, once_param(self.arch, mode, roles[name]))
            if post:
                self.handles.append(
                    p.register_post_accumulate_grad_hook(lambda p, name=name: self.post[name].append(_clone(p.grad)))
                )
        if modules:
            for name, m in net.named_children():
                subs = [(name, m)] if name in ("inp", "lower") else [(f"{name}.{i}", s) for i, s in enumerate(m)]
                for n, s in subs:
                    self._module(n, s)

    def _tensor(self, key: str, t: Tensor, once: bool) -> None:
        if once:
            self.once.add(key)

        def hook(g: Tensor) -> Tensor | None:
            self.calls[key].append(g.detach().clone())
            self.order.append(key)
            return 0.5 * g if key in self.scale else None

        self.handles.append(t.register_hook(hook))

    def _module(self, name: str, m: nn.Module) -> None:
        if once_module(self.arch, self.mode, name):
            self.once.add(f"module {name}")
        self.handles.append(
            m.register_full_backward_pre_hook(
                lambda m, gout, name=name: self.modules[name].append(("pre", tuple(map(_clone, gout))))
            )
        )
        self.handles.append(
            m.register_full_backward_hook(
                lambda m, gin, gout, name=name: self.modules[name].append(
                    ("full", tuple(map(_clone, gin)), tuple(map(_clone, gout)))
                )
            )
        )

    def act(self, name: str, t: Tensor, role: str) -> Tensor:
        once = once_tensor(self.arch, self.mode, name, role)
        if self.tensors:
            self._tensor(name, t, once)
        if self.retain and once and name != "x":
            t.retain_grad()
            self.kept[name] = t
        return t


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    if actual.layout != expected.layout:
        raise AssertionError(f"{what}: layout {actual.layout}, plain {expected.layout}")
    if expected.is_sparse:
        actual, expected = actual.to_dense(), expected.to_dense()
    ratio = float((actual * expected).sum() / expected.pow(2).sum().clamp_min(1e-300))
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{what} differs from plain (projection ratio {ratio:.4g}): {m}",
    )


def assert_grads(imp: Net, plain: Net, x_imp: Tensor, x_plain: Tensor) -> None:
    """Every leaf's ``.grad`` (parameters and the input ``x``) equals plain's, ``None`` where plain's is."""
    pairs = [
        (f".grad of {n}", p.grad, q.grad) for (n, p), (_, q) in zip(imp.named_parameters(), plain.named_parameters())
    ]
    pairs.append((".grad of the input x", x_imp.grad, x_plain.grad))
    for what, a, b in pairs:
        if (a is None) != (b is None):
            raise AssertionError(
                f"{what}: impartial {'None' if a is None else 'a tensor'}, plain {'None' if b is None else 'a tensor'}"
            )
        if a is not None:
            assert_close(a, b, what)


def assert_same_calls(imp: dict[str, list], plain: dict[str, list], keys: set[str], kind: str) -> None:
    """For every key: as many calls as plain's, with the same received values in the same order."""
    for key in sorted(keys):
        a, b = imp.get(key, []), plain.get(key, [])
        if len(a) != len(b):
            raise AssertionError(f"{kind} on {key}: {len(a)} calls, plain {len(b)}")
        for i, (u, v) in enumerate(zip(a, b)):
            _close_nested(u, v, f"{kind} on {key}, call {i}")


def _close_nested(u: object, v: object, what: str) -> None:
    if isinstance(v, tuple):
        assert isinstance(u, tuple) and len(u) == len(v), f"{what}: {u!r} vs plain {v!r}"
        for j, (a, b) in enumerate(zip(u, v)):
            _close_nested(a, b, f"{what}[{j}]")
    elif v is None or isinstance(v, str):
        assert u == v if isinstance(v, str) else u is None, f"{what}: {u!r}, plain {v!r}"
    else:
        assert isinstance(u, Tensor), f"{what}: {u!r}, plain a tensor"
        assert_close(u, v, what)
