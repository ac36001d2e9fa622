"""``impartial.backward`` inside ``DistributedDataParallel``: 2 gloo processes on CPU, float64.

Each rank runs the step on its half of the batch (every loss a mean over the batch, as DDP's averaging
assumes); every ``.grad`` after DDP's all-reduce must equal the single-process full-batch ``.grad`` (computed
here, in the parent, before the workers start).  Also with ``no_sync()`` gradient accumulation over 2
micro-batches, and DDP's all-reduce must see every parameter exactly once per synchronised step (a counting comm
hook).  A task that is not finite on one rank only makes every rank raise (or skip it) together.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import impartial
from models import make, shared_params

WORLD = 2
TOL = 1e-6
# (model, block, solver name): Gram-space solvers at activation blocks, and parameter blocks
CASES = [
    ("mlp", "auto", "sum"),
    ("mlp", "auto", "imtlg"),
    ("mlp", "auto", "upgrad"),
    ("mlp", "params", "mgda"),
    ("vae", "auto", "imtlg"),
    ("vae", "auto", "mgda"),
    ("vae", "params", "imtlg"),
]


class _Step(nn.Module):
    """DDP needs a forward: this one returns the model's (tasks, also)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        tasks, also, _ = self.model.losses(x)
        return tasks, also


def _model(name: str) -> nn.Module:
    """The zoo's model; the VAE with noise for 12 rows (2 micro-batches of 6)."""
    model, _ = make(name)
    if hasattr(model, "eps_offset"):
        model.eps = torch.randn(
            12, model.eps.shape[1], generator=torch.Generator().manual_seed(3), dtype=model.eps.dtype
        )
    return model


def _batch(name: str, n: int) -> Tensor:
    """A batch of ``n`` rows for ``name`` (deterministic)."""
    _, x = make(name)
    reps = -(-n // x.shape[0])
    return torch.cat([x] * reps)[:n] + 0.01 * torch.arange(n, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def _step(model: nn.Module, fwd: nn.Module, x: Tensor, block: str, solver: str, offset: int = 0) -> None:
    if hasattr(model, "eps_offset"):
        model.eps_offset = offset
    tasks, also = fwd(x)
    if not hasattr(model, "eps_offset"):  # the MLP's also term is a sum over the batch: make it a mean
        also = [a / x.shape[0] for a in also]
    impartial.backward(tasks, shared_params(model), solver=solver, also=also, block=block)


def _reference(name: str, block: str, solver: str, micro: int) -> list[Tensor]:
    """Single process, full batch (``micro`` micro-batches accumulated)."""
    model, n = _model(name), 6
    for m in range(micro):
        x = _batch(name, n * micro)[m * n : (m + 1) * n]
        _step(model, _Step(model), x, block, solver, offset=m * n)
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]


def _nonfinite_on_one_rank(rank: int) -> None:
    """A head gradient that is NaN on rank 1 only (the block rows stay finite): both ranks raise, or both skip
    the task, with ``.grad`` untouched; no rank is left waiting in a collective."""
    for policy in ("raise", "skip"):
        model = _model("mlp")
        tasks, also, _ = model.losses(_batch("mlp", 6)[rank * 3 : (rank + 1) * 3])
        poison = float("nan") if rank == 1 else 0.0
        tasks[2] = tasks[2] + (model.heads[2][0].weight * poison).sum()
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"losses\[2\]"):
                impartial.backward(tasks, shared_params(model), also=also)
            assert all(p.grad is None for p in model.parameters())
        else:
            report = impartial.backward(tasks, shared_params(model), also=also, nonfinite="skip")
            assert report.skipped == ("losses[2]",)
            assert all(p.grad is None for p in model.heads[2].parameters())


def _worker(rank: int, init: str, cases: list, expected: list, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    worst = 0.0
    try:
        for (name, block, solver, micro), exp in zip(cases, expected):
            model = _model(name)
            ddp = nn.parallel.DistributedDataParallel(_Step(model))
            seen: list[int] = []

            def count(state, bucket):  # DDP's all-reduce, counting the parameters it reduces
                seen.extend(id(p) for p in bucket.parameters())  # noqa: B023 -- this iteration's DDP only
                fut = dist.all_reduce(bucket.buffer() / WORLD, async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])

            ddp.register_comm_hook(None, count)
            n = 6  # the full micro-batch; each rank takes its half
            half = n // WORLD
            for m in range(micro):
                x = _batch(name, n * micro)[m * n : (m + 1) * n][rank * half : (rank + 1) * half]
                offset = m * n + rank * half
                if m < micro - 1:
                    with ddp.no_sync():
                        _step(model, ddp, x, block, solver, offset)
                    assert not seen, "DDP reduced gradients inside no_sync()"
                else:
                    _step(model, ddp, x, block, solver, offset)
            ids = sorted(id(p) for p in model.parameters() if p.requires_grad)
            assert sorted(seen) == ids, f"{name}/{block}/{solver}: DDP reduced {len(seen)} of {len(ids)} parameters"
            for p, e in zip(model.parameters(), exp):
                err = float((p.grad - e).abs().max())
                worst = max(worst, err)
                assert err <= TOL * max(1.0, float(e.abs().max())), (name, block, solver, micro, err)
        _nonfinite_on_one_rank(rank)
        # both ranks leave their last collective before either tears gloo down: a rank destroying the group
        # while its peer is still in flight can abort the peer (seen once: SIGABRT in a CI run)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(worst))


def test_ddp_grads_equal_the_single_process_full_batch_grads(tmp_path) -> None:
    """Every case, one step and 2 accumulated micro-batches (``no_sync``), in one pair of processes."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    cases = [(*c, micro) for c in CASES for micro in (1, 2)]
    expected = [_reference(name, block, solver, micro) for name, block, solver, micro in cases]
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_worker, args=(init, cases, expected, str(tmp_path / "worst")), nprocs=WORLD, join=True)
    worst = max(float((tmp_path / f"worst.{r}").read_text()) for r in range(WORLD))
    print(f"max |grad - full-batch grad| over all cases and ranks: {worst:.3g}")
    assert worst <= TOL
