"""Our solvers now against ours at an earlier commit, on the batched table's cases, in one process.

The package at ``--rev`` is extracted with ``git archive`` into a temporary folder as ``impartial_base`` (its imports
are relative, so it imports side by side with the installed ``impartial``), and each case times both solvers on the
same ``J [B, k, d]`` (float32, one thread), interleaved, min over ``--reps`` calls::

    python benchmarks/ab_batched.py --rev 910acb0 --bs 1,64 --reps 200
    python benchmarks/ab_batched.py --table out.json

Prints, per solver and case, base time / current time (above 1: the current code is faster).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import impartial.solvers as S

ROOT = Path(__file__).resolve().parent.parent
KDS = ((2, 16), (4, 64))
#: the batched table's solvers that have a TorchJD side (the others are ours only and not in that table)
NAMES = ("UPGrad", "DualProj", "MGDA", "CAGrad", "IMTLG", "PCGrad", "GradVac", "AlignedMTL", "ConFIG", "NSGD")


def _base(rev: str, into: Path) -> object:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "impartial"], check=True, capture_output=True)
    tar = into / "base.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    (into / "impartial").rename(into / "impartial_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("impartial_base.solvers")


def _interleaved(new, old, J: torch.Tensor, reps: int) -> tuple[float, float]:
    """The minimum time in µs of ``new(J)`` and of ``old(J)``, called alternately ``reps`` times each."""
    tn, to = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        new(J)
        t1 = time.perf_counter()
        old(J)
        t2 = time.perf_counter()
        tn.append(t1 - t0)
        to.append(t2 - t1)
    return 1e6 * min(tn), 1e6 * min(to)


def run(rev: str, bs: list[int], reps: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        B_ = _base(rev, Path(tmp))
        for name in NAMES:
            if not hasattr(B_, name):
                continue
            for B in bs:
                for k, d in KDS:
                    J = torch.randn((B, k, d), generator=torch.Generator().manual_seed(0))
                    new, old = getattr(S, name)(), getattr(B_, name)()
                    a, b = new(J), old(J)  # warm-up, and the answers agree
                    same = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                    ours, base = _interleaved(new, old, J, reps)
                    row = {"solver": name, "B": B, "k": k, "d": d, "ours_us": ours, "base_us": base}
                    row["base_over_ours"] = row["base_us"] / row["ours_us"]
                    row["max_rel_diff"] = same
                    rows.append(row)
                    print(
                        f"{name:10s} B={B:<4d} k={k} d={d:<3d} base/ours {row['base_over_ours']:.2f} "
                        f"(ours {row['ours_us']:.0f} µs, base {row['base_us']:.0f} µs, rel diff {same:.1e})",
                        flush=True,
                    )
    return rows


def table(rows: list[dict]) -> str:
    cases = sorted({(r["B"], r["k"], r["d"]) for r in rows})
    head = "| solver | " + " | ".join(f"B={B} k={k} d={d}" for B, k, d in cases) + " |"
    out = [head, "|---" * (len(cases) + 1) + "|"]
    for name in dict.fromkeys(r["solver"] for r in rows):
        cells = {(r["B"], r["k"], r["d"]): r["base_over_ours"] for r in rows if r["solver"] == name}
        out.append(f"| {name} | " + " | ".join(f"{cells[c]:.2f}×" if c in cells else "—" for c in cases) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="910acb0", help="the commit to compare against")
    p.add_argument("--bs", default="1,64")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, help="print the markdown table of a saved run and stop")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(a.table.read_text())["rows"]))
        return
    rows = run(a.rev, [int(b) for b in a.bs.split(",")], a.reps)
    if a.out:
        a.out.write_text(json.dumps({"rev": a.rev, "torch": torch.__version__, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
