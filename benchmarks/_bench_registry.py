"""Which solvers the benchmarks run, and TorchJD's same-named aggregator for each.

The solver list comes from ``impartial.solvers.__all__`` (every concrete :class:`~impartial.solvers.Solver`
class), so a new solver is benchmarked without touching this file.  ``TORCHJD`` maps our class name to the
TorchJD 0.18 aggregator of the same method; hyperparameters that both sides name alike (``c``, ``alpha``,
``beta``, ``scale_mode``) are copied from our instance so both solve the same problem.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import impartial.solvers as S

#: our class name -> (TorchJD aggregator name, defaults TorchJD requires, as a function of k)
TORCHJD: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "Sum": ("Sum", lambda k: {}),
    "Mean": ("Mean", lambda k: {}),
    "Random": ("Random", lambda k: {}),
    "PCGrad": ("PCGrad", lambda k: {}),
    "GradVac": ("GradVac", lambda k: {}),
    "IMTLG": ("IMTLG", lambda k: {}),
    "MGDA": ("MGDA", lambda k: {}),
    "CAGrad": ("CAGrad", lambda k: {"c": 0.5}),
    "UPGrad": ("UPGrad", lambda k: {}),
    "DualProj": ("DualProj", lambda k: {}),
    # max_norm=0 disables TorchJD's clipping of the direction, which our NashMTL does not do either.
    "NashMTL": ("NashMTL", lambda k: {"n_tasks": k, "max_norm": 0.0}),
    "AlignedMTL": ("AlignedMTL", lambda k: {}),
    "ConFIG": ("ConFIG", lambda k: {}),
    "FairGrad": ("FairGrad", lambda k: {"alpha": 1.0}),
    "GradDrop": ("GradDrop", lambda k: {}),
}
_SHARED_HPARAMS = ("c", "alpha", "beta", "scale_mode")

#: solvers that need constructor arguments to exist at all (the paper's combination for Compose)
_SPECIAL: dict[str, Callable[[], S.Solver]] = {
    "Compose": lambda: S.Compose(S.GradNorm(), S.PCGrad()),
}


@dataclass(frozen=True)
class Entry:
    name: str
    #: why our solver cannot run yet (a placeholder class), or "" when it runs
    missing: str
    gram_space: bool
    torchjd: str | None

    def make(self) -> S.Solver:
        if self.name in _SPECIAL:
            return _SPECIAL[self.name]()
        return getattr(S, self.name)()

    def make_torchjd(self, k: int, ours: S.Solver | None = None) -> torch.nn.Module:
        import torchjd.aggregation as A

        name, defaults = TORCHJD[self.name]
        cls = getattr(A, name)
        kwargs = defaults(k)
        accepted = inspect.signature(cls).parameters
        if ours is not None:
            hp = ours._hparams()
            kwargs.update({p: hp[p] for p in _SHARED_HPARAMS if p in hp and p in accepted})
        return cls(**kwargs)


def _concrete_solvers() -> list[str]:
    names = []
    for name in S.__all__:
        obj = getattr(S, name)
        if isinstance(obj, type) and issubclass(obj, S.Solver) and obj not in (S.Solver, S.GramSolver):
            names.append(name)
    return names


def entries() -> list[Entry]:
    """Every solver in ``impartial.solvers.__all__``, in that order, with whether it can run yet."""
    out = []
    for name in _concrete_solvers():
        try:
            solver = _SPECIAL[name]() if name in _SPECIAL else getattr(S, name)()
            missing, gram_space = "", bool(solver.gram_space)
        except TypeError as e:  # a placeholder: abstract class, or constructor not written yet
            missing, gram_space = f"not implemented yet ({str(e).splitlines()[0][:80]})", False
        out.append(Entry(name, missing, gram_space, TORCHJD.get(name, (None,))[0]))
    return out


def versions() -> dict[str, str]:
    def v(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return {
        "torch": torch.__version__,
        "torchjd": v("torchjd"),
        "impartial": v("impartial"),
        "threads": str(torch.get_num_threads()),
    }


def fmt_d(d: int) -> str:
    """``100000`` -> ``"1e5"`` (readable test ids)."""
    e = len(str(d)) - 1
    return f"1e{e}" if d == 10**e else str(d)
