"""Every sample a task (instance-wise risk minimisation) on scikit-learn's digits: plain SGD on the mean loss vs
Jacobian descent with UPGrad on the per-sample losses.

Both train the same MLP (64 → 64 → 64 → 10, ReLU) with the same SGD (lr 0.1, batch 32) from the same
initialisation; the only difference is the step's direction:

- **plain**: ``F.cross_entropy(model(x), y).backward()``, the mean of the per-sample gradients;
- **UPGrad**: ``impartial.backward(L, model, block="params", solver=UPGrad(), keep_norm=False)`` with ``L`` the
  vector of the batch's 32 per-sample losses (``reduction="none"``): 32 tasks.  The graph proves that each loss
  depends on its own sample only, so the 32 × 32 Gram matrix of the per-sample gradients comes from one plain
  backward (``Report.blocks[0].gram_from == "per-sample"``), and UPGrad's weights give a direction that conflicts
  with no sample's gradient.  ``keep_norm=False`` keeps UPGrad's own scale (the mean's, for aligned gradients).

Printed per epoch: the mean and the worst per-sample training loss, test accuracy; at the end, the seconds per
epoch of each (thread time) and the share of conflicting gradient pairs UPGrad saw.

    python examples/per_sample_digits.py                  # 3 seeds × 30 epochs, ~2 minutes on one CPU thread
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


def train(method: str, seed: int, epochs: int, batch: int, lr: float) -> dict:
    Xtr, ytr, Xte, yte = data(seed)
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
                report = impartial.backward(L, net, block="params", solver=solver, keep_norm=False)
                assert report.blocks[0].gram_from == "per-sample", report.blocks[0].note
                conflicting.append(report.blocks[0].summary()["conflicting"])
            else:  # a last batch of one sample: its gradient is the direction
                L.sum().backward()
            opt.step()
        seconds += time.thread_time() - start
        with torch.no_grad():
            train_losses = F.cross_entropy(net(Xtr), ytr, reduction="none")
            acc = (net(Xte).argmax(1) == yte).float().mean().item()
        curve.append((train_losses.mean().item(), train_losses.max().item(), acc))
    return {"curve": curve, "s_per_epoch": seconds / epochs,
            "conflicting": sum(conflicting) / len(conflicting) if conflicting else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs = {m: [train(m, s, a.epochs, a.batch, a.lr) for s in range(a.seeds)] for m in ("plain", "UPGrad")}
    print(f"digits, MLP 64-64-64-10, SGD lr {a.lr}, batch {a.batch}, {a.seeds} seeds (mean over seeds)")
    print(f"{'epoch':>5} | {'plain: mean loss':>16} {'worst loss':>10} {'test acc':>8} | "
          f"{'UPGrad: mean loss':>17} {'worst loss':>10} {'test acc':>8}")
    for e in sorted({0, 4, 9, 19, a.epochs - 1} & set(range(a.epochs))):
        cols = []
        for m in ("plain", "UPGrad"):
            pts = [r["curve"][e] for r in runs[m]]
            cols.append(tuple(sum(p[i] for p in pts) / len(pts) for i in range(3)))
        (pm, pw, pa), (um, uw, ua) = cols
        print(f"{e + 1:>5} | {pm:>16.4f} {pw:>10.3f} {pa:>8.3f} | {um:>17.4f} {uw:>10.3f} {ua:>8.3f}")
    sp = sum(r["s_per_epoch"] for r in runs["plain"]) / a.seeds
    su = sum(r["s_per_epoch"] for r in runs["UPGrad"]) / a.seeds
    conflict = sum(r["conflicting"] for r in runs["UPGrad"]) / a.seeds
    print(f"seconds per epoch (thread time): plain {sp:.3f}, UPGrad {su:.3f} ({su / sp:.1f}x); "
          f"UPGrad saw {100 * conflict:.1f}% of the per-sample gradient pairs in conflict")


if __name__ == "__main__":
    main()
