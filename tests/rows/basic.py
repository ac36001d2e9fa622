"""Registry rows for the baselines and composition (see registry.py)."""

from __future__ import annotations

import torch

from impartial.solvers import Compose, Mean, Random, Sum
from reference.simple import mean_ref, sum_ref
from registry import GENERATOR, RANDOM_DRAW, SolverInfo

ROWS: list[SolverInfo] = [
    SolverInfo("Sum", Sum, {}, k1=lambda g: g, reference=sum_ref),
    SolverInfo("Mean", Mean, {}, k1=lambda g: g, reference=mean_ref),
    SolverInfo("Compose(Mean,Sum)", lambda: Compose(Mean(), Sum()), {}, k1=lambda g: g, reference=mean_ref),
    # Random claims what holds for a fixed draw; its generator's state is its checkpoint.
    SolverInfo(
        "Random",
        lambda: Random(generator=torch.Generator().manual_seed(0)),
        {
            "permutation": RANDOM_DRAW,
            "batched": RANDOM_DRAW,
            "vmap": RANDOM_DRAW,
            "compile": GENERATOR,
            "reference": "no loop to compare: the weights are the draw itself",
        },
        k1=lambda g: g,
    ),
    SolverInfo(
        "Random(global-rng)",
        Random,
        {
            "permutation": RANDOM_DRAW,
            "batched": RANDOM_DRAW,
            "vmap": RANDOM_DRAW,
            "homogeneous": "two calls draw different weights from the global RNG (the seeded row claims it)",
            "rotation": "two calls draw different weights from the global RNG (the seeded row claims it)",
            "gram_path": "two calls draw different weights from the global RNG (the seeded row claims it)",
            "checkpoint": "the global RNG is the user's to checkpoint (torch.get_rng_state)",
            "reference": "no loop to compare: the weights are the draw itself",
        },
        k1=lambda g: g,
    ),
]
