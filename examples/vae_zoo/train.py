"""One training run of one model with one method (plain ``backward`` or a solver), and its metrics.

The training step is the whole point of the demo:

* vanilla:   ``sum(tasks + also).backward()``
* impartial: ``impartial.backward(tasks, model.encoder_params, solver=solver, also=also)``

where ``tasks`` are the per-modality (per-column) negative log-likelihoods and ``also`` the KL terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

import impartial
from impartial import solvers

from . import data, metrics, multimodal, tabular

#: the methods by name (``make_solver``): ``imtlg``, ``pcgrad``, ``nsgd`` and ``mgda`` are ``solvers.get``'s;
#: ``gradnorm`` is GradNorm(α = 0), ``gradnorm1`` GradNorm(α = 1) on the gradient-norm progress (the paper's
#: code), ``mgda-clamped`` the paper's code's MGDA-UB (see ClampedMGDA), ``gradnorm-pcgrad-shared`` the old
#: behaviour of one GradNorm state for every block (see SharedGradNorm)
METHODS = (
    "vanilla",
    "imtlg",
    "pcgrad",
    "gradnorm-pcgrad",
    "nsgd",
    "gradnorm",
    "gradnorm1-pcgrad",
    "mgda",
    "mgda-clamped",
    "gradnorm-pcgrad-shared",
)
#: what a nested block solves on (``impartial.backward(..., nested=)``)
NESTED = ("resolved", "direct")
MULTIMODAL = tuple(multimodal.MODELS)
TABULAR = tuple(tabular.MODELS)


class ClampedMGDA(solvers.MGDA):
    """MGDA-UB as the paper's reference code runs it: the min-norm weights clamped with ``min(w, 1e-3)``.

    Every task whose min-norm weight exceeds 1e-3 gets 1e-3, so after the norm rescale the direction is the plain
    sum over those tasks, plus the rest at their (smaller) weights (docs/paper.md lists the difference).  Here
    only to run the paper's recommended configuration as it was run; ``solvers.MGDA`` is the method.
    """

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> solvers.Solution:
        sol = super()._solve(G, losses=losses, precision=precision, mixing=mixing)
        w = sol.weights.clamp(max=1e-3)
        return sol._replace(weights=w, mixing=torch.diag_embed(w) if mixing else None)


class SharedGradNorm(solvers.GradNorm):
    """GradNorm with one state for every block: its weights and counter advance once per block per step.

    The behaviour before ``Solver.for_block`` gave each block its own state; here only to measure what that change
    did to the results (examples/RESULTS.md).  ``solvers.GradNorm`` keeps one state per block.
    """

    def for_block(self, key: int) -> solvers.Solver:
        return self


def make_solver(method: str) -> solvers.Solver | None:
    """The solver for a method name (``None`` for vanilla); a fresh instance per run (GradNorm has state)."""
    if method == "vanilla":
        return None
    if method == "gradnorm":
        return solvers.GradNorm(alpha=0.0)
    if method == "gradnorm-pcgrad":
        return solvers.Compose(solvers.GradNorm(alpha=0.0), solvers.PCGrad())
    if method == "gradnorm1-pcgrad":  # α = 1 needs a progress signal: the reference's gradient-norm one
        return solvers.Compose(solvers.GradNorm(alpha=1.0, progress="grad"), solvers.PCGrad())
    if method == "gradnorm-pcgrad-shared":
        return solvers.Compose(SharedGradNorm(alpha=0.0), solvers.PCGrad())
    if method == "mgda-clamped":
        return ClampedMGDA()
    return solvers.get(method)


def label(config: dict) -> str:
    """A run's column in the tables: its method, with ``, direct`` when a solver ran with ``nested="direct"``."""
    direct = config.get("nested", "resolved") == "direct" and config["method"] != "vanilla"
    return f"{config['method']}, direct" if direct else config["method"]


@dataclass
class Config:
    """Everything one run depends on; ``dataset`` is ``digits`` for the multimodal models, else a table."""

    model: str = "mvae"
    method: str = "vanilla"
    seed: int = 0
    epochs: int = 20
    dataset: str = "digits"
    batch: int = 128
    lr: float = 1e-3
    hard_side: int = 16  # the digits trio's hard view has hard_side² pixels
    sigma: float = 0.2  # fixed Gaussian std of the pixel likelihoods
    nested: str = "resolved"  # impartial.backward's nested= (what a block below another solves on)
    extra: dict = field(default_factory=dict)  # model constructor overrides


def step(
    model, batch, opt: torch.optim.Optimizer, solver, names=None, recorder=None, nested: str = "resolved"
) -> list[float]:
    """One optimisation step; returns the task losses (floats, for the training curves).  ``names`` label the
    tasks in the report; ``recorder`` (an :class:`impartial.diagnostics.Recorder`) keeps what each block saw."""
    tasks, also = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    if solver is None:
        sum(tasks + also).backward()
    else:
        losses = tasks if names is None else dict(zip(names, tasks))
        report = impartial.backward(losses, model.encoder_params, solver=solver, also=also, nested=nested)
        if recorder is not None:
            recorder.record(report)
    opt.step()
    return [float(t.detach()) for t in tasks]


def build(cfg: Config):
    """(model, data needed for training and metrics, task names)."""
    if cfg.model in MULTIMODAL:
        train, test = data.digits_trio(seed=cfg.seed, hard_side=cfg.hard_side)
        dims = {m: v[0].numel() for m, v in train.x.items()}
        model = multimodal.MODELS[cfg.model](dims, sigma=cfg.sigma, **cfg.extra)
        return model, (train, test), list(dims)
    t = data.tabular(cfg.dataset, seed=cfg.seed)
    return tabular.MODELS[cfg.model](t, **cfg.extra), t, list(t.names)


def batches(d, n_batch: int, gen: torch.Generator):
    if isinstance(d, tuple):  # multimodal (train, test)
        train = d[0]
        for ix in torch.randperm(len(train), generator=gen).split(n_batch):
            yield {m: v[ix] for m, v in train.x.items()}
    else:
        for ix in torch.randperm(len(d.x), generator=gen).split(n_batch):
            yield d.x[ix], d.observed[ix]


#: records kept per diagnosed run (the recording goes into runs.jsonl: k² numbers per block and record)
DIAGNOSTIC_RECORDS = 60


def recorder(cfg: Config, n_train: int):
    """The diagnostics recorder of a run: solver runs of seed 0 only (one picture per model and method), about
    :data:`DIAGNOSTIC_RECORDS` records spread over the run; None otherwise."""
    if cfg.method == "vanilla" or cfg.seed != 0:
        return None
    from impartial.diagnostics import Recorder

    steps = cfg.epochs * -(-n_train // cfg.batch)
    return Recorder(every=max(1, steps // DIAGNOSTIC_RECORDS))


def run(cfg: Config, tick: Callable[[], None] = lambda: None) -> dict:
    """Train and evaluate; returns the config, the per-epoch mean task losses, the metrics and, for recorded
    runs (:func:`recorder`), the diagnostics recording (``Recorder.state_dict()``)."""
    torch.manual_seed(cfg.seed)
    model, d, names = build(cfg)
    solver = make_solver(cfg.method)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    rec = recorder(cfg, len(d[0]) if isinstance(d, tuple) else len(d.x))
    curves, t0 = [], time.perf_counter()
    for _ in range(cfg.epochs):
        losses = [step(model, b, opt, solver, names, rec, cfg.nested) for b in batches(d, cfg.batch, gen)]
        curves.append(np.mean(losses, axis=0).tolist())
        tick()
    if isinstance(d, tuple):
        m = metrics.multimodal(model, *d, key=(cfg.seed, cfg.hard_side))
    else:
        m = metrics.imputation(model, d)
    out = {"config": asdict(cfg), "names": names, "curves": curves, "metrics": m, "seconds": time.perf_counter() - t0}
    if rec is not None:
        out["diagnostics"] = rec.state_dict()
    return out
