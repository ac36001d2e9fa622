"""Registry rows for the projection and stateful solvers: PCGrad, GradVac, GradDrop, GradNorm, NSGD (+ Compose).

Randomised solvers claim what holds for a *fixed draw*: a fresh solver with a seeded generator draws the
same orders / uniforms for the same shape, so homogeneity, rotation, the Gram path, checkpointing and the
reference loop (fed the same draw) all hold.  ``permutation``, ``batched`` and ``vmap`` are claimed by rows
whose draw is replaced by a fixed one (``_Cyclic*``, ``_HalfGradDrop``): the same hot path, no draw.
Compiled rows use the global RNG (dynamo cannot trace a ``torch.Generator``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from impartial.solvers import NSGD, Compose, GradDrop, GradNorm, GradVac, PCGrad
from impartial.solvers._pcgrad import random_orders
from reference.projection import cyclic_orders, graddrop_ref, gradnorm_ref, gradvac_ref, nsgd_ref, pcgrad_ref
from registry import COORDINATES, GENERATOR, RANDOM_DRAW, STATEFUL_VMAP, SolverInfo


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class _CyclicPCGrad(PCGrad):
    """PCGrad with the fixed orders ``i+1, i+2, …`` (mod k) instead of a random draw."""

    def _draw_orders(self, G: Tensor) -> Tensor:
        return cyclic_orders(tuple(G.shape[:-2]), G.shape[-1]).to(G.device)


class _CyclicGradVac(GradVac):
    """GradVac with the fixed orders ``i+1, i+2, …`` (mod k) instead of a random draw."""

    def _draw_orders(self, G: Tensor) -> Tensor:
        return cyclic_orders(tuple(G.shape[:-2]), G.shape[-1]).to(G.device)


class _HalfGradDrop(GradDrop):
    """GradDrop with ``U = ½`` everywhere instead of a uniform draw (keeps the majority sign)."""

    def _draw_uniform(self, P: Tensor) -> Tensor:
        return torch.full_like(P, 0.5)


def _inputs(J: Tensor) -> dict[str, Tensor]:
    """Block inputs ``[..., B, F]`` for GradDrop, ``B·F = d`` (B = 3, 2 or 1), fixed by the shape of J."""
    d = J.shape[-1]
    B = next(b for b in (3, 2, 1) if d % b == 0)
    A = torch.randn(*J.shape[:-2], B, d // B, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return {"inputs": A.to(J.dtype)}


def _pcgrad_seeded_ref(J: Tensor, **kw: Tensor) -> Tensor:
    return pcgrad_ref(J, random_orders((), J.shape[0], _gen()))


def _gradvac_ref(orders_of) -> callable:
    def ref(J: Tensor, **kw: Tensor) -> Tensor:
        k = J.shape[0]
        return gradvac_ref(J, orders_of(k), torch.zeros(k, k, dtype=J.dtype), 1e-2)[0]

    return ref


def _graddrop_seeded_ref(J: Tensor, inputs: Tensor | None = None, **kw: Tensor) -> Tensor:
    F = J.shape[-1] if inputs is None else inputs.shape[-1]
    U = torch.rand((F,), generator=_gen(), dtype=J.dtype)
    return graddrop_ref(J, U, 0.0, inputs)


def _graddrop_half_ref(J: Tensor, inputs: Tensor | None = None, **kw: Tensor) -> Tensor:
    F = J.shape[-1] if inputs is None else inputs.shape[-1]
    return graddrop_ref(J, torch.full((F,), 0.5, dtype=J.dtype), 0.0, inputs)


_POSITIONS = "the fixed orders i+1, i+2, … are tied to task positions (test_pcgrad checks relabelled orders)"
_SEEDED = {"permutation": RANDOM_DRAW, "batched": RANDOM_DRAW, "vmap": RANDOM_DRAW, "compile": GENERATOR}
_GLOBAL = "draws from the global RNG: two calls differ (the seeded row claims it)"
#: rows drawing from the global RNG claim what only they can show: k1 and compile
_GLOBAL_RNG = {
    c: _GLOBAL
    for c in ("permutation", "homogeneous", "rotation", "batched", "vmap", "gram_path", "checkpoint", "reference")
}
_DROP = {
    "rotation": COORDINATES,
    "gram_path": COORDINATES,
    "batched": RANDOM_DRAW,
    "vmap": RANDOM_DRAW,
    "compile": GENERATOR,
}

ROWS: list[SolverInfo] = [
    SolverInfo("PCGrad", lambda: PCGrad(generator=_gen()), _SEEDED, k1=lambda g: g, reference=_pcgrad_seeded_ref),
    SolverInfo("PCGrad(global-rng)", PCGrad, _GLOBAL_RNG, k1=lambda g: g),
    SolverInfo(
        "PCGrad(cyclic)",
        _CyclicPCGrad,
        {"permutation": _POSITIONS},
        k1=lambda g: g,
        reference=lambda J, **kw: pcgrad_ref(J, cyclic_orders((), J.shape[0])),
    ),
    SolverInfo(
        "GradVac",
        lambda: GradVac(generator=_gen()),
        _SEEDED,
        k1=lambda g: g,
        reference=_gradvac_ref(lambda k: random_orders((), k, _gen())),
    ),
    SolverInfo("GradVac(global-rng)", GradVac, _GLOBAL_RNG, k1=lambda g: g),
    SolverInfo(
        "GradVac(cyclic)",
        _CyclicGradVac,
        {"permutation": _POSITIONS, "vmap": STATEFUL_VMAP},
        k1=lambda g: g,
        reference=_gradvac_ref(lambda k: cyclic_orders((), k)),
    ),
    # A scalar leakage and a draw per feature make GradDrop permutation invariant even for a fixed draw.
    SolverInfo("GradDrop", lambda: GradDrop(generator=_gen()), _DROP, k1=lambda g: g, reference=_graddrop_seeded_ref),
    SolverInfo(
        "GradDrop(inputs)",
        lambda: GradDrop(generator=_gen()),
        _DROP,
        k1=lambda g: g,
        reference=_graddrop_seeded_ref,
        context=_inputs,
    ),
    SolverInfo(
        "GradDrop(inputs,global-rng)",
        GradDrop,
        _GLOBAL_RNG | {"rotation": COORDINATES, "gram_path": COORDINATES},
        k1=lambda g: g,
        context=_inputs,
    ),
    SolverInfo(
        "GradDrop(inputs,U=1/2)",
        _HalfGradDrop,
        {"rotation": COORDINATES, "gram_path": COORDINATES},
        k1=lambda g: g,
        reference=_graddrop_half_ref,
        context=_inputs,
    ),
    SolverInfo(
        "GradNorm",
        GradNorm,
        {"vmap": STATEFUL_VMAP},
        k1=lambda g: g,
        needs_losses=True,
        reference=lambda J, losses=None, **kw: gradnorm_ref([J], [losses], 1.5, 0.025)[0],
    ),
    SolverInfo(
        "GradNorm(grad)",
        lambda: GradNorm(progress="grad"),
        {"vmap": STATEFUL_VMAP},
        k1=lambda g: g,
        reference=lambda J, **kw: gradnorm_ref([J], None, 1.5, 0.025, "grad", 20)[0],
    ),
    SolverInfo("NSGD", NSGD, {"vmap": STATEFUL_VMAP}, k1=lambda g: g, reference=lambda J, **kw: nsgd_ref([J])[0]),
    # GradNorm's first weights are 1, so a fresh Compose(GradNorm, PCGrad) is PCGrad (test_compose runs
    # longer sequences against the members applied in turn).
    SolverInfo(
        "Compose(GradNorm(alpha=0),PCGrad)",
        lambda: Compose(GradNorm(alpha=0.0), PCGrad(generator=_gen())),
        _SEEDED,
        k1=lambda g: g,
        reference=_pcgrad_seeded_ref,
    ),
    SolverInfo(
        "Compose(GradNorm(alpha=0),PCGrad)(global-rng)",
        lambda: Compose(GradNorm(alpha=0.0), PCGrad()),
        _GLOBAL_RNG,
        k1=lambda g: g,
    ),
    SolverInfo(
        "Compose(GradNorm(alpha=0),PCGrad(cyclic))",
        lambda: Compose(GradNorm(alpha=0.0), _CyclicPCGrad()),
        {"vmap": STATEFUL_VMAP, "permutation": _POSITIONS},
        k1=lambda g: g,
        reference=lambda J, **kw: pcgrad_ref(J, cyclic_orders((), J.shape[0])),
    ),
]
