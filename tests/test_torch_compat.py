"""Every torch internal in ``impartial._torch_compat`` does what impartial relies on.

A torch release that changes one of them fails here, by name, instead of silently changing a result or losing
speed elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def test_run_backward_accumulates_as_backward_does_and_the_engine_still_checks_the_seeds() -> None:
    """``impartial._final.write``'s engine call: the same ``.grad`` (no copy through a fresh view, accumulation into
    an existing one, post-accumulate hooks once) as ``torch.autograd.backward``, and a seed of the wrong shape is
    still refused (by the engine, not by the Python checks it skips)."""
    from impartial._torch_compat import run_backward

    p = torch.zeros(1000, requires_grad=True)
    seen: list[int] = []
    p.register_post_accumulate_grad_hook(lambda t: seen.append(1))
    g = torch.randn(1000)
    run_backward([p.view_as(p)], [g])
    assert p.grad.untyped_storage().data_ptr() == g.untyped_storage().data_ptr() and seen == [1]
    expected = g + 1  # (p.grad is g's storage now: accumulating adds into it, as plain backward does)
    run_backward([p.view_as(p)], [torch.ones(1000)])
    torch.testing.assert_close(p.grad, expected)
    with pytest.raises(RuntimeError, match="shape"):
        run_backward([p.view_as(p)], [torch.ones(999)])


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


def test_saved_reads_a_nodes_values_with_negative_ints_signed() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    assert C.saved(x.sum(-1).grad_fn, "dim") == (-1,) and C.saved(x.sum(-1).grad_fn, "keepdim") is False
    t = x.transpose(-1, 0).grad_fn
    assert (C.saved(t, "dim0"), C.saved(t, "dim1")) == (-1, 0)
    assert C.saved(F.embedding(torch.tensor([1]), x).grad_fn, "padding_idx") == -1  # None is stored as -1
    assert C.saved(x[:, -2].grad_fn, "index") == -2
    with pytest.raises(AttributeError, match="SumBackward1 has no saved value 'nope'"):
        C.saved(x.sum(-1).grad_fn, "nope")


def test_saved_input_is_the_tensor_a_node_saved_and_none_under_a_hook() -> None:
    img = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    h = img.tanh()
    assert C.saved_input(F.conv2d(h, w).grad_fn, "input") is h
    y = checkpoint(lambda a: F.conv2d(a.tanh(), w), img, use_reentrant=False)
    assert C.saved_input(y.grad_fn, "input") is None


def test_view_base_is_the_loss_vector_behind_its_entries() -> None:
    L = torch.randn(5, requires_grad=True) * 2
    assert C.view_base(L.unbind(0)[3]) is L and C.view_base(L[1]) is L and C.view_base(L) is None


x3 = torch.randn(4, 3, 5, requires_grad=True)
y3 = torch.randn(4, 3, 5, requires_grad=True)
img4 = torch.randn(2, 3, 6, 6, requires_grad=True)
vol5 = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
W2 = torch.randn(5, 5, requires_grad=True)
q4 = torch.randn(2, 2, 4, 8, requires_grad=True)
_ONE = torch.ones(1, requires_grad=True)
_DIM, _DIMS = ("dim", "keepdim"), ("dims",)

#: every node type the per-sample proof and rules know (impartial._sample_rules, impartial._layer_grams): an op that
#: makes it, and the saved values they read
MAKERS: dict[str, tuple] = {
    "AbsBackward0": (lambda: x3.abs(), ()),
    "AddBackward0": (lambda: x3 + y3, ("alpha",)),
    "AliasBackward0": (lambda: torch.ops.aten.alias(x3), ()),
    "Atan2Backward0": (lambda: torch.atan2(x3, y3), ()),
    "AtanBackward0": (lambda: x3.atan(), ()),
    "BinaryCrossEntropyBackward0": (
        lambda: F.binary_cross_entropy(x3.sigmoid(), torch.rand(4, 3, 5), reduction="none"),
        (),
    ),
    "BinaryCrossEntropyWithLogitsBackward0": (
        lambda: F.binary_cross_entropy_with_logits(x3, torch.rand(4, 3, 5), reduction="none"),
        (),
    ),
    "CeluBackward0": (lambda: F.celu(x3), ()),
    "ClampBackward0": (lambda: x3.clamp(torch.zeros(5), torch.ones(5)), ()),
    "ClampBackward1": (lambda: x3.clamp(0, 1), ()),
    "ClampMaxBackward1": (lambda: x3.clamp_max(torch.zeros(5)), ()),
    "ClampMinBackward1": (lambda: x3.clamp_min(torch.zeros(5)), ()),
    "CloneBackward0": (lambda: x3.clone(), ()),
    "CosBackward0": (lambda: x3.cos(), ()),
    "DivBackward0": (lambda: x3 / y3, ()),
    "DivBackward2": (lambda: torch.div(x3, y3, rounding_mode=None), ()),
    "EluBackward0": (lambda: F.elu(x3), ()),
    "ErfBackward0": (lambda: x3.erf(), ()),
    "Exp2Backward0": (lambda: x3.exp2(), ()),
    "ExpBackward0": (lambda: x3.exp(), ()),
    "ExpandBackward0": (lambda: x3[:1].expand(4, 3, 5), ()),
    "Expm1Backward0": (lambda: x3.expm1(), ()),
    "GeluBackward0": (lambda: F.gelu(x3), ()),
    "HardsigmoidBackward0": (lambda: F.hardsigmoid(x3), ()),
    "HardswishBackward0": (lambda: F.hardswish(x3), ()),
    "HardtanhBackward0": (lambda: F.hardtanh(x3), ()),
    "HuberLossBackward0": (lambda: F.huber_loss(x3, y3.detach(), reduction="none"), ()),
    "LeakyReluBackward0": (lambda: F.leaky_relu(x3), ()),
    "Log1PBackward0": (lambda: x3.abs().log1p(), ()),
    "LogBackward0": (lambda: x3.abs().log(), ()),
    "LogSigmoidBackward0": (lambda: F.logsigmoid(x3), ()),
    "MaskedFillBackward0": (lambda: x3.masked_fill(x3 > 0, 0.0), ()),
    "MaskedFillBackward1": (lambda: x3.masked_fill(x3 > 0, _ONE[0]), ()),
    "MaximumBackward0": (lambda: torch.maximum(x3, y3), ()),
    "MinimumBackward0": (lambda: torch.minimum(x3, y3), ()),
    "MishBackward0": (lambda: F.mish(x3), ()),
    "MseLossBackward0": (lambda: F.mse_loss(x3, y3.detach(), reduction="none"), ()),
    "MulBackward0": (lambda: x3 * y3, ()),
    "NativeDropoutBackward0": (lambda: torch.native_dropout(x3, 0.5, True)[0], ()),
    "NegBackward0": (lambda: -x3, ()),
    "PowBackward0": (lambda: x3**2, ()),
    "PowBackward1": (lambda: x3.abs() ** y3, ()),
    "PowBackward2": (lambda: 2**x3, ()),
    "ReciprocalBackward0": (lambda: x3.reciprocal(), ()),
    "ReluBackward0": (lambda: x3.relu(), ()),
    "RsqrtBackward0": (lambda: x3.abs().rsqrt(), ()),
    "RsubBackward0": (lambda: torch.rsub(x3, y3), ()),
    "RsubBackward1": (lambda: 1 - x3, ()),
    "SigmoidBackward0": (lambda: x3.sigmoid(), ()),
    "SiluBackward0": (lambda: F.silu(x3), ()),
    "SinBackward0": (lambda: x3.sin(), ()),
    "SmoothL1LossBackward0": (lambda: F.smooth_l1_loss(x3, y3.detach(), reduction="none"), ()),
    "SoftplusBackward0": (lambda: F.softplus(x3), ()),
    "SqrtBackward0": (lambda: x3.abs().sqrt(), ()),
    "SubBackward0": (lambda: x3 - y3, ("alpha",)),
    "TanhBackward0": (lambda: x3.tanh(), ()),
    "ThresholdBackward0": (lambda: F.threshold(x3, 0.0, 0.0), ()),
    "ToCopyBackward0": (lambda: x3.double(), ()),
    "WhereBackward0": (lambda: torch.where(x3 > 0, x3, y3), ()),
    "ViewBackward0": (lambda: x3.view(4, 15), ()),
    "UnsafeViewBackward0": (lambda: x3.transpose(0, 1).reshape(-1), ()),
    "ReshapeAliasBackward0": (lambda: torch.ops.aten._reshape_alias(x3, (4, 15), (15, 1)), ()),
    "SqueezeBackward0": (lambda: x3[:, :1].squeeze(), ()),
    "SqueezeBackward1": (lambda: x3[:, :1].squeeze(1), ()),
    "SqueezeBackward2": (lambda: x3[:, :1].squeeze((1,)), ()),
    "SqueezeBackward4": (lambda: F.linear(x3[0, 0], W2), ()),
    "UnsqueezeBackward0": (lambda: x3.unsqueeze(0), ()),
    "TBackward0": (lambda: W2.t(), ()),
    "TransposeBackward0": (lambda: x3.transpose(0, 2), ("dim0", "dim1")),
    "PermuteBackward0": (lambda: x3.permute(2, 0, 1), _DIMS),
    "SumBackward1": (lambda: x3.sum(1), _DIM),
    "MeanBackward1": (lambda: x3.mean(1), _DIM),
    "AmaxBackward0": (lambda: x3.amax(1), _DIM),
    "AminBackward0": (lambda: x3.amin(1), _DIM),
    "LogsumexpBackward0": (lambda: x3.logsumexp(1), _DIM),
    "LinalgVectorNormBackward0": (lambda: x3.norm(dim=1), _DIM),
    "VarBackward0": (lambda: x3.var(1), _DIM),
    "StdBackward0": (lambda: x3.std(1), _DIM),
    "MaxBackward0": (lambda: x3.max(1).values, _DIM),
    "MinBackward0": (lambda: x3.min(1).values, _DIM),
    "SoftmaxBackward0": (lambda: x3.softmax(1), ("dim",)),
    "LogSoftmaxBackward0": (lambda: x3.log_softmax(1), ("dim",)),
    "CumsumBackward0": (lambda: x3.cumsum(1), ("dim",)),
    "SliceBackward0": (lambda: x3[:, 1:], ("dim", "start", "step", "self_sym_sizes")),
    "CatBackward0": (lambda: torch.cat([x3, y3], 1), ("dim",)),
    "FlipBackward0": (lambda: x3.flip(1), _DIMS),
    "RollBackward0": (lambda: x3.roll(1, 1), _DIMS),
    "SelectBackward0": (lambda: x3[:, 1], ("dim", "index")),
    "StackBackward0": (lambda: torch.stack([x3, y3], 1), ("dim",)),
    "SplitBackward0": (lambda: x3.split(1, 1)[0], ("dim",)),
    "SplitWithSizesBackward0": (lambda: x3.split([1, 2], 1)[0], ("dim",)),
    "UnbindBackward0": (lambda: x3.unbind(1)[0], ("dim",)),
    "AddmmBackward0": (lambda: F.linear(x3[0], W2, _ONE.expand(5) * 1), ("alpha", "beta")),
    "MmBackward0": (lambda: x3[0] @ W2, ()),
    "BmmBackward0": (lambda: torch.bmm(x3, x3.transpose(1, 2)), ()),
    "BaddbmmBackward0": (lambda: torch.baddbmm(torch.zeros(4, 3, 3), x3, x3.transpose(1, 2)), ()),
    "ScaledDotProductFlashAttentionForCpuBackward0": (lambda: F.scaled_dot_product_attention(q4, q4, q4), ()),
    "ConvolutionBackward0": (
        lambda: F.conv2d(img4, torch.randn(2, 3, 3, 3)),
        ("transposed", "stride", "padding", "dilation", "output_padding", "groups"),
    ),
    "NativeGroupNormBackward0": (lambda: F.group_norm(img4, 1), ("group",)),
    "NativeLayerNormBackward0": (lambda: F.layer_norm(x3, (5,)), ("normalized_shape",)),
    "AvgPool2DBackward0": (lambda: F.avg_pool2d(img4, 2), ()),
    "AvgPool3DBackward0": (lambda: F.avg_pool3d(vol5, 2), ()),
    "AdaptiveAvgPool2DBackward0": (lambda: F.adaptive_avg_pool2d(img4, 2), ()),
    "AdaptiveAvgPool3DBackward0": (lambda: F.adaptive_avg_pool3d(vol5, 2), ()),
    "AdaptiveMaxPool2DBackward0": (lambda: F.adaptive_max_pool2d(img4, 2), ()),
    "AdaptiveMaxPool3DBackward0": (lambda: F.adaptive_max_pool3d(vol5, 2), ()),
    "MaxPool2DWithIndicesBackward0": (lambda: F.max_pool2d(img4, 2), ()),
    "MaxPool3DWithIndicesBackward0": (lambda: F.max_pool3d(vol5, 2), ()),
    "NativeBatchNormBackward0": (
        lambda: F.batch_norm(img4, torch.zeros(3), torch.ones(3), training=False),
        ("training", "eps"),
    ),
    "EmbeddingBackward0": (
        lambda: F.embedding(torch.tensor([1]), W2),
        ("sparse", "padding_idx", "scale_grad_by_freq", "weight_sym_argsize_0"),
    ),
    "PreluKernelBackward0": (lambda: F.prelu(x3, _ONE), ()),
    "NllLossBackward0": (lambda: F.nll_loss(x3[:, :, 0], torch.zeros(4, dtype=torch.long), reduction="none"), ()),
    "NllLoss2DBackward0": (lambda: F.nll_loss(img4, torch.zeros(2, 6, 6, dtype=torch.long), reduction="none"), ()),
}
#: attention kernels only CUDA builds make (the rule treats them as the CPU one)
GPU_ONLY = {
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
}
#: saved tensors the per-sample rules read (impartial._layer_grams), by node type
SAVED_INPUTS = {
    "ConvolutionBackward0": ("input",),
    "EmbeddingBackward0": ("indices",),
    "NativeLayerNormBackward0": ("input", "result1", "result2"),
    "NativeGroupNormBackward0": ("input", "result1", "result2"),
    "NativeBatchNormBackward0": ("input", "running_mean", "running_var"),
    "MulBackward0": ("self", "other"),
}


def test_every_node_type_the_per_sample_proof_knows_is_one_torch_makes() -> None:
    from impartial._layer_grams import DEDICATED
    from impartial._sample_rules import REINDEX, RULES

    assert set(RULES) | REINDEX | set(DEDICATED) == set(MAKERS) | GPU_ONLY
    for name, (make, attrs) in MAKERS.items():
        node = make().grad_fn
        assert node.name() == name
        for attr in attrs:
            C.saved(node, attr)
        for attr in SAVED_INPUTS.get(name, ()):
            assert isinstance(C.saved_input(node, attr), torch.Tensor), (name, attr)
