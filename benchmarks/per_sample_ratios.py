"""The per-sample benchmark's numbers for BENCHMARKS.md: step-time ratios, peak memory and accuracy, ours next to
TorchJD's autogram, each measured within one process.

- **time**: thread time (``time.thread_time``: the CPU time of this thread, insensitive to other processes on a
  shared machine), the three variants (plain, impartial, TorchJD) interleaved round by round, the minimum over
  rounds; a call over ``--slow`` seconds is timed once (UPGrad at B = 512: minutes on both sides);
- **solve share**: the part of our step spent in ``solver.solve(G)`` (thread time of that call, made again after
  the rounds), and TorchJD's weighting ``weighting(G)`` likewise (the Mean rows, whose weighting costs nothing,
  compare the Gram paths);
- **floor**: ``(plain + Gram pass) / plain``, the Gram pass timed inside our step (min over rounds): one Gram pass
  and one weighted backward (which costs a plain step), the least a per-sample step can cost;
- **memory**: the rise of the resident set during one step (``_bench_util.peak_mb``), each variant after a warm-up;
- **accuracy** (``--accuracy``): against ``J`` in float64 (each sample's loss differentiated on its own): the relative
  error of the Gram matrix, and of the direction ``Σ_b w_b g_b`` where ``w`` is the weighting of the float64 Gram
  (Mean: exact; UPGrad: our solver in float64, skipped at B = 512).

    python benchmarks/per_sample_ratios.py --out benchmarks/results/cpu-per-sample.json --accuracy
    python benchmarks/per_sample_ratios.py --table benchmarks/results/cpu-per-sample.json   # markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from _bench_per_sample import MODELS, SIZES, WEIGHTINGS, Case, flat_grad, make, model_of, reference, step  # noqa: E402

import impartial._per_sample as PS  # noqa: E402
import impartial.solvers as S  # noqa: E402
from _bench_registry import versions  # noqa: E402
from _bench_util import peak_mb  # noqa: E402


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.thread_time()
    out = fn()
    return time.thread_time() - t, out


class _GramClock:
    """Thread time spent in the per-sample stage's Gram pass (``_per_sample._gram``: every layer's share of ``G``)
    during a step: with a plain step, the floor of the per-sample step (one Gram pass + one weighted backward)."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.inner = PS._gram
        PS._gram = self  # type: ignore[assignment]

    def __call__(self, *args: object) -> object:
        t = time.thread_time()
        try:
            return self.inner(*args)
        finally:
            self.spent += time.thread_time() - t


def _least(fn: Callable[[], object], slow: float, times: int = 3) -> float:
    """The least thread time of ``times`` calls (one where the first is over ``slow`` seconds)."""
    best = _timed(fn)[0]
    for _ in range(times - 1 if best < slow else 0):
        best = min(best, _timed(fn)[0])
    return best


def run_case(case: Case, weighting: str, rounds: int, slow: float, accuracy: Tensor | None) -> dict:
    fns = {
        "plain": step(case, "plain"),
        "impartial": step(case, "impartial", weighting),
        "torchjd": step(case, "torchjd", weighting),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    clock = _GramClock()
    grams: list[float] = []
    try:
        for k, f in fns.items():  # warm-up; a slow one counts as its measurement
            clock.spent = 0.0
            dt, outs[k] = _timed(f)
            if dt > slow:
                times[k].append(dt)
                grams += [clock.spent] if k == "impartial" else []
        for _ in range(rounds):
            for k, f in fns.items():
                if len(times[k]) and times[k][0] > slow:
                    continue
                clock.spent = 0.0
                dt, outs[k] = _timed(f)
                times[k].append(dt)
                grams += [clock.spent] if k == "impartial" else []
    finally:
        PS._gram = clock.inner  # type: ignore[assignment]
    rep = outs["impartial"]
    G = rep.blocks[0].gram  # type: ignore[attr-defined]
    solver = getattr(S, weighting)()
    from torchjd import aggregation

    weigh = getattr(aggregation, f"{weighting}Weighting")()
    G_tjd = outs["torchjd"][0]  # type: ignore[index]
    solve_s = _least(lambda: solver.solve(G, precision=torch.float32), slow)
    torchjd_weighting_s = _least(lambda: weigh(G_tjd), slow)
    row = {
        "model": case.name,
        "B": case.B,
        "weighting": weighting,
        "params": case.params,
        "gram_from": rep.blocks[0].gram_from,  # type: ignore[attr-defined]
        **{f"{k}_s": min(v) for k, v in times.items()},
        "solve_s": solve_s,
        "gram_s": min(grams),
        "torchjd_weighting_s": torchjd_weighting_s,
    }
    fast = max(min(v) for v in times.values()) < 5
    for k, f in fns.items():
        row[f"{k}_mb"] = peak_mb(f) if fast else None
    if accuracy is not None:
        row.update(_accuracy(case, weighting, accuracy, G, outs, fns))
    return row


def _accuracy(case: Case, weighting: str, J64: Tensor, G_ours: Tensor, outs: dict, fns: dict) -> dict:
    """Relative errors against float64: the Gram, and each side's direction against its own method applied to the
    float64 Gram (TorchJD's UPGradWeighting regularises the Gram it is given, ours solves the QP as stated: the
    two methods differ by design, so each is compared with itself)."""
    from torchjd import aggregation

    G64 = J64 @ J64.T
    G_tjd = outs["torchjd"][0].double()
    out = {
        "gram_err_impartial": float((G_ours - G64).norm() / G64.norm()),
        "gram_err_torchjd": float((G_tjd - G64).norm() / G64.norm()),
    }
    if weighting != "Mean" and case.B > 128:  # a float64 solve at k = 512 takes minutes: not measured
        return out
    refs = {
        "impartial": getattr(S, weighting)().weights(G64),
        "torchjd": getattr(aggregation, f"{weighting}Weighting")()(G64).double(),
    }
    for k, w in refs.items():
        d = w @ J64
        out[f"dir_err_{k}"] = float((flat_grad(model_of(fns[k])).double() - d).norm() / d.norm())
    return out


def table(rows: list[dict]) -> str:
    """Markdown: time ratios to the plain step (ours, its floor, TorchJD), TorchJD / ours, each side's weighting
    time (timed apart: the Mean rows compare the Gram paths), memory, accuracy."""
    head = (
        "| model | B | weighting | ours × plain | floor × plain | TorchJD × plain | TorchJD / ours | "
        "our solve ms | TorchJD weighting ms | peak MB ours | "
        "peak MB TorchJD | Gram err ours | Gram err TorchJD | dir err ours | dir err TorchJD |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v: object, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        p, ours, tjd = r["plain_s"], r["impartial_s"], r["torchjd_s"]
        floor = (p + r["gram_s"]) / p if "gram_s" in r else None
        lines.append(
            f"| {r['model']} | {r['B']} | {r['weighting']} | {ours / p:.2f} | {f(floor, '.2f')} | {tjd / p:.2f} | "
            f"{tjd / ours:.2f} | {1e3 * r['solve_s']:.1f} | "
            f"{f(1e3 * r['torchjd_weighting_s'] if 'torchjd_weighting_s' in r else None, '.1f')} | "
            f"{f(r.get('impartial_mb'), '.1f')} | {f(r.get('torchjd_mb'), '.1f')} | "
            f"{f(r.get('gram_err_impartial'), '.1e')} | {f(r.get('gram_err_torchjd'), '.1e')} | "
            f"{f(r.get('dir_err_impartial'), '.1e')} | {f(r.get('dir_err_torchjd'), '.1e')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--weightings", default=",".join(WEIGHTINGS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slow", type=float, default=5.0, help="a first call slower than this (s) is timed once")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--out", help="append rows to this JSON file")
    ap.add_argument("--table", help="print the markdown table of this JSON file and exit")
    a = ap.parse_args()
    if a.table:
        data = json.loads(Path(a.table).read_text())
        print(f"{data['machine']}; {data['versions']}\n")
        print(table(data["rows"]))
        return
    torch.set_num_threads(int(os.environ.get("IMPARTIAL_BENCH_THREADS", "1")))
    path = Path(a.out) if a.out else None
    data = json.loads(path.read_text()) if path and path.exists() else {"rows": []}
    data.update(versions=versions(), machine=_machine())
    for model in a.models.split(","):
        for B in map(int, a.sizes.split(",")):
            case = make(model, B)
            J64 = reference(case) if a.accuracy else None
            for weighting in a.weightings.split(","):
                row = run_case(case, weighting, a.rounds, a.slow, J64)
                print(json.dumps(row), flush=True)
                data["rows"] = [
                    r for r in data["rows"] if (r["model"], r["B"], r["weighting"]) != (model, B, weighting)
                ] + [row]
                if path:
                    path.write_text(json.dumps(data, indent=1))


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch thread(s)"


if __name__ == "__main__":
    main()
