"""The GPU part of the benchmark issue, as one prepared script (run it where a GPU is lent).

For float32 and bfloat16 inputs, d ∈ {1e6, 1e7, 1e8} and k ∈ {2, 8, 32} (cases whose ``J`` exceeds ``--max-gb``
are skipped): every solver of ``impartial.solvers`` and TorchJD's same-named aggregator on ``J [k, d]``,
timed with CUDA events (median of ``--repeats``), next to the floor ``J.mean(-2)``, our Gram pass and our
combine ``w @ J``.  Each of our solvers also runs once under ``torch.cuda.set_sync_debug_mode("error")``: a
host sync inside it raises, and the record says which op.  The achieved bandwidth of Gram + combine (two
reads of ``J``) is reported against the card's nominal HBM bandwidth (by name, when known) and against a
measured device-to-device copy; the issue's target is ≥ 50% of HBM bandwidth at k = 8, d = 1e8.

Results go to ``OUT/gpu_check.json`` (one record per measurement, written after every case, so a run cut
short keeps what it measured) and ``OUT/gpu_check.md`` (tables; the card is named in the header).

    python benchmarks/gpu_check.py --out "$OUT"                 # the whole check (~5 min on an H100)
    python benchmarks/gpu_check.py --out /tmp/g --device cpu --ds 1e4 --ks 2,8 --repeats 2   # a dry run
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _bench_registry import entries, fmt_d, versions
from impartial.solvers._base import combine, gram

#: nominal HBM bandwidth in GB/s, by a substring of the device name (vendor data sheets)
NOMINAL_GBS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100": 1555.0,
    "L40S": 864.0,
}


def nominal_gbs(name: str) -> float | None:
    for key, gbs in NOMINAL_GBS.items():  # most specific names first
        if key in name:
            return gbs
    return None


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of ``f()`` over ``n`` runs after one warm-up (CUDA events on a GPU)."""

    def run(f: Callable[[], object], n: int) -> float:
        f()
        times = []
        for _ in range(n):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                f()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    return run


def sync_free(f: Callable[[], object], device: torch.device) -> str:
    """ "ok", or the first line of the error ``set_sync_debug_mode("error")`` raised ("n/a" off CUDA)."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f()
        return "ok"
    except RuntimeError as e:
        return "SYNC: " + str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def copy_gbs(device: torch.device, t: Callable[[Callable[[], object], int], float]) -> float:
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    sec = t(lambda: y.copy_(x), 5)
    return 2 * x.numel() * x.element_size() / sec / 1e9


def measure(case: dict, device: torch.device, dtype: torch.dtype, solvers: list, repeats: int) -> list[dict]:
    """The passes (mean, Gram, combine) and every solver, ours and TorchJD's, on one random ``J`` of ``case``."""
    t = timer(device)
    J = torch.randn(case["k"], case["d"], device=device, dtype=dtype)
    w = torch.full((case["k"],), 1.0 / case["k"], device=device, dtype=torch.float64)
    floor, tg, tc = t(lambda: J.mean(-2), repeats), t(lambda: gram(J), repeats), t(lambda: combine(w, J), repeats)
    moved = 2 * J.numel() * J.element_size()  # Gram and combine each read J once
    out = [
        case
        | {
            "what": "passes",
            "floor_s": floor,
            "gram_s": tg,
            "combine_s": tc,
            "gram_combine_gbs": moved / (tg + tc) / 1e9,
        }
    ]
    losses = torch.rand(case["k"], device=device) + 0.5  # for the loss-based solvers (GradNorm)
    for e in solvers:
        ours = e.make()
        run = functools.partial(ours, J, losses=losses)
        rec = case | {"what": "solver", "solver": e.name, "sync": sync_free(run, device)}
        rec["ours_s"] = t(run, repeats)
        if e.torchjd is not None:
            try:
                agg = e.make_torchjd(case["k"], ours)
                rec["torchjd_s"] = t(lambda: agg(J), max(1, repeats // 2))  # noqa: B023 -- timed in this iteration
            except Exception as err:  # noqa: BLE001 -- recorded, e.g. no bf16 support
                rec["torchjd_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        out.append(rec)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--ks", default="2,8,32")
    p.add_argument("--ds", default="1e6,1e7,1e8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--max-gb", type=float, default=16.0, help="skip cases whose J is larger")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=480.0, help="start no new case after this many seconds")
    p.add_argument("--solvers", default="", help="comma-separated subset (default: all)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    t = timer(device)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = {"device": name, "nominal_gbs": nominal_gbs(name), "copy_gbs": copy_gbs(device, t), **versions()}
    records: list[dict] = []
    wanted = set(filter(None, a.solvers.split(",")))
    solvers = [e for e in entries() if not e.missing and (not wanted or e.name in wanted)]

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps({"header": header, "records": records}, indent=1))
        (out / "gpu_check.md").write_text(report(header, records))

    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for d in (int(float(x)) for x in a.ds.split(",")):
            for k in (int(x) for x in a.ks.split(",")):
                case = {"dtype": dtype_name, "d": d, "k": k}
                size_gb = k * d * torch.empty((), dtype=dtype).element_size() / 1e9
                if size_gb > a.max_gb or time.perf_counter() - t0 > a.budget_s:
                    records.append(case | {"what": "skipped", "why": "memory" if size_gb > a.max_gb else "budget"})
                    continue
                records.extend(measure(case, device, dtype, solvers, a.repeats))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
    save()
    print(report(header, records))


def report(header: dict, records: list[dict]) -> str:
    lines = [
        f"# GPU check: {header['device']}",
        "",
        f"torch {header['torch']}, TorchJD {header['torchjd']}; nominal HBM {header['nominal_gbs']} GB/s, "
        f"measured copy {header['copy_gbs']:.0f} GB/s. Times: median of CUDA-event timings.",
        "",
    ]
    passes = [r for r in records if r["what"] == "passes"]
    if passes:
        lines += [
            "| dtype | k | d | floor ms | Gram ms | combine ms | Gram+combine GB/s | % nominal | % copy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in passes:
            nom = header["nominal_gbs"]
            pct = f"{100 * r['gram_combine_gbs'] / nom:.0f}%" if nom else "–"
            lines.append(
                f"| {r['dtype']} | {r['k']} | {fmt_d(r['d'])} | {1e3 * r['floor_s']:.3f} | "
                f"{1e3 * r['gram_s']:.3f} | {1e3 * r['combine_s']:.3f} | {r['gram_combine_gbs']:.0f} | {pct} | "
                f"{100 * r['gram_combine_gbs'] / header['copy_gbs']:.0f}% |"
            )
        lines.append("")
    solved = [r for r in records if r["what"] == "solver"]
    if solved:
        floor = {(r["dtype"], r["k"], r["d"]): r["floor_s"] + r["gram_s"] for r in passes}
        lines += [
            "| dtype | k | d | solver | ours ms | ours / (floor + Gram) | TorchJD / ours | sync-free |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in solved:
            tj = f"{r['torchjd_s'] / r['ours_s']:.2f}" if "torchjd_s" in r else r.get("torchjd_error", "–")
            base = floor[(r["dtype"], r["k"], r["d"])]
            lines.append(
                f"| {r['dtype']} | {r['k']} | {fmt_d(r['d'])} | {r['solver']} | {1e3 * r['ours_s']:.3f} | "
                f"{r['ours_s'] / base:.2f} | {tj} | {r['sync']} |"
            )
    skipped = [r for r in records if r["what"] == "skipped"]
    if skipped:
        lines += [
            "",
            "Skipped: " + ", ".join(f"{r['dtype']} k={r['k']} d={fmt_d(r['d'])} ({r['why']})" for r in skipped),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with torch.no_grad():
        main()
