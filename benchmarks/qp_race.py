"""The QP solvers against TorchJD: time (interleaved, one process) and accuracy side by side, as JSON.

    python benchmarks/qp_race.py --out benchmarks/results/cpu-qp-race.json            # the issue's grid
    python benchmarks/qp_race.py --solvers UPGrad --ks 256 --ds 1e4 --reps 3 --out -  # one point, to stdout

For each solver, ``k`` and ``d``: ``J = randn(k, d)`` in float32 (the solver grid's input), one torch thread.
Each round times ours, then TorchJD's same-named aggregator, then the floor ``J.mean(0)`` (the cost of the
combination ``wᵀJ``) and one ``J @ J.T``, in that order, so a burst of load from other processes hits both
libraries alike; the JSON keeps the min and the median over rounds.  ``TorchJD / (floor + Gram)`` bounds the
speed-up any solver can have over TorchJD (TorchJD's time includes its own Gram and combination).  Accuracy
is computed in float64 from the same float32 ``J`` (the exact answer is that of the float32 values), for
both libraries by the same code:

- UPGrad / DualProj: ``err`` = ‖d − d*‖ / ‖d*‖ against the exact projections (Lawson–Hanson NNLS in the
  Cholesky coordinates of ``G``), and ``conflict`` = max_j −g_j·d / (‖g_j‖ ‖d‖) (0 when no task conflicts);
- MGDA: ``gap`` = (‖d‖² − min_j g_j·d) / max_j ‖g_j‖², the duality gap of the min-norm point (0 at the
  optimum, from the returned weights alone);
- CAGrad: ``gap`` = (F(w) − min_j g_j·d) / ‖g₀‖², the duality gap of the paper's problem, with ``w`` the dual
  weights recovered from the returned ones (``∝ weights − 1/k``) and F(w) = g_w·g₀ + c‖g₀‖‖g_w‖; and ``ball`` =
  (‖d − g₀‖ − c‖g₀‖)₊ / (c‖g₀‖).
- NashMTL: ``err`` = max_i |α_i (Gα)_i − 1| of the returned weights' best rescaling (its stationarity condition).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _bench_registry import Entry, versions  # noqa: E402
from impartial.solvers import CAGrad, gram  # noqa: E402

SOLVERS = ("UPGrad", "DualProj", "MGDA", "CAGrad", "NashMTL")
KS = (32, 64, 128)
DS = (10**4, 10**5)
#: the UPGrad target point (k = 256, d = 1e4), added to the grid for UPGrad
EXTRA = {("UPGrad", 256, 10**4)}
#: CAGrad's c on both sides (the issue's setting)
C = 0.5


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    return nnls(A, b, maxiter=50 * A.shape[1])[0]


def _projections(R: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Coordinates of the projections of ``Rᵀu`` (rows ``u`` of ``U``) onto ``{x : R x ≥ 0}``."""
    return np.stack([R.T @ u + R.T @ _nnls(R.T, -(R.T @ u)) for u in U])


def _accuracy(name: str, J: torch.Tensor, w: torch.Tensor, c: float = C) -> dict[str, float]:
    J = J.double()
    w = w.double()
    d = w @ J
    G = J @ J.T
    k = J.shape[0]
    norms = G.diagonal().sqrt()
    if name in ("UPGrad", "DualProj"):
        Gn = G.numpy()
        R = np.linalg.cholesky(Gn + 1e-300 * np.eye(k))  # rows: the task gradients in an orthonormal basis
        U = np.eye(k) if name == "UPGrad" else np.full((1, k), 1.0 / k)
        x = _projections(R, U).mean(0)  # in R's coordinates
        dn = w.numpy() @ R
        err = float(np.linalg.norm(dn - x) / max(np.linalg.norm(x), 1e-300))
        conflict = float(max(0.0, -float(((J @ d) / (norms * d.norm()).clamp(min=1e-300)).min())))
        return {"err": err, "conflict": conflict}
    if name == "MGDA":
        return {"gap": float((d @ d - (J @ d).min()) / norms.max() ** 2)}
    if name == "CAGrad":
        g0 = J.mean(0)
        r = c * float(g0.norm())
        u = w - 1.0 / k
        u = u / u.sum()
        gu = u @ J
        F = float(gu @ g0) + r * float(gu.norm())
        gap = (F - float((J @ d).min())) / float(g0 @ g0)
        ball = max(0.0, float((d - g0).norm()) - r) / r
        return {"gap": gap, "ball": ball}
    if name == "NashMTL":
        Gw = G @ w
        # the best positive rescaling t·w of the weights for α ⊙ Gα = 1 (our scale and TorchJD's differ)
        p = w * Gw
        t = float((p.sum() / (p * p).sum()).clamp(min=0).sqrt()) if float((p * p).sum()) > 0 else 1.0
        return {"err": float((t * t * p - 1).abs().max())}
    raise ValueError(name)


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def race(name: str, k: int, d: int, reps: int) -> dict[str, Any]:
    J = torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    entry = Entry(name, "", True, name)
    ours = CAGrad(c=C) if name == "CAGrad" else entry.make()
    theirs = entry.make_torchjd(k, ours)
    with torch.no_grad():
        w_ours = ours.weights(gram(J))
        d_ours = ours(J)
        d_theirs = theirs(J)  # warm-up: cvxpy's problem construction, quadprog's import
        if hasattr(theirs, "gramian_weighting"):
            w_theirs = theirs.gramian_weighting(J @ J.T)
        else:
            w_theirs = theirs.weighting(J) if hasattr(theirs, "weighting") else None
        times: dict[str, list[float]] = {"ours": [], "torchjd": [], "floor": [], "gram": []}
        for _ in range(reps):
            times["ours"].append(_time(lambda: ours(J)))
            times["torchjd"].append(_time(lambda: theirs(J)))
            times["floor"].append(_time(lambda: J.mean(0)))
            times["gram"].append(_time(lambda: J @ J.T))
    assert torch.allclose(w_ours.float() @ J, d_ours, rtol=1e-4, atol=1e-4 * float(d_ours.abs().max()))
    rec: dict[str, Any] = {"solver": name, "k": k, "d": d, "reps": reps, **versions()}
    for side, ts in times.items():
        rec[f"{side}_min"], rec[f"{side}_median"] = min(ts), statistics.median(ts)
    rec["acc_ours"] = _accuracy(name, J, w_ours)
    if w_theirs is not None:
        rec["acc_torchjd"] = _accuracy(name, J, w_theirs)
    rec["direction_diff"] = float(
        (d_ours.double() - d_theirs.double()).norm() / d_ours.double().norm().clamp(min=1e-300)
    )
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--ds", nargs="+", type=float, default=[float(d) for d in DS])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-extra", action="store_true", help="skip the UPGrad k = 256 target point")
    ap.add_argument("--out", default="-", help="JSON file, or - for stdout")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of these results instead")
    a = ap.parse_args(argv)
    if a.table:
        print(table([r for p in a.table for r in json.loads(Path(p).read_text())["records"]]))
        return
    torch.set_num_threads(1)
    points = [(s, k, int(d)) for s in a.solvers for d in a.ds for k in a.ks]
    if not a.no_extra:
        points += [p for p in sorted(EXTRA) if p[0] in a.solvers and p not in points]
    out = []
    for s, k, d in points:
        slow = k >= 256 or (s == "UPGrad" and k >= 128)
        rec = race(s, k, d, max(3, a.reps // 2) if slow else a.reps)
        out.append(rec)
        fg = rec["floor_min"] + rec["gram_min"]
        print(
            f"{s:9s} k={k:4d} d={d:7d}  ours {rec['ours_min'] * 1e3:9.2f} ms"
            f"  TorchJD {rec['torchjd_min'] * 1e3:9.2f} ms  ratio {rec['torchjd_min'] / rec['ours_min']:6.2f}"
            f"  floor+gram {fg * 1e3:7.2f} ms  ours/(floor+gram) {rec['ours_min'] / fg:5.2f}"
            f"  bound {rec['torchjd_min'] / fg:6.2f}  acc {rec['acc_ours']} vs {rec.get('acc_torchjd')}",
            file=sys.stderr,
            flush=True,
        )
    doc = {"kind": "qp_race", "machine": _machine(), "records": out}
    text = json.dumps(doc, indent=1)
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)


def _acc(acc: dict[str, float] | None) -> str:
    if acc is None:
        return "–"
    key = "err" if "err" in acc else "gap"
    return f"{acc[key]:.0e}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown.  The target grid (``d < 1e6``): one row per solver, one column per ``(k, d)``; each cell
    TorchJD / ours (min over rounds), the accuracy of ours and TorchJD's (``err`` or ``gap``, see the module
    docstring), and, below the 3× target (bold), the bound ``TorchJD / (floor + Gram)`` that no solver can
    beat.  Then ``d ≥ 1e6`` (memory-bound): ours / (floor + Gram)."""
    by = {(r["solver"], r["k"], r["d"]): r for r in records}
    names = [s for s in SOLVERS if any(r["solver"] == s for r in records)]
    out = []
    for big in (False, True):
        cols = sorted({(r["k"], r["d"]) for r in records if (r["d"] >= 10**6) == big}, key=lambda kd: (kd[1], kd[0]))
        if not cols:
            continue
        out.append("| solver | " + " | ".join(f"k={k} d=1e{len(str(d)) - 1}" for k, d in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for s in names:
            cells = [_cell(by.get((s, k, d)), big) for k, d in cols]
            if any(cells):
                out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _cell(r: dict[str, Any] | None, big: bool) -> str:
    if r is None:
        return ""
    fg = r["floor_min"] + r["gram_min"]
    if big:
        return f"{r['ours_min'] / fg:.2f}"
    ratio = r["torchjd_min"] / r["ours_min"]
    cell = f"{ratio:.3g}× ({_acc(r['acc_ours'])} vs {_acc(r.get('acc_torchjd'))})"
    return cell if ratio >= 3 else f"**{cell}**, bound {r['torchjd_min'] / fg:.3g}×"


def _machine() -> str:
    import platform

    name = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


if __name__ == "__main__":
    main()
