"""Every torch internal in ``impartial._torch_compat`` does what impartial relies on.

A torch release that changes one of them fails here, by name, instead of silently changing a result or losing
speed elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import get_gradient_edge
from torch.utils.checkpoint import checkpoint

from impartial import _torch_compat as C


def test_input_metadata_gives_the_shape_dtype_and_device_of_a_nodes_input() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = (x * 2).tanh()
    e = get_gradient_edge(y)
    assert C.input_metadata(e.node, e.output_nr) == (torch.Size([4, 3]), torch.float64, torch.device("cpu"))


def test_linear_saved_reads_the_input_and_scalars_of_a_matrix_product() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 2)
    h = x.tanh()
    X, alpha, beta = C.linear_saved(lin(h).grad_fn)
    assert X is h and (alpha, beta) == (1.0, 1.0)
    X, alpha, beta = C.linear_saved(torch.addmm(lin.bias, h, lin.weight.t(), alpha=2.0, beta=0.5).grad_fn)
    assert X is h and (alpha, beta) == (2.0, 0.5)
    X, _, _ = C.linear_saved((h @ lin.weight.t()).grad_fn)
    assert X is h
    with pytest.raises(ValueError, match="not a matrix-product node"):
        C.linear_saved(h.grad_fn)


def test_saved_tensors_finds_an_input_a_node_saved_and_never_unpacks_a_hooked_one() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 2)
    z = x.tanh()
    found = dict(C.saved_tensors(lin(z).grad_fn))
    assert any(t is z for t in found.values())
    attr = next(a for a, t in found.items() if t is z)
    assert [t for _, t in C.saved_tensors(lin(z).grad_fn, only=attr)][0] is z
    runs = []

    def region(a: torch.Tensor) -> torch.Tensor:
        runs.append(1)
        return lin(a.tanh())

    y = checkpoint(region, x, use_reentrant=False)
    assert list(C.saved_tensors(y.grad_fn)) == [] and len(runs) == 1  # reading it would have recomputed it
    assert C.linear_saved(y.grad_fn)[0] is None and len(runs) == 1


def test_quiet_silences_tensor_hooks_and_keeps_retained_grads() -> None:
    x = torch.randn(3, requires_grad=True)
    z = x * 2
    calls: list[str] = []
    z.register_hook(lambda g: calls.append("z") or g * 3)
    x.register_hook(lambda g: calls.append("x"))
    z.retain_grad()
    with C.quiet([z, x]):
        (g,) = torch.autograd.grad(z.sum(), [x], retain_graph=True)
    assert calls == [] and z.grad is None and torch.equal(g, torch.full((3,), 2.0))
    z.sum().backward()  # restored, in order
    assert calls == ["z", "x"] and torch.equal(x.grad, torch.full((3,), 6.0))


def test_is_freed_graph_recognises_autograds_error() -> None:
    x = torch.randn(3, requires_grad=True)
    y = x.exp().sum()
    y.backward()
    with pytest.raises(RuntimeError) as err:
        y.backward()
    assert C.is_freed_graph(err.value)
    assert not C.is_freed_graph(RuntimeError("something else"))


def test_foreach_norm_is_one_norm_per_tensor() -> None:
    ts = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
    assert [float(n) for n in C.foreach_norm(ts)] == [5.0, 1.0]


def test_accumulate_grad_takes_a_fresh_view_without_a_copy() -> None:
    """``impartial._final.write`` relies on it: ``AccumulateGrad`` keeps the tensor it receives when nothing else
    refers to it, so a leaf seeded through ``p.view_as(p)`` gets its gradient without a copy."""
    p = torch.zeros(1000, requires_grad=True)
    g = torch.randn(1000)
    torch.autograd.backward([p.view_as(p)], [g])
    assert p.grad.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()


def _sharded() -> tuple[torch.nn.Module, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    fully_shard(model[0])
    fully_shard(model)
    return model, torch.randn(5, 3, dtype=torch.float64)


def test_fsdp_states_and_params_map_sharded_parameters_to_the_graphs_leaves(one_rank) -> None:
    """Every ``fully_shard`` call leaves one state in torch's registry; each managed parameter has its sharded
    ``DTensor`` (what ``.parameters()`` returns) and, after a forward, the unsharded leaf autograd sees."""
    from torch.distributed.tensor import DTensor

    model, x = _sharded()
    sharded = list(model.parameters())  # (after a forward, the root's modules hold its unsharded parameters)
    states = [s for s in C.fsdp_states() if any(t is p for t, _, _ in C.fsdp_params(s) for p in sharded)]
    assert len(states) == 2
    loss = model(x).pow(2).sum()
    found = [(s, u) for st in states for s, u, _ in C.fsdp_params(st)]
    assert {id(s) for s, _ in found} == {id(p) for p in sharded}
    assert all(isinstance(s, DTensor) and u is not None and not isinstance(u, DTensor) for s, u in found)
    leaves, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        todo += [c for c, _ in node.next_functions if c is not None]
    assert leaves == {id(u) for _, u in found}


def test_fsdp_held_defers_fsdps_post_backward_to_fsdp_post_backward(one_rank) -> None:
    """Inside ``fsdp_held`` a backward writes the unsharded ``.grad`` only (no post-backward, no end-of-backward
    callback: the sharded ``.grad`` stays None); ``fsdp_post_backward`` then reduces it into the sharded ``.grad``
    (one rank: equal), frees the unsharded one and fires the sharded parameters' post-accumulate-grad hooks, once."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    model, x = _sharded()
    plain, _ = _sharded()
    plain(x).pow(2).sum().backward()
    sharded = list(model.parameters())
    states = [s for s in C.fsdp_states() if any(t is p for t, _, _ in C.fsdp_params(s) for p in sharded)]
    hooks = []
    for p in sharded:
        p.register_post_accumulate_grad_hook(lambda p: hooks.append(p))
    loss = model(x).pow(2).sum()
    calls = []
    original = FSDPParamGroup.post_backward
    FSDPParamGroup.post_backward = lambda g, *a: (calls.append(g), original(g, *a))[1]  # type: ignore[method-assign]
    try:
        with C.fsdp_held(states):
            loss.backward()
        assert calls == [] and hooks == [] and all(p.grad is None for p in sharded)
        unsharded = [u for st in states for _, u, _ in C.fsdp_params(st)]
        assert all(u.grad is not None for u in unsharded)
        C.fsdp_post_backward(states[0])
    finally:
        FSDPParamGroup.post_backward = original  # type: ignore[method-assign]
    assert len(calls) == 2 and len(hooks) == 4 and all(u.grad is None for u in unsharded)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad.full_tensor(), q.grad.full_tensor())


def test_fsdp_reset_returns_fsdp_to_idle_after_an_aborted_backward(one_rank) -> None:
    """After a backward whose post-backward was held and never run, ``fsdp_reset`` leaves FSDP ready for the next
    iteration: a forward and a plain backward give the plain gradient."""
    model, x = _sharded()
    plain, _ = _sharded()
    plain(x).pow(2).sum().backward()
    sharded = list(model.parameters())
    states = [s for s in C.fsdp_states() if any(t is p for t, _, _ in C.fsdp_params(s) for p in sharded)]
    with C.fsdp_held(states):
        torch.autograd.grad(model(x).pow(2).sum(), [u for st in states for _, u, _ in C.fsdp_params(st)])
    C.fsdp_reset(states[0])
    model(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad.full_tensor(), q.grad.full_tensor())


def test_flat_parameters_of_fsdp1_are_refused(one_rank) -> None:
    """FSDP1 (``FullyShardedDataParallel``) needs an accelerator to build; its leaves are ``FlatParameter`` s, which
    ``impartial.backward`` refuses by name rather than leaving a sharded gradient unreduced."""
    from torch.distributed.fsdp import FlatParameter

    import impartial

    flat = FlatParameter(torch.randn(3, dtype=torch.float64), requires_grad=True)
    z = flat * 2
    with pytest.raises(TypeError, match="FSDP1"):
        impartial.backward([z.sum(), z.pow(2).sum()], [flat])


def test_fsdp_unshard_all_gathers_and_fsdp_tree_is_shared_by_a_trees_states(one_rank) -> None:
    """After a forward FSDP frees a non-root module's unsharded parameters (its leaves keep their shape, with no
    storage); ``fsdp_unshard`` all-gathers them again, equal to the full parameters.  The states of one tree share
    one context after the root's lazy init."""
    model, x = _sharded()
    sharded = list(model.parameters())
    states = [s for s in C.fsdp_states() if any(t is p for t, _, _ in C.fsdp_params(s) for p in sharded)]
    model(x)
    inner = next(s for s in states if not s._is_root)
    pairs = [(s, u) for s, u, _ in C.fsdp_params(inner)]
    assert all(u.untyped_storage().nbytes() == 0 for _, u in pairs)
    C.fsdp_unshard(inner)
    assert all(torch.equal(u, s.full_tensor()) for s, u in pairs)
    assert C.fsdp_tree(states[0]) is C.fsdp_tree(states[1])


def test_is_dtensor_boundary_finds_from_local_and_to_local(one_rank) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(4, 3, requires_grad=True)
    z = DTensor.from_local(x.tanh(), mesh, [Shard(0)])
    assert C.is_dtensor_boundary(z.grad_fn)
    assert C.is_dtensor_boundary(z.to_local().grad_fn)
    assert not C.is_dtensor_boundary(x.tanh().grad_fn)
