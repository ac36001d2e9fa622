"""Every sample a task (instance-wise risk minimisation) on scikit-learn's digits: plain SGD on the mean loss vs
Jacobian descent with UPGrad on the per-sample losses.

All train the same MLP (64 → 64 → 64 → 10, ReLU) with the same SGD (lr 0.1, batch 32) from the same
initialisation; only the step differs:

- **plain**: ``F.cross_entropy(model(x), y).backward()``, the mean of the per-sample gradients;
- **UPGrad, plain length**: ``impartial.backward(L / B, model, block="params", solver=UPGrad())`` with ``L`` the
  vector of the batch's per-sample losses (``reduction="none"``): B = 32 tasks.  The graph proves that each loss
  depends on its own sample only, so the 32 × 32 Gram matrix of the per-sample gradients comes from one plain
  backward (``Report.blocks[0].gram_from == "per-sample"``); UPGrad's direction conflicts with no sample's
  gradient, and ``keep_norm=True`` (the default) gives it the plain step's length: only the direction changes;
- **UPGrad, own length**: the same with ``keep_norm=False``: UPGrad's own scale (the mean's when the samples
  agree, longer when they conflict), as TorchJD's ``autogram`` examples step.

Printed: the mean and the worst per-sample training loss and the test accuracy at a few epochs (means over
seeds), the seconds per epoch (thread time), and the share of per-sample gradient pairs in conflict.

    python examples/per_sample_digits.py                  # 3 seeds × 30 epochs, ~4 minutes on one CPU thread
    python examples/per_sample_digits.py --epochs 3 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import impartial
from impartial.solvers import UPGrad

METHODS = ("plain", "UPGrad, plain length", "UPGrad, own length")


def data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits (1797 images of 8 × 8), pixels scaled to [0, 1], 75% / 25% split drawn by ``seed``."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return X[order[:cut]], y[order[:cut]], X[order[cut:]], y[order[cut:]]


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(method: str, seed: int, epochs: int, batch: int, lr: float, limit: int | None = None) -> dict:
    """``epochs`` of SGD by ``method``; ``limit``: train on the first ``limit`` training images only."""
    Xtr, ytr, Xte, yte = data(seed)
    Xtr, ytr = Xtr[:limit], ytr[:limit]
    net = model(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    solver = UPGrad()
    curve, seconds, conflicting = [], 0.0, []
    order_gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        start = time.thread_time()
        for idx in torch.randperm(len(ytr), generator=order_gen).split(batch):
            opt.zero_grad()
            L = F.cross_entropy(net(Xtr[idx]), ytr[idx], reduction="none")
            if method == "plain":
                L.mean().backward()
            elif len(idx) > 1:
                own = method == "UPGrad, own length"
                report = impartial.backward(
                    L if own else L / len(idx), net, block="params", solver=solver, keep_norm=not own
                )
                assert report.blocks[0].gram_from == "per-sample", report.blocks[0].note
                conflicting.append(report.blocks[0].summary()["conflicting"])
            else:  # a last batch of one sample: its gradient is the direction
                L.mean().backward()
            opt.step()
        seconds += time.thread_time() - start
        with torch.no_grad():
            train_losses = F.cross_entropy(net(Xtr), ytr, reduction="none")
            acc = (net(Xte).argmax(1) == yte).float().mean().item()
        curve.append((train_losses.mean().item(), train_losses.max().item(), acc))
    return {
        "curve": curve,
        "s_per_epoch": seconds / epochs,
        "conflicting": sum(conflicting) / len(conflicting) if conflicting else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs = {m: [train(m, s, a.epochs, a.batch, a.lr) for s in range(a.seeds)] for m in METHODS}
    print(f"digits, MLP 64-64-64-10, SGD lr {a.lr}, batch {a.batch}, {a.seeds} seeds (means over seeds)\n")
    print("| method | epoch | mean train loss | worst train loss | test accuracy |\n|---|---|---|---|---|")
    for m in METHODS:
        for e in sorted({0, 4, 9, 19, a.epochs - 1} & set(range(a.epochs))):
            pts = [r["curve"][e] for r in runs[m]]
            mean, worst, acc = (sum(p[i] for p in pts) / len(pts) for i in range(3))
            print(f"| {m} | {e + 1} | {mean:.4f} | {worst:.3f} | {acc:.3f} |")
    base = sum(r["s_per_epoch"] for r in runs["plain"]) / a.seeds
    print(f"\nseconds per epoch (thread time): plain {base:.3f}", end="")
    for m in METHODS[1:]:
        sec = sum(r["s_per_epoch"] for r in runs[m]) / a.seeds
        conflict = sum(r["conflicting"] for r in runs[m]) / a.seeds
        print(f"; {m} {sec:.3f} ({sec / base:.0f}x, {100 * conflict:.0f}% of sample pairs in conflict)", end="")
    print()


if __name__ == "__main__":
    main()
