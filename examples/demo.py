"""Modality collapse, and its cure, in one command.

Trains multimodal VAEs on sklearn's digits (image, the digit's word, a harder view) and heterogeneous VAEs
on sklearn's wine table, once with plain ``sum(losses).backward()`` ("vanilla") and once per solver with
``impartial.backward``, over several seeds; prints a table of per-modality metrics (mean ± std over
seeds) and writes ``<out>/demo.png``, ``<out>/table.md`` and ``<out>/runs.jsonl`` (every run's config,
curves and metrics, written as each run finishes; ``--replot`` rebuilds the table and figure from it).  What the
solver saw at each block over training (seed 0; :mod:`impartial.diagnostics`) is drawn in
``<out>/conflicts_<model>.png`` and summarised, with a suggestion, in ``<out>/conflicts.md``.

    python examples/demo.py                 # the default job (a few minutes on 2 cores)
    python examples/demo.py --quick         # a smoke run (under a minute)
    python examples/demo.py --models mvae,mmvae,mopoe,hivae --methods vanilla,imtlg,pcgrad,gradnorm-pcgrad \
        --seeds 5 --epochs-table 60 --out out/results          # examples/RESULTS.md (the others are there too)

``--nested resolved,direct`` runs every solver method under both of ``impartial.backward``'s conventions for
nested blocks (the tables label the second ``<method>, direct``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: vae_zoo sits beside this file

from tqdm import tqdm  # noqa: E402

from vae_zoo import report  # noqa: E402
from vae_zoo.train import METHODS, MULTIMODAL, NESTED, TABULAR, Config, label  # noqa: E402


def progress(total: int) -> tqdm:
    """Epochs done over epochs planned: a live bar on a terminal.  Elsewhere (CI logs, files) no bar, whose
    ``\\r`` frames would pile up in the log: :func:`finished` prints one plain line per finished run instead."""
    return tqdm(total=total, unit="epoch", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def finished(bar: tqdm, r: dict, done: int, runs: int) -> None:
    """Say that run ``r`` finished (above the live bar, or as a plain line)."""
    c = r["config"]
    how = f"error: {r['error']}" if "error" in r else f"{r['seconds']:.0f} s"
    line = f"[{done}/{runs} runs] {c['model']} {label(c)} seed {c['seed']} ({how})"
    if bar.disable:
        print(line, file=sys.stderr, flush=True)
    else:
        bar.write(line, file=sys.stderr)


def _run(cfg: Config, tick) -> dict:
    import torch

    from vae_zoo.train import run

    torch.set_num_threads(1)  # tiny models: one thread per run, runs in parallel across processes
    try:
        return run(cfg, tick=tick)
    except Exception as e:  # one failing solver must not cost the other runs; the table lists it
        return {"config": vars(cfg), "error": f"{type(e).__name__}: {e}"[:300]}


def _worker(cfg: Config, ticks) -> dict:
    return _run(cfg, lambda: ticks.put(1))


def configs(args: argparse.Namespace) -> list[Config]:
    out = []
    for seed in range(args.seeds):  # seed-major: an interrupted sweep still covers every model and method
        for model in args.models:
            multi = model in MULTIMODAL
            epochs = args.epochs or (args.epochs_digits if multi else args.epochs_table)
            for method in args.methods:
                for nested in ["resolved"] if method == "vanilla" else args.nested:  # vanilla has no blocks
                    out.append(
                        Config(
                            model=model,
                            method=method,
                            seed=seed,
                            epochs=epochs,
                            dataset="digits" if multi else args.dataset,
                            batch=128 if multi else 32,
                            hard_side=args.hard_side,
                            sigma=args.sigma,
                            nested=nested,
                        )
                    )
    return out


def run_all(cfgs: list[Config], jobs: int, log: Path) -> list[dict]:
    """Every run, in order; each finished record is also appended to ``log`` (JSON lines) at once."""
    log.write_text("")
    with progress(sum(c.epochs for c in cfgs)) as bar:
        done = []

        def save(r: dict) -> None:
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done.append(r)
            finished(bar, r, len(done), len(cfgs))

        if jobs <= 1:
            out = []
            for c in cfgs:
                out.append(_run(c, bar.update))
                save(out[-1])
            return out
        ctx = mp.get_context("spawn")  # fork after torch import can deadlock its thread pools
        with ctx.Manager() as manager, ctx.Pool(jobs) as pool:
            ticks = manager.Queue()
            pending = [pool.apply_async(_worker, (c, ticks), callback=save) for c in cfgs]
            while not all(p.ready() for p in pending):
                try:
                    bar.update(ticks.get(timeout=1.0))
                except Exception:  # queue.Empty: a failed run never ticks its remaining epochs
                    pass
            return [p.get() for p in pending]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 2 models, few epochs")
    p.add_argument("--models", default="mmvae,hivae", help=f"comma-separated, from {', '.join(MULTIMODAL + TABULAR)}")
    p.add_argument("--methods", default="vanilla,imtlg", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument(
        "--nested",
        default="resolved",
        help=f"comma-separated, from {', '.join(NESTED)}: impartial.backward's nested= (each solver "
        "method runs once per value)",
    )
    p.add_argument("--dataset", default="wine", choices=["wine", "breast_cancer"], help="table of the tabular models")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=0, help="epochs for every model (0: the per-data defaults)")
    p.add_argument("--epochs-digits", type=int, default=20)
    p.add_argument("--epochs-table", type=int, default=60)
    p.add_argument("--hard-side", type=int, default=16, help="the hard view has hard_side² pixels")
    p.add_argument("--sigma", type=float, default=0.2, help="fixed std of the pixel likelihoods")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--replot", metavar="JSONL", help="skip training: table and figure from a runs.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs_digits, args.epochs_table = "mmvae,vae", 2, 2, 3
    args.models = args.models.split(",")
    args.methods = args.methods.split(",")
    args.nested = args.nested.split(",")
    for n in args.nested:
        if n not in NESTED:
            p.error(f"unknown nested {n!r}")
    for m in args.models:
        if m not in MULTIMODAL + TABULAR:
            p.error(f"unknown model {m!r}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.replot:
        records = [json.loads(line) for line in Path(args.replot).read_text().splitlines() if line.strip()]
    else:
        records = run_all(configs(args), args.jobs, out / "runs.jsonl")
    nested = report.nested_table(records)  # only when a method ran under both conventions
    text = report.table(records) + (f"\n{nested}" if nested else "")
    print(text)
    (out / "table.md").write_text(text)
    report.figure(records, str(out / "demo.png"))
    diagnosed = report.diagnostics(records, out)
    wrote = [out / "demo.png", out / "table.md", *diagnosed] + ([] if args.replot else [out / "runs.jsonl"])
    print(f"wrote {', '.join(map(str, wrote))} in {time.perf_counter() - t0:.0f} s")
    return records


if __name__ == "__main__":
    failed = [r for r in main() if "error" in r]
    if failed:  # listed in the table above; a failed run must not pass for a finished demo
        sys.exit(f"{len(failed)} run(s) failed (see the list above)")
