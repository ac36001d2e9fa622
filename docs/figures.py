"""The documentation's pictures, drawn by the library itself (run by ``docs/conf.py`` at every build).

``python docs/figures.py [OUT]`` writes into ``OUT`` (default ``docs/_generated``):

- ``quickstart.txt`` and ``graph.png``: what ``docs/examples/quickstart.py`` prints and draws (three decoders
  on one latent ``z``, its block marked);
- ``nested.png``: an HI-VAE-like model, ``z ~ q(z | x, s)``, whose block at ``s`` lies below the one at ``z``,
  annotated with what each ``nested=`` convention solves at ``s``;
- ``diagnostics.png`` and ``diagnostics.txt``: a recording of a short training run with
  :class:`impartial.diagnostics.Recorder`, and its summary.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import torch
from torch import nn

import impartial
from impartial import solvers
from impartial.diagnostics import Recorder


def quickstart(out: Path) -> Path:
    """Run the quick start's script in ``out``: its printed report and its drawing land there."""
    script = Path(__file__).resolve().parent / "examples" / "quickstart.py"
    here, buf = os.getcwd(), io.StringIO()
    os.chdir(out)
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        os.chdir(here)
    (out / "quickstart.txt").write_text(buf.getvalue())
    return out / "graph.png"


class NestedEncoder(nn.Module):
    """``s = softmax(to_s(h))`` and ``z = to_z([h, s])``: ``z`` is computed from ``s`` (HI-VAE's ``q(z | x, s)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.to_s, self.to_z = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8 + 3, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        s = torch.softmax(self.to_s(h), -1)
        return s, self.to_z(torch.cat([h, s], -1))


def nested_example() -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Two heads, each reading ``z`` and ``s``."""
    torch.manual_seed(0)
    enc, heads = NestedEncoder(), nn.ModuleList(nn.Linear(4 + 3, 2) for _ in range(2))
    s, z = enc(torch.randn(5, 6))
    return {f"x{i}": head(torch.cat([z, s], -1)).pow(2).mean() for i, head in enumerate(heads)}, enc


_NESTED_NOTE = r"""block 0 = $z$ (Addmm): both heads read $z$; its task gradients
    $J_z[i] = \partial L_i / \partial z$
are solved into the direction $d_z$, and into resolved rows $R_z[i]$
(each task's part: $\Sigma_i R_z[i] = d_z$).

block 1 = $s$ (Softmax), below block 0: the heads read $s$ directly,
and through $z$ (because $z$ is computed from $s$).

nested="resolved": block 1 solves each task's whole gradient at $s$,
    $J_s[i] = \partial L_i/\partial s|_{\rm direct} + (\partial z/\partial s)^\top R_z[i]$,
and $d_s$ = solve($J_s$) is what leaves $s$.

nested="direct" (the paper's reference hooks): block 1 solves only
what reaches $s$ on paths through no block,
    $J_s[i] = \partial L_i/\partial s|_{\rm direct}$,
and what block 0 sends passes unchanged:
    $(\partial z/\partial s)^\top d_z$ + solve($J_s$) leaves $s$.

Top-level blocks ($z$) are the same either way."""


def nested(out: Path) -> Path:
    """The nested graph (drawn by :func:`impartial.graph.draw`) beside what each convention solves."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    losses, enc = nested_example()
    graph = impartial.graph.draw(losses, enc, out / "nested_graph.png", engine="matplotlib")
    fig = Figure(figsize=(11, 15), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1.5, 1])
    top.imshow(imread(graph))
    top.set_axis_off()
    top.set_title("impartial.graph.draw(losses, encoder): the blocks in red", fontsize=14)
    bottom.set_axis_off()
    bottom.text(0.02, 1.0, _NESTED_NOTE, va="top", ha="left", fontsize=14, linespacing=1.45, transform=bottom.transAxes)
    path = out / "nested.png"
    fig.savefig(path, dpi=100)
    return path


def diagnostics(out: Path, steps: int = 60) -> Path:
    """A short run with tasks of very different scales, recorded and summarised."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 6))
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))
    opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=3e-3)
    W = torch.randn(3, 10)
    rec = Recorder()
    for _ in range(steps):
        x = torch.randn(64, 10)
        y = x @ W.T
        z = enc(x)
        scale = {"small": 1.0, "medium": 10.0, "large": 100.0}
        losses = {
            n: s * (h(z).squeeze(-1) - y[:, i]).pow(2).mean() for i, ((n, s), h) in enumerate(zip(scale.items(), heads))
        }
        opt.zero_grad()
        rec.record(impartial.backward(losses, enc, solver=solvers.IMTLG()))
        opt.step()
    (out / "diagnostics.txt").write_text(str(rec.summary()) + "\n")
    return rec.plot(out / "diagnostics.png")


GENERATED = Path(__file__).resolve().parent / "_generated"


def main(out: Path | str = GENERATED) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only fight over the cores
    try:
        return [quickstart(out), nested(out), diagnostics(out)]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    print("\n".join(map(str, main(*sys.argv[1:]))))
