"""Registry rows for the baselines and composition (see registry.py)."""

from __future__ import annotations

import torch

from impartial.solvers import Compose, Mean, Random, Sum
from reference.simple import mean_ref, sum_ref
from registry import SolverInfo

_GENERIC = frozenset({"k1", "permutation", "homogeneous", "rotation", "batched", "vmap", "compile", "gram_path", "checkpoint",
                      "reference"})

ROWS: list[SolverInfo] = [
    SolverInfo("Sum", Sum, _GENERIC, k1=lambda g: g, reference=sum_ref),
    SolverInfo("Mean", Mean, _GENERIC, k1=lambda g: g, reference=mean_ref),
    SolverInfo("Compose(Mean,Sum)", lambda: Compose(Mean(), Sum()), _GENERIC, k1=lambda g: g, reference=mean_ref),
    # Random draws differ between one batched draw and B small ones, and between task orders: it claims
    # only what holds for a fixed draw.  Dynamo cannot trace a torch.Generator, so the compiled form uses the
    # global RNG (generator=None).
    SolverInfo("Random", lambda: Random(generator=torch.Generator().manual_seed(0)),
               frozenset({"k1", "homogeneous", "rotation", "gram_path", "checkpoint"}), k1=lambda g: g),
    SolverInfo("Random(global-rng)", Random, frozenset({"k1", "compile"}), k1=lambda g: g),
]
