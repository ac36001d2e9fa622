"""Build BENCHMARKS.md's tables from pytest-benchmark JSON files (never typed by hand).

    python benchmarks/make_tables.py benchmarks/results/cpu-quick-*.json [-o BENCHMARKS.md] [--strip]

The text between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` in the output file is replaced (the
rest of the file is prose kept as is); with ``-o -`` the tables go to stdout.  Every ratio compares two
timings of the same JSON file, i.e. of one process.  The statistic is the minimum over rounds (``--stat``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
GRAM_TARGET, SPEEDUP_MEDIAN, SPEEDUP_LARGE_K, UPGRAD_MS = 3.0, 3.0, 10.0, 50.0


def fmt_d(d: int) -> str:
    e = len(str(d)) - 1
    return f"1e{e}" if d == 10**e else str(d)


def fx(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def ms(t: float | None) -> str:
    if t is None:
        return "–"
    t *= 1e3
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def machine(run: dict[str, Any]) -> str:
    m = run.get("machine_info", {})
    cpu = m.get("cpu", {})
    first = next((b["extra_info"] for b in run["benchmarks"]), {})
    return (
        f"{cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} logical CPUs, "
        f"{first.get('threads', '?')} torch thread(s); Python {m.get('python_version', '?')}, "
        f"torch {first.get('torch', '?')}, TorchJD {first.get('torchjd', '?')}; run {run.get('datetime', '?')[:16]}"
    )


def solver_tables(bs: list[dict[str, Any]], stat: str) -> list[str]:
    t: dict[tuple[str, str, int, int], float] = {}
    gram_space: dict[str, bool] = {}
    for b in bs:
        e = b["extra_info"]
        t[(e["solver"], e["side"], e["k"], e["d"])] = b["stats"][stat]
        if e["side"] == "ours":
            gram_space[e["solver"]] = e.get("gram_space", False)
    sizes = sorted({(k, d) for (_, _, k, d) in t}, key=lambda kd: (kd[1], kd[0]))
    sizes = [kd for kd in sizes if ("floor", "floor", *kd) in t and ("gram", "gram", *kd) in t]
    solvers = list(dict.fromkeys(s for (s, side, _, _) in t if side in ("ours", "torchjd")))
    cols = [f"k={k} d={fmt_d(d)}" for k, d in sizes]
    wide = len(sizes) > 8  # the full grid: tables folded, the targets summary shown
    out = (
        [f"<details><summary>Full grid: {len(sizes)} sizes (click to unfold the tables)</summary>", ""] if wide else []
    )
    out += [
        "### Solvers: ours / (floor + one `J @ J.T`)",
        "",
        f"Target for Gram-space solvers: ≤ {GRAM_TARGET:g}× everywhere (✗ marks a miss). floor = `J.mean(-2)`.",
        "",
    ]
    rows, misses = [], []
    for s in solvers:
        r = [s + ("" if gram_space.get(s, True) else " (not Gram)")]
        for k, d in sizes:
            o = t.get((s, "ours", k, d))
            base = t[("floor", "floor", k, d)] + t[("gram", "gram", k, d)]
            if o is None:
                r.append("–")
                continue
            ratio = o / base
            bad = gram_space.get(s, False) and ratio > GRAM_TARGET
            if bad:
                misses.append((s, k, d, ratio))
            r.append(fx(ratio) + (" ✗" if bad else ""))
        if any(c != "–" for c in r[1:]):
            rows.append(r)
    out += table(["solver", *cols], rows)
    out += ["### Solvers: ours / floor", ""]
    rows = [
        [s]
        + [fx(t[(s, "ours", k, d)] / t[("floor", "floor", k, d)]) if (s, "ours", k, d) in t else "–" for k, d in sizes]
        for s in solvers
        if any((s, "ours", *kd) in t for kd in sizes)
    ]
    out += table(["solver", *cols], rows)
    out += ["### Solvers: TorchJD / ours (speed-up; > 1 means we are faster)", ""]
    rows, all_sp, large_sp, per_solver = [], [], [], {}
    for s in solvers:
        r, sp_s = [s], []
        for k, d in sizes:
            o, j = t.get((s, "ours", k, d)), t.get((s, "torchjd", k, d))
            if o is None or j is None:
                r.append("–" if j is None else f"({ms(j)} ms)")
                continue
            sp = j / o
            sp_s.append(sp)
            all_sp.append(sp)
            if k >= 32:
                large_sp.append(sp)
            r.append(fx(sp))
        if sp_s:
            per_solver[s] = statistics.median(sp_s)
        if any(c != "–" for c in r[1:]):
            rows.append(r + [fx(per_solver.get(s))])
    out += table(["solver", *cols, "median"], rows)
    if any("(" in c for r in rows for c in r):
        out += ["Cells in parentheses: TorchJD's time where ours did not run (not landed, or timed out).", ""]
    out += ["### Absolute times (ms)", ""]
    abs_rows = [
        ["floor `J.mean(-2)`"] + [ms(t[("floor", "floor", *kd)]) for kd in sizes],
        ["`J @ J.T`"] + [ms(t[("gram", "gram", *kd)]) for kd in sizes],
    ]
    abs_rows += [
        [f"{s} (ours)"] + [ms(t.get((s, "ours", *kd))) for kd in sizes]
        for s in solvers
        if any((s, "ours", *kd) in t for kd in sizes)
    ]
    out += table(["", *cols], abs_rows)
    if wide:
        out += ["</details>", ""]
    out += ["### Per-solver summary", ""]
    srows = []
    for s in solvers:
        b = [
            t[(s, "ours", *kd)] / (t[("floor", "floor", *kd)] + t[("gram", "gram", *kd)])
            for kd in sizes
            if (s, "ours", *kd) in t
        ]
        sp = [
            t[(s, "torchjd", *kd)] / t[(s, "ours", *kd)]
            for kd in sizes
            if (s, "ours", *kd) in t and (s, "torchjd", *kd) in t
        ]
        sp32 = [
            t[(s, "torchjd", k, d)] / t[(s, "ours", k, d)]
            for k, d in sizes
            if k >= 32 and (s, "ours", k, d) in t and (s, "torchjd", k, d) in t
        ]
        if not b:
            continue
        within = sum(x <= GRAM_TARGET for x in b)
        srows.append(
            [
                s,
                "yes" if gram_space.get(s) else "no",
                f"{within}/{len(b)}",
                fx(statistics.median(b)),
                fx(max(b)),
                fx(statistics.median(sp)) if sp else "–",
                fx(statistics.median(sp32)) if sp32 else "–",
            ]
        )
    out += table(
        [
            "solver",
            "Gram-space",
            "sizes ≤ 3× budget",
            "median ours/(floor+Gram)",
            "worst",
            "median TorchJD/ours",
            "… at k ≥ 32",
        ],
        srows,
    )
    # targets
    out += ["### Solver targets", ""]
    gram_solvers = [s for s in solvers if gram_space.get(s) and any((s, "ours", *kd) in t for kd in sizes)]
    worst = max(misses, key=lambda m: m[3]) if misses else None
    out.append(
        f"- Gram-space ≤ {GRAM_TARGET:g}× (floor + Gram), {len(gram_solvers)} solvers × {len(sizes)} sizes: "
        + (
            "**met**"
            if not misses
            else f"**not met** at {len(misses)} points, worst {worst[0]} "
            f"k={worst[1]} d={fmt_d(worst[2])}: {worst[3]:.2f}×; misses: " + ", ".join(sorted({m[0] for m in misses}))
        )
    )
    if all_sp:
        med = statistics.median(all_sp)
        out.append(
            f"- Median speed-up over TorchJD ≥ {SPEEDUP_MEDIAN:g}× ({len(all_sp)} points): "
            f"{med:.1f}× — **{'met' if med >= SPEEDUP_MEDIAN else 'not met'}**"
        )
    if large_sp:
        med = statistics.median(large_sp)
        out.append(
            f"- Median speed-up at k ≥ 32 ≥ {SPEEDUP_LARGE_K:g}× ({len(large_sp)} points): "
            f"{med:.1f}× — **{'met' if med >= SPEEDUP_LARGE_K else 'not met'}**"
        )
    slower = sorted((v, s) for s, v in per_solver.items() if v < 1)
    if slower:
        out.append("- Solvers slower than TorchJD (median): " + ", ".join(f"{s} {v:.2f}×" for v, s in slower))
    up = t.get(("UPGrad", "ours", 256, 10**4))
    if up is None and ("floor", "floor", 256, 10**4) in t and any(s == "UPGrad" for s in solvers):
        out.append(
            f"- UPGrad at k=256, d=1e4 < {UPGRAD_MS:g} ms: no time in this run (the case was skipped: "
            "TIMEOUT, one call > IMPARTIAL_BENCH_MAX_S) — **not met**"
            + (
                f" (TorchJD: {t[('UPGrad', 'torchjd', 256, 10**4)] * 1e3:.0f} ms)"
                if ("UPGrad", "torchjd", 256, 10**4) in t
                else ""
            )
        )
    if up is not None:
        out.append(
            f"- UPGrad at k=256, d=1e4 < {UPGRAD_MS:g} ms: {up * 1e3:.1f} ms — "
            f"**{'met' if up * 1e3 < UPGRAD_MS else 'not met'}**"
            + (
                f" (TorchJD: {t[('UPGrad', 'torchjd', 256, 10**4)] * 1e3:.0f} ms)"
                if ("UPGrad", "torchjd", 256, 10**4) in t
                else ""
            )
        )
    return out + [""]


def batched_tables(bs: list[dict[str, Any]], stat: str) -> list[str]:
    t = {}
    for b in bs:
        e = b["extra_info"]
        t[(e["solver"], e["side"], e["B"], e["k"], e["d"])] = b["stats"][stat]
    sizes = sorted({key[2:] for key in t}, key=lambda s: (s[1], s[2], s[0]))
    solvers = list(dict.fromkeys(key[0] for key in t))
    cols = [f"B={B} k={k} d={d}" for B, k, d in sizes]
    out = ["### Batched: TorchJD loop over B / ours in one call", ""]
    rows = []
    for s in solvers:
        r = [s]
        for sz in sizes:
            o, j = t.get((s, "ours", *sz)), t.get((s, "torchjd", *sz))
            r.append(fx(j / o) if o and j else (f"({ms(j)} ms)" if j else "–"))
        if any(c != "–" for c in r[1:]):
            rows.append(r)
    out += table(["solver", *cols], rows)
    out += [
        "A dash: no TorchJD counterpart, or a case skipped (TIMEOUT: one call > IMPARTIAL_BENCH_MAX_S).",
        "",
        "### Batched: ours, µs per problem",
        "",
    ]
    rows = [
        [s] + [fx(t[(s, "ours", *sz)] / sz[0] * 1e6) if (s, "ours", *sz) in t else "–" for sz in sizes]
        for s in solvers
        if any((s, "ours", *sz) in t for sz in sizes)
    ]
    return out + table(["solver", *cols], rows)


def step_tables(bs: list[dict[str, Any]], stat: str) -> list[str]:
    by_model: dict[str, dict[tuple[str, str], tuple[float, float | None]]] = defaultdict(dict)
    n_shared = {}
    for b in bs:
        e = b["extra_info"]
        by_model[e["model"]][(e["variant"], e["solver"])] = (b["stats"][stat], e.get("peak_mb"))
        n_shared[e["model"]] = (e.get("n_shared"), e.get("k"))
    out = ["### End-to-end step (zero grads + forward + backward)", ""]
    rows = []
    for model, v in by_model.items():
        plain = v.get(("plain", ""), (None, None))[0]
        for (variant, solver), (tm, peak) in sorted(v.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            tj = v.get(("torchjd", solver), (None, None))
            rows.append(
                [
                    model,
                    variant,
                    solver or "–",
                    ms(tm),
                    fx(tm / plain) if plain else "–",
                    fx(tj[0] / tm) if tj[0] and variant != "torchjd" else "–",
                    fx(peak, 1) if peak is not None else "–",
                    fx(tj[1], 1) if tj[1] is not None and variant != "torchjd" else "–",
                ]
            )
    out += table(["model", "variant", "solver", "ms", "× plain", "TorchJD / this", "peak MB", "TorchJD peak MB"], rows)
    out += [
        "Models: " + ", ".join(f"{m} ({n:,} shared params, k={k})" for m, (n, k) in n_shared.items() if n),
        "",
        "### Step targets",
        "",
    ]
    vae = by_model.get("vae", {})
    for solver in sorted({s for (_, s) in vae if s}):
        a, p = vae.get(("auto", solver)), vae.get(("plain", ""))
        if a and p:
            r = a[0] / p[0]
            out.append(
                f'- VAE, `block="auto"` ({solver}) ≤ 1.2× plain backward: {r:.2f}× — '
                f"**{'met' if r <= 1.2 else 'not met'}**"
            )
    mlp = by_model.get("mlp-k8", {})
    for solver in sorted({s for (_, s) in mlp if s}):
        p, j = mlp.get(("params", solver)), mlp.get(("torchjd", solver))
        if p and j:
            sp = j[0] / p[0]
            mem_ok = p[1] is not None and j[1] is not None and p[1] <= j[1]
            out.append(
                f'- MLP k=8, `block="params"` ({solver}) ≥ 2× faster than TorchJD: {sp:.2f}× — '
                f"**{'met' if sp >= 2 else 'not met'}**; peak memory {fx(p[1], 1)} MB vs TorchJD "
                f"{fx(j[1], 1)} MB — **{'met' if mem_ok else 'not met'}**"
            )
    return out + [""]


def render(runs: list[dict[str, Any]], stat: str) -> str:
    out = []
    for run in runs:
        kinds = defaultdict(list)
        for b in run["benchmarks"]:
            kinds[b["extra_info"].get("kind", "?")].append(b)
        out += [f"#### Run: {machine(run)}", "", f"Statistic: {stat} over rounds; ratios within this run only.", ""]
        if kinds["solver"]:
            out += solver_tables(kinds["solver"], stat)
        if kinds["batched"]:
            out += batched_tables(kinds["batched"], stat)
        if kinds["step"]:
            out += step_tables(kinds["step"], stat)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("-o", "--output", default="BENCHMARKS.md", help="markdown file to update, or - for stdout")
    ap.add_argument("--stat", default="min", choices=["min", "median", "mean"])
    ap.add_argument(
        "--strip",
        action="store_true",
        help="rewrite the JSON files without the per-round timings (stats.data), to keep them small",
    )
    args = ap.parse_args(argv)
    if args.strip:
        for p in args.json:
            run = json.loads(p.read_text())
            for b in run["benchmarks"]:
                b["stats"].pop("data", None)
            p.write_text(json.dumps(run, separators=(",", ":")))
    text = render(load(args.json), args.stat)
    if args.output == "-":
        sys.stdout.write(text)
        return
    path = Path(args.output)
    doc = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    sources = ", ".join(f"`{p}`" for p in args.json)
    path.write_text(
        f"{head}{BEGIN}\n<!-- generated by benchmarks/make_tables.py from {sources}; do not edit -->\n\n"
        f"{text}\n{END}{tail}"
    )


if __name__ == "__main__":
    main()
