"""Quick wall-time ratios of ``impartial.backward`` to ``sum(losses).backward()``, in one process.

1. A multimodal VAE step (3 modality decoders, KL as ``also``), ``block="auto"`` (the block is ``z``).
2. A ~1M-parameter shared encoder with k = 8 heads, ``block="params"``.

Each variant is timed many times, interleaved with the plain baseline (the machine may be shared and noisy);
medians and ratios are printed for the backward call alone and for the whole step (forward + backward).
``loop`` is the same computation with the per-task gradients from a loop of k backward passes instead of one
batched (vmapped) backward: a private switch, for comparison only.
Run: ``python benchmarks/bench_backward_quick.py [--repeats 40] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import impartial
from impartial._engine import _Engine
from impartial.solvers import IMTLG


class VAE(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (784, 300, 100), d_z: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = nn.Sequential(nn.Linear(sum(dims), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * d_z))
        self.decoders = nn.ModuleList(nn.Sequential(nn.Linear(d_z, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                      for d in dims)

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
        h = self.encoder(x)
        return [head(h).pow(2).mean() for head in self.heads], []


def compare(name: str, model: nn.Module, x: torch.Tensor, shared: list[torch.Tensor], block: str,
            repeats: int, sync: Callable[[], None]) -> None:
    solver = IMTLG()

    def run(variant: str) -> tuple[float, float]:
        """(backward seconds, step seconds) of one step."""
        model.zero_grad(set_to_none=True)
        _Engine.batched = variant != "loop"
        sync()
        t0 = time.perf_counter()
        recs, also = model.losses(x)
        sync()
        t1 = time.perf_counter()
        if variant == "plain":
            sum(recs + also).backward()
        else:
            impartial.backward(recs, shared, solver=solver, also=also, block=block)
        sync()
        t2 = time.perf_counter()
        return t2 - t1, t2 - t0

    variants = ["plain", "batched", "loop"]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for i in range(repeats + 3):  # interleaved, order rotated; the first 3 rounds warm up
        for v in variants[i % 3:] + variants[:i % 3]:
            t = run(v)
            if i >= 3:
                times[v].append(t)
    _Engine.batched = True
    med = {v: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for v, ts in times.items()}
    n_params = sum(p.numel() for p in shared)
    print(f"{name}: shared params {n_params / 1e6:.2f}M, block={block!r}, solver {solver!r}, {repeats} repeats")
    for v in variants:
        b, s = med[v]
        print(f"  {v:>8}: backward {1e3 * b:8.2f} ms ({b / med['plain'][0]:5.2f}x)   "
              f"step {1e3 * s:8.2f} ms ({s / med['plain'][1]:5.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    vae = VAE().to(dev)
    compare("multimodal VAE (3 modalities, batch 128)", vae, torch.randn(128, sum(vae.dims), device=dev),
            list(vae.encoder.parameters()), "auto", args.repeats, sync)
    enc = Shared().to(dev)
    compare("shared encoder, k = 8 (batch 64)", enc, torch.randn(64, 512, device=dev),
            list(enc.encoder.parameters()), "params", args.repeats, sync)
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
