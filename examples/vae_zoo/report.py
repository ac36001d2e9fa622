"""The demo's outputs: a text table (mean ± std over seeds) and a figure (metric bars, training curves).

Both read the list of run records that :func:`vae_zoo.train.run` returns.  Per model, the headline metric
is, for multimodal VAEs, the cross-modal coherence *into* each modality (higher is better; the worst
modality is the minimum), and for tables, each column's imputation error (lower is better; the worst
column is the maximum).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from . import train
from .train import MULTIMODAL

ROWS_MULTI = (
    ("coherence", "coherence into"),
    ("source", "coherence from"),
    ("latent", "latent acc"),
    ("recon", "recon error"),
)


def group(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """``{model: {method label: [records over seeds]}}`` in first-seen order (failed runs left out); the label
    is the method, with ``, direct`` for solver runs with ``nested="direct"`` (:func:`vae_zoo.train.label`)."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if "error" in r:
            continue
        out[r["config"]["model"]][train.label(r["config"])].append(r)
    return out


def headline(model: str) -> tuple[str, bool]:
    """(metric key, higher is better) of a model's per-modality headline metric."""
    return ("coherence", True) if model in MULTIMODAL else ("error", False)


def worst(r: dict) -> float:
    key, higher = headline(r["config"]["model"])
    vals = list(r["metrics"][key].values())
    return min(vals) if higher else max(vals)


def average(r: dict) -> float:
    """The headline metric averaged over the modalities (columns)."""
    key, _ = headline(r["config"]["model"])
    return float(np.mean(list(r["metrics"][key].values())))


def _cell(vals: list[float]) -> str:
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def table(records: list[dict]) -> str:
    """A Markdown table per model: rows are (metric, modality) plus the worst modality, columns are methods."""
    parts = []
    for model, by_method in group(records).items():
        methods = list(by_method)
        first = by_method[methods[0]][0]
        n_seeds = min(len(v) for v in by_method.values())
        key, higher = headline(model)
        rows = ROWS_MULTI if model in MULTIMODAL else (("error", "imputation error"),)
        lines = [
            f"### {model} ({first['config']['dataset']}, {n_seeds} seeds, mean ± std; "
            f"{'higher' if higher else 'lower'} {key} is better)",
            "",
            "| metric | " + " | ".join(methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        for metric, label in rows:
            for name in first["names"]:
                cells = [_cell([r["metrics"][metric][name] for r in by_method[m]]) for m in methods]
                lines.append(f"| {label}: {name} | " + " | ".join(cells) + " |")
        label = f"**worst {'modality' if model in MULTIMODAL else 'column'} ({key})**"
        lines.append(
            f"| {label} | " + " | ".join(f"**{_cell([worst(r) for r in by_method[m]])}**" for m in methods) + " |"
        )
        label = f"mean over {'modalities' if model in MULTIMODAL else 'columns'} ({key})"
        lines.append(f"| {label} | " + " | ".join(_cell([average(r) for r in by_method[m]]) for m in methods) + " |")
        mins = [_cell([r["seconds"] for r in by_method[m]]) for m in methods]
        lines.append("| train seconds | " + " | ".join(mins) + " |")
        parts.append("\n".join(lines))
    failed = [
        f"- {r['config']['model']} / {train.label(r['config'])} / seed {r['config']['seed']}: {r['error']}"
        for r in records
        if "error" in r
    ]
    if failed:
        parts.append("**Failed runs** (left out above):\n" + "\n".join(failed))
    return "\n\n".join(parts) + "\n"


def nested_table(records: list[dict]) -> str:
    """Per model, each solver method that ran under both ``nested`` conventions: the worst modality (column) under
    each, their difference paired by seed (same data, same initialisation), in how many seeds ``"direct"`` was
    better, the paired difference of the mean over modalities (columns), and the modality (column) whose headline
    metric moved most; ``""`` when no method ran under both."""
    parts = []
    for model, by_label in group(records).items():
        key, higher = headline(model)
        pairs = [(m, by_label[m], by_label[f"{m}, direct"]) for m in by_label if f"{m}, direct" in by_label]
        if not pairs:
            continue
        lines = [
            f"### {model}: nested='direct' vs 'resolved' (worst {key}, {'higher' if higher else 'lower'} is better)",
            "",
            "| method | resolved | direct | direct − resolved (paired) | direct better | mean over all, paired "
            "| largest move (mean) |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, resolved, direct in pairs:
            a = {r["config"]["seed"]: r for r in resolved}
            b = {r["config"]["seed"]: r for r in direct}
            seeds = sorted(set(a) & set(b))
            diff = [worst(b[s]) - worst(a[s]) for s in seeds]
            better = sum((d > 0) == higher and d != 0 for d in diff)
            names = a[seeds[0]]["names"]
            moves = {n: np.mean([b[s]["metrics"][key][n] - a[s]["metrics"][key][n] for s in seeds]) for n in names}
            top = max(moves, key=lambda n: abs(moves[n]))
            lines.append(
                f"| {method} | {_cell([worst(a[s]) for s in seeds])} | {_cell([worst(b[s]) for s in seeds])} | "
                f"{_cell(diff)} | {better}/{len(seeds)} | {_cell([average(b[s]) - average(a[s]) for s in seeds])} | "
                f"{top} {moves[top]:+.3f} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def figure(records: list[dict], path: str) -> None:
    """Per model: bars of the headline metric per modality and method (± std over seeds), and each task's
    training loss per epoch (mean over seeds), rescaled per task to [0, 1] so tasks of any scale share an axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    groups = group(records)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    styles = ["--", "-", "-.", ":"]
    for row, (model, by_method) in enumerate(groups.items()):
        key, higher = headline(model)
        names = by_method[next(iter(by_method))][0]["names"]
        ax = axes[row, 0]
        width = 0.8 / len(by_method)
        for i, (method, rs) in enumerate(by_method.items()):
            vals = np.array([[r["metrics"][key][n] for n in names] for r in rs])
            ax.bar(
                np.arange(len(names)) + (i - (len(by_method) - 1) / 2) * width,
                vals.mean(0),
                width,
                yerr=vals.std(0),
                capsize=2,
                label=method,
            )
        ax.set_xticks(np.arange(len(names)), [n[:10] for n in names], rotation=0 if len(names) < 5 else 60, fontsize=8)
        ax.set_ylabel(f"{key} ({'↑' if higher else '↓'})")
        ax.set_title(f"{model}: {key} per {'modality' if model in MULTIMODAL else 'column'}")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        curves = {m: np.mean([r["curves"] for r in rs], axis=0) for m, rs in by_method.items()}  # [epochs, k]
        lo = np.min([c.min(0) for c in curves.values()], axis=0)
        hi = np.max([c.max(0) for c in curves.values()], axis=0)
        colors = plt.cm.tab20(np.linspace(0, 1, len(names))) if len(names) > 10 else plt.cm.tab10.colors
        for i, c in enumerate(curves.values()):
            scaled = (c - lo) / np.maximum(hi - lo, 1e-12)
            for j, name in enumerate(names):
                ax.plot(
                    np.arange(1, len(c) + 1),
                    scaled[:, j],
                    styles[i % len(styles)],
                    color=colors[j],
                    label=name if i == 0 else None,
                    lw=1.2,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("task loss, rescaled per task")
        ax.set_title(
            f"{model}: training loss per task ({', '.join(f'{m} {s}' for m, s in zip(curves, styles))})", fontsize=9
        )
        ax.legend(fontsize=6, ncol=2 if len(names) > 5 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnostics(records: list[dict], out) -> list:
    """Per model, the first diagnosed run's (seed 0, first solver method) picture ``<out>/conflicts_<model>.png``
    and every diagnosed run's summary in ``<out>/conflicts.md`` (printed too); returns the paths written."""
    from pathlib import Path

    from impartial.diagnostics import Recorder

    out = Path(out)
    done, text, wrote = set(), ["# What the solvers saw at each block (seed 0)", ""], []
    for r in records:
        if "diagnostics" not in r:
            continue
        c = r["config"]
        rec = Recorder()
        rec.load_state_dict(r["diagnostics"])
        text += [f"## {c['model']}, {train.label(c)}", "", str(rec.summary()), ""]
        if c["model"] not in done:
            done.add(c["model"])
            wrote.append(rec.plot(out / f"conflicts_{c['model']}.png"))
    if not wrote:
        return []
    (out / "conflicts.md").write_text("\n".join(text))
    print("\n".join(text))
    return [*wrote, out / "conflicts.md"]
