"""Quick wall-time ratios of ``impartial.backward`` to ``sum(losses).backward()``, in one process.

1. A multimodal VAE step (3 modality decoders, KL as ``also``), ``block="auto"`` (the block is ``z``).
2. An MLP: a ~1M-parameter shared encoder with k = 8 heads, ``block="auto"`` (the block is the encoder's output);
3. the same with ``block="params"``;
4. the benchmark suite's ``mlp-k8`` (``_bench_models.make_mlp(8)``: trunk 256 → 1024 → 768, batch 128, eight
   768 → 8 heads with an MSE loss each), ``block="auto"``.

Each variant is timed many times, interleaved with the plain baseline (the machine may be shared and noisy);
medians and ratios are printed for the backward call alone and for the whole step (forward + backward).
``auto`` is the default (the per-task pass chosen per block by structure), ``batched`` and ``loop`` force one
vmapped backward or a loop of k backward passes (``task_grads=``); ``torchjd`` is TorchJD's ``mtl_backward`` +
``jac_to_grad`` with its IMTL-G (the params case; when torchjd is installed).
``--clock thread`` times the thread's CPU time instead of wall time: with one thread on a loaded machine it
is far less noisy (other processes' time is not counted).
Run: ``python benchmarks/bench_backward_quick.py [--repeats 40] [--device cuda] [--threads 1 --clock thread]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import impartial
from impartial.solvers import IMTLG

try:
    from torchjd.aggregation import IMTLG as _TorchJDIMTLG
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # optional: the bench extra
    mtl_backward = None


class VAE(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (784, 300, 100), d_z: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = nn.Sequential(
            nn.Linear(sum(dims), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d_z)
        )
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.Linear(d_z, hidden), nn.ReLU(), nn.Linear(hidden, d)) for d in dims
        )

    def losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        parts = x.split(list(self.dims), -1)
        recs = [(dec(z) - part).pow(2).sum(-1).mean() for dec, part in zip(self.decoders, parts)]
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return recs, [kl]


class Shared(nn.Module):
    def __init__(self, d_in: int = 512, hidden: int = 1024, k: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_in), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(d_in, 10) for _ in range(k))

    def losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.features = h = self.encoder(x)
        return [head(h).pow(2).mean() for head in self.heads], []


class SuiteMLP(nn.Module):
    """``_bench_models.make_mlp(8)`` as a module with ``losses(x)``."""

    def __init__(self, dev: torch.device) -> None:
        super().__init__()
        from _bench_models import make_mlp

        setup = make_mlp(8)
        self.encoder = nn.ParameterList(setup.shared)  # the same parameters: zero_grad reaches them all
        self.heads = nn.ParameterList([p for head in setup.heads for p in head])
        self.setup, self.x = setup, torch.zeros(())

    def losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tasks, also, self.features = self.setup.forward()
        return tasks, also


def compare(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    shared: list[torch.Tensor],
    block: str,
    repeats: int,
    sync: Callable[[], None],
    clock: Callable[[], float],
) -> None:
    solver = IMTLG()
    agg = _TorchJDIMTLG() if mtl_backward is not None else None

    def run(variant: str) -> tuple[float, float]:
        """(backward seconds, step seconds) of one step."""
        model.zero_grad(set_to_none=True)
        sync()
        t0 = clock()
        recs, also = model.losses(x)
        sync()
        t1 = clock()
        if variant == "plain":
            sum(recs + also).backward()
        elif variant == "torchjd":
            mtl_backward(recs, features=model.features)
            jac_to_grad(shared, agg)
        else:
            impartial.backward(recs, shared, solver=solver, also=also, block=block, task_grads=variant)
        sync()
        t2 = clock()
        return t2 - t1, t2 - t0

    variants = ["plain", "auto", "batched", "loop"]
    if mtl_backward is not None and hasattr(model, "features"):
        variants.append("torchjd")
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    n = len(variants)
    for i in range(repeats + 3):  # interleaved, order rotated; the first 3 rounds warm up
        for v in variants[i % n :] + variants[: i % n]:
            t = run(v)
            if i >= 3:
                times[v].append(t)
    med = {v: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for v, ts in times.items()}
    n_params = sum(p.numel() for p in shared)
    print(f"{name}: shared params {n_params / 1e6:.2f}M, block={block!r}, solver {solver!r}, {repeats} repeats")
    for v in variants:
        b, s = med[v]
        print(
            f"  {v:>8}: backward {1e3 * b:8.2f} ms ({b / med['plain'][0]:5.2f}x)   "
            f"step {1e3 * s:8.2f} ms ({s / med['plain'][1]:5.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    vae = VAE().to(dev)
    compare(
        "multimodal VAE (3 modalities, batch 128)",
        vae,
        torch.randn(128, sum(vae.dims), device=dev),
        list(vae.encoder.parameters()),
        "auto",
        args.repeats,
        sync,
        clock,
    )
    enc = Shared().to(dev)
    for block in ("auto", "params"):
        compare(
            "shared encoder, k = 8 (batch 64)",
            enc,
            torch.randn(64, 512, device=dev),
            list(enc.encoder.parameters()),
            block,
            args.repeats,
            sync,
            clock,
        )
    mlp = SuiteMLP(dev)
    compare(
        "benchmark suite's mlp-k8 (batch 128)",
        mlp,
        mlp.x,
        list(mlp.encoder.parameters()),
        "auto",
        args.repeats,
        sync,
        clock,
    )
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, clock {args.clock}")


if __name__ == "__main__":
    main()
