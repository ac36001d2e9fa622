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

from . import data, metrics, multimodal, tabular

METHODS = ("vanilla", "imtlg", "pcgrad", "gradnorm-pcgrad")
MULTIMODAL = tuple(multimodal.MODELS)
TABULAR = tuple(tabular.MODELS)


def make_solver(method: str):
    """The solver for a method name (``None`` for vanilla); a fresh instance per run (GradNorm has state)."""
    from impartial import solvers

    if method == "vanilla":
        return None
    if method == "gradnorm-pcgrad":
        return solvers.Compose(solvers.GradNorm(alpha=0.0), solvers.PCGrad())
    return solvers.get(method)


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
    extra: dict = field(default_factory=dict)  # model constructor overrides


def step(model, batch, opt: torch.optim.Optimizer, solver, names=None, recorder=None) -> list[float]:
    """One optimisation step; returns the task losses (floats, for the training curves).  ``names`` label the
    tasks in the report; ``recorder`` (an :class:`impartial.diagnostics.Recorder`) keeps what each block saw."""
    tasks, also = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    if solver is None:
        sum(tasks + also).backward()
    else:
        import impartial

        losses = tasks if names is None else dict(zip(names, tasks))
        report = impartial.backward(losses, model.encoder_params, solver=solver, also=also)
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
        losses = [step(model, b, opt, solver, names, rec) for b in batches(d, cfg.batch, gen)]
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
