"""Profile one benchmark case with torch.profiler: where does a solver or a step spend its time?

    python benchmarks/profile_case.py solver UPGrad 256 10000      # ours on J [k, d]
    python benchmarks/profile_case.py batched FairGrad 2 16 1024   # ours on J [B, k, d]
    python benchmarks/profile_case.py step vae auto IMTLG          # one training step (see _bench_models)

Prints the top ops by self CPU time and the number of op calls (launch overhead shows as many cheap calls).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["solver", "batched", "step"])
    ap.add_argument("args", nargs="+")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.kind == "step":
        from _bench_models import make, step

        model, variant, *solver = a.args
        fn = step(make(model), variant, solver[0] if solver else None)
    else:
        import impartial.solvers as S

        name, *dims = a.args
        k, d = int(dims[0]), int(float(dims[1]))
        shape = (k, d) if a.kind == "solver" else (int(dims[2]), k, d)
        J = torch.randn(shape)
        losses = torch.rand(shape[:-1]) + 0.5
        solver = S.Compose(S.GradNorm(), S.PCGrad()) if name == "Compose" else getattr(S, name)()
        fn = lambda: solver(J, losses=losses)  # noqa: E731
    fn()
    t0 = time.perf_counter()
    for _ in range(a.reps):
        fn()
    print(
        f"{a.kind} {' '.join(a.args)}: {(time.perf_counter() - t0) / a.reps * 1e3:.3f} ms per call "
        f"({torch.get_num_threads()} thread(s))"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.reps):
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    n_ops = sum(e.count for e in prof.key_averages())
    print(f"op calls per call: {n_ops / a.reps:.0f}")


if __name__ == "__main__":
    main()
