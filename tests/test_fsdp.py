"""``impartial.backward`` on FSDP2 modules (``fully_shard``): 2 gloo processes on CPU, float64.

Each rank runs the step on its half of the batch (every loss a mean over the batch); every sharded parameter's
gradient (``p.grad.full_tensor()``) must equal the single-process full-batch ``.grad`` (computed here, in the parent,
before the workers start), for activation blocks found automatically, marked blocks and ``block="params"``, with
``shared_params`` given as the module's sharded parameters or None, the modules sharded as a trunk and a root or one
by one.  Also over 2 micro-batches with ``set_requires_gradient_sync(False)`` on the first.  FSDP's own
post-backward must run exactly once per group and step, its reduce-scatter once per group and synchronised step
(none without sync), and the sharded parameters' post-accumulate-grad hooks once per synchronised step.  A task
that is not finite on one rank only makes every rank raise (or skip it) together, and the next step is exact.
Mixed precision (bfloat16 parameters) solves in float64; tensor-parallel parameters raise.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import impartial
from models import make

WORLD = 2
TOL = 1e-9
# (model, wrapping, block, solver, shared_params): every block mode with each of the four solvers on the MLP, the VAE
# on a few; "root": fully_shard(trunk) then the root; "each": every layer of the trunk and every head, then the root;
# shared_params: the trunk's (sharded), None, or "all" of the model's as .parameters() gives them after the forward
CASES = [
    ("mlp", "root", "auto", "sum", "sharded"),
    ("mlp", "each", "auto", "imtlg", None),
    ("mlp", "root", "auto", "mgda", None),
    ("mlp", "each", "auto", "upgrad", "sharded"),
    ("mlp", "each", "marked", "sum", None),
    ("mlp", "root", "marked", "imtlg", "sharded"),
    ("mlp", "each", "marked", "mgda", "sharded"),
    ("mlp", "root", "marked", "upgrad", None),
    ("mlp", "root", "params", "sum", None),
    ("mlp", "each", "params", "imtlg", "sharded"),
    ("mlp", "root", "params", "mgda", "sharded"),
    ("mlp", "each", "params", "upgrad", None),
    ("vae", "each", "auto", "imtlg", "sharded"),
    ("vae", "root", "marked", "upgrad", None),
    ("vae", "each", "params", "mgda", "sharded"),
    ("mlp", "root", "auto", "imtlg", "all"),
]


class _Step(nn.Module):
    """The root FSDP module needs a forward: the model's (tasks, also, z).  ``poison`` (set on one rank) adds a
    non-finite term to the last task, through its head's weight only (``poison_at = "head"``: the block rows stay
    finite) or through the block (``"block"``: its rows, and every shared parameter's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.poison: float | None = None
        self.poison_at = "head"

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        tasks, also, acts = self.model.losses(x)
        if self.poison is not None:
            on = self.model.heads[-1][0].weight if self.poison_at == "head" else acts["z"]
            tasks[-1] = tasks[-1] + (on * self.poison).sum()
        return tasks, also, acts["z"]


def _model(name: str) -> nn.Module:
    """The zoo's model; the VAE with noise for 12 rows (2 micro-batches of 6)."""
    model, _ = make(name)
    if hasattr(model, "eps_offset"):
        model.eps = torch.randn(
            12, model.eps.shape[1], generator=torch.Generator().manual_seed(3), dtype=model.eps.dtype
        )
    return model


def _batch(name: str, n: int) -> Tensor:
    _, x = make(name)
    reps = -(-n // x.shape[0])
    return torch.cat([x] * reps)[:n] + 0.01 * torch.arange(n, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def _step(
    model: nn.Module, step: nn.Module, x: Tensor, block: str, solver: str, shared: str | None, offset: int = 0
) -> impartial.Report:
    if hasattr(model, "eps_offset"):
        model.eps_offset = offset
    tasks, also, z = step(x)
    if not hasattr(model, "eps_offset"):  # the MLP's also term is a sum over the batch: make it a mean
        also = [a / x.shape[0] for a in also]
    # under FSDP the trunk's are sharded DTensors; after the forward the root's own modules hold its unsharded ones
    params = None if shared is None else model.trunk.parameters() if shared == "sharded" else list(step.parameters())
    return impartial.backward(tasks, params, solver=solver, also=also, block=z if block == "marked" else block)


def _reference(name: str, block: str, solver: str, shared: str | None, micro: int) -> list[Tensor]:
    """Single process, full batch (``micro`` micro-batches accumulated)."""
    model, n = _model(name), 6
    for m in range(micro):
        _step(model, _Step(model), _batch(name, n * micro)[m * n : (m + 1) * n], block, solver, shared, m * n)
    return [p.grad for p in model.parameters()]


def _shard(model: nn.Module, wrap: str, **kw) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    step = _Step(model)
    mods = (
        [model.trunk]
        if wrap == "root"
        else [m for m in (*model.trunk, *model.heads) if any(True for _ in m.parameters())]
    )
    for m in mods:
        fully_shard(m, **kw)
    return fully_shard(step, **kw)


class _Counts:
    """FSDP's post-backward per group (its ``post_backward`` method: impartial holds it by shadowing the method on
    the instance, so only FSDP's own calls reach the class), its reduce-scatter per module (a counting
    ``set_custom_reduce_scatter``), and the sharded parameters' post-accumulate-grad hooks."""

    def __init__(self, step: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.post: Counter = Counter()
        self.reduced: Counter = Counter()
        self.hooks: Counter = Counter()
        counts = self

        class Counting(DefaultReduceScatter):
            def __init__(self, name: str) -> None:
                self.name = name

            def __call__(self, *args, **kwargs):
                counts.reduced[self.name] += 1
                return super().__call__(*args, **kwargs)

        self.modules = {
            n or "root": m
            for n, m in step.named_modules()
            if isinstance(m, FSDPModule) and any(True for _ in m._get_fsdp_state()._fsdp_param_groups)
        }
        for n, m in self.modules.items():
            m.set_custom_reduce_scatter(Counting(n))
        for n, p in step.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, n=n: counts.hooks.update([n]))
        if not hasattr(FSDPParamGroup, "_counted"):
            original = FSDPParamGroup.post_backward

            def post_backward(group, *args):
                FSDPParamGroup._counter.post[id(group)] += 1
                return original(group, *args)

            FSDPParamGroup.post_backward, FSDPParamGroup._counted = post_backward, True
        FSDPParamGroup._counter = self
        self.groups = len({id(g) for m in self.modules.values() for g in m._get_fsdp_state()._fsdp_param_groups})
        self.params = sum(1 for p in step.parameters() if p.requires_grad)

    def check(self, synced: bool, what: tuple) -> None:
        assert len(self.post) == self.groups and set(self.post.values()) == {1}, (what, self.post)
        want = {n: 1 for n in self.modules} if synced else {}
        assert dict(self.reduced) == want, (what, self.reduced)
        assert len(self.hooks) == (self.params if synced else 0) and set(self.hooks.values()) <= {1}, (what, self.hooks)
        self.post.clear(), self.reduced.clear(), self.hooks.clear()


def _cases(rank: int, cases: list, expected: list) -> list[float]:
    """The max difference of every case."""
    errs, n, half = [], 6, 3
    for (name, wrap, block, solver, shared, micro), exp in zip(cases, expected):
        model = _model(name)
        step = _shard(model, wrap)
        counts = _Counts(step)
        for m in range(micro):
            x = _batch(name, n * micro)[m * n : (m + 1) * n][rank * half : (rank + 1) * half]
            synced = m == micro - 1
            step.set_requires_gradient_sync(synced)
            _step(model, step, x, block, solver, shared, m * n + rank * half)
            counts.check(synced, (name, wrap, block, solver, shared, micro, m))
        err = max(float((p.grad.full_tensor() - e).abs().max()) for p, e in zip(model.parameters(), exp))
        assert err <= TOL * max(1.0, *(float(e.abs().max()) for e in exp)), (
            name,
            wrap,
            block,
            solver,
            shared,
            micro,
            err,
        )
        errs.append(err)
    return errs


def _nonfinite_on_one_rank(rank: int, expected: list[Tensor]) -> None:
    """A task gradient that is NaN on rank 1 only (at a head with automatic blocks; at the block, so in the shared
    parameters' rows, with ``block="params"``): both ranks raise (nothing reduced, ``.grad`` untouched, and the
    next step exact: FSDP was reset), or both skip the task."""
    for block, at in (("auto", "head"), ("params", "block")):
        for policy in ("raise", "skip"):
            model = _model("mlp")
            step = _shard(model, "root")
            step.poison, step.poison_at = (float("nan") if rank == 1 else 0.0), at
            x = _batch("mlp", 6)[rank * 3 : (rank + 1) * 3]
            tasks, also, _ = step(x)
            also = [a / 3 for a in also]
            if policy == "raise":
                with pytest.raises(FloatingPointError, match=r"losses\[2\]"):
                    impartial.backward(tasks, model.trunk.parameters(), solver="sum", also=also, block=block)
                assert all(p.grad is None for p in model.parameters())
                step.poison = None
                _step(model, step, x, "auto", "sum", "sharded")
                for p, e in zip(model.parameters(), expected):
                    assert float((p.grad.full_tensor() - e).abs().max()) <= TOL
            else:
                report = impartial.backward(tasks, model.trunk.parameters(), also=also, nonfinite="skip", block=block)
                assert report.skipped == ("losses[2]",)
                assert all(p.grad is None for p in model.heads[2].parameters())
                assert all(p.grad is not None for p in model.trunk.parameters())


def _mixed_precision(rank: int, expected: list[Tensor]) -> float:
    """bfloat16 parameters (FSDP all-gathers them in bfloat16): the Gram and the solve run in float64, and the
    gradients match the float64 full-batch ones to bfloat16 accuracy (measured: 1.3e-2 of the largest entry; a plain
    ``sum(losses).backward()`` under the same policy is 1.1e-2 off the float64 sum)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = _model("vae")
    step = _shard(model, "each", mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    x = _batch("vae", 6)[rank * 3 : (rank + 1) * 3]
    report = _step(model, step, x, "auto", "imtlg", "sharded", rank * 3)
    assert report.blocks[0].gram.dtype == torch.float64
    err = max(
        float((p.grad.full_tensor() - e).abs().max() / e.abs().max()) for p, e in zip(model.parameters(), expected)
    )
    assert err <= 0.05, err
    return err


def _tensor_parallel(rank: int) -> None:
    """A DTensor parameter that fully_shard does not manage (tensor parallel) is refused, naming it, and so are
    DTensor activations."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    w = nn.Parameter(distribute_tensor(torch.randn(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    x = distribute_tensor(torch.randn(5, 3, dtype=torch.float64), mesh, [Replicate()])
    y = x @ w.T
    losses = [y[:, :2].pow(2).mean().full_tensor(), y[:, 2:].pow(2).mean().full_tensor()]
    with pytest.raises(TypeError, match="tensor parallel"):
        impartial.backward(losses, [w])
    v = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))  # a plain parameter, DTensor activations
    z = DTensor.from_local(torch.tanh(x.to_local() @ v.T), mesh, [Shard(0)])
    with pytest.raises(TypeError, match="DTensor activations"):
        impartial.backward([(z[:, :2] ** 2).mean().full_tensor(), (z[:, 2:] ** 2).mean().full_tensor()], [v])


def _worker(rank: int, init: str, cases: list, expected: list, extra: list, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        errs = _cases(rank, cases, expected)
        _nonfinite_on_one_rank(rank, extra[0])
        low = _mixed_precision(rank, extra[1])
        _tensor_parallel(rank)
        dist.barrier()  # both ranks leave their last collective before either tears gloo down
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump([errs, low], f)


def test_one_rank_fsdp_equals_the_plain_backward(one_rank) -> None:
    """In one process (no process group to reduce over) FSDP's post-backward still runs once, after the write:
    ``Sum`` without ``keep_norm`` gives ``sum(losses + also).backward()``'s gradients, for every block mode."""
    for block in ("auto", "marked", "params"):
        model, plain = _model("vae"), _model("vae")
        step, ref = _shard(model, "each"), _shard(plain, "each")
        x = _batch("vae", 6)
        tasks, also, _ = ref(x)
        sum(tasks + also).backward()
        tasks, also, z = step(x)
        impartial.backward(
            tasks,
            model.trunk.parameters(),
            solver="sum",
            also=also,
            keep_norm=False,
            block=z if block == "marked" else block,
        )
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor(), rtol=0, atol=1e-14)


def test_fsdp_grads_equal_the_single_process_full_batch_grads(tmp_path) -> None:
    """Every case, one step and 2 micro-batches (the first without gradient sync), in one pair of processes."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    cases = [(*c, micro) for c in CASES for micro in (1, 2)]
    expected = [_reference(name, block, solver, shared, micro) for name, _, block, solver, shared, micro in cases]
    extra = [_reference("mlp", "auto", "sum", "sharded", 1), _reference("vae", "auto", "imtlg", "sharded", 1)]
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_worker, args=(init, cases, expected, extra, str(tmp_path / "worst")), nprocs=WORLD, join=True)
    got = [json.loads((tmp_path / f"worst.{r}").read_text()) for r in range(WORLD)]
    errs = [max(e) for e in zip(*(g[0] for g in got))]
    for case, err in zip(cases, errs):  # pytest -s shows every case's max |grad - full-batch grad|
        print(*(c or "None" for c in case), f"{err:.2g}")
    print(f"bfloat16 parameters (relative to the float64 full batch): {max(g[1] for g in got):.3g}")
    assert max(errs) <= TOL
