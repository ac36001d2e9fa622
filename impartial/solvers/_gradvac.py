"""GradVac: raise the cosine of each task pair to an EMA target, in coefficient space.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021 (Algorithm 1, the block treated as one group).  Like PCGrad the
modified gradients are combinations ``W J`` of the originals, so everything runs on ``W`` and ``G``:
``g_i' · g_p = (W G)_ip``, ``‖g_i'‖² = (W G Wᵀ)_ii``, ``‖g_p‖² = G_pp``.  Round ``r`` moves every task
against its ``r``-th partner at once (tasks are independent within a call, as in the sequential loop).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import GramSolver, Solution, keep_where, nonfinite_problems
from ._pcgrad import partner_indices, random_orders

__all__ = ["GradVac", "vaccinate"]

#: ‖g_i'‖² ≤ _CANCELLED · m² is round-off (~k·eps·m², k ≤ ~400) of a gradient that cancelled out
_CANCELLED = 1e-13
#: targets with |φ̂| ≥ 1 − _UNREACHABLE count as ±1: unreachable by adding a multiple of g_j
_UNREACHABLE = 1e-12


def vaccinate(G: Tensor, phi_hat: Tensor, orders: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """GradVac's coefficients ``W`` ``[..., k, k]`` and the updated EMA targets, for given partner orders.

    ``phi_hat`` ``[..., k, k]``: the targets ``φ̂_ij`` before this call; ``orders`` ``[..., k, k - 1]`` (see
    :func:`~impartial.solvers._pcgrad.random_orders`).  Pure function of its inputs: ``k - 1`` fixed rounds,
    ``torch.where`` for every branch (no host sync; runs under ``vmap`` and ``torch.compile``).
    """
    k = G.shape[-1]
    W = torch.eye(k, dtype=G.dtype, device=G.device) + torch.zeros_like(G)
    lengths = G.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    zero = torch.zeros_like(lengths)
    # The correction in terms of the parts of g_i' along and across g_p: with u = g_i'·g_p / ‖g_p‖ and
    # s = ‖g_i' − u ĝ_p‖ = √(‖g_i'‖² − u²), the paper's coefficient is  a = (φ̂ s / sin φ̂ − u) / ‖g_p‖: no
    # sin φ = √(1 − φ²) (which turns φ's round-off into large errors for nearly collinear pairs), and
    # exactly PCGrad's  −u / ‖g_p‖  at φ̂ = 0.
    # ‖g_i'‖² is updated with each correction, ‖g + a g_p‖² = ‖g‖² + 2a g·g_p + a²‖g_p‖² (O(k) a round, where
    # recomputing (W G Wᵀ)_ii costs a k×k matmul; both carry round-off ~k·eps·m², m = Σ_j |W_ij| ‖g_j‖ ≥
    # ‖g_i'‖).  Below the cut-off g_i' has cancelled out and counts as zero.
    sq = lengths * lengths
    bound = lengths
    # What does not depend on W is taken for all rounds at once, [..., k - 1, k] (round r reads row r).  Each
    # pair (i, p) is visited once a call, so its target φ̂_ip is the one from before the call.
    norm_p = lengths.unsqueeze(-2).expand_as(G).gather(-1, orders).mT
    inv_p = torch.where(norm_p > 0, 1.0 / torch.where(norm_p > 0, norm_p, 1.0), 0.0)
    sq_p = norm_p * norm_p
    target = phi_hat.gather(-1, orders).mT
    sin_t = (1.0 - target * target).clamp(min=0.0).sqrt()
    # φ < φ̂ is tested as g_i'·g_p < φ̂ ‖g_i'‖ ‖g_p‖: at φ̂ = 0 it is exactly PCGrad's test.  A target cosine
    # of ±1 cannot be reached by adding a multiple of g_p (the paper's coefficient is infinite); one within
    # 1e-12 of it (an EMA of collinear pairs) would turn round-off of the tie φ = φ̂ into cancelling g_i' or
    # not: such pairs, and zero partners, are left unchanged.
    reach = (norm_p > 0) & (target.abs() < 1.0 - _UNREACHABLE)
    slope = torch.where(reach, target / torch.where(reach, sin_t, 1.0), 0.0)  # φ̂ / sin φ̂
    kept = (1.0 - beta) * target
    cols, rows = partner_indices(orders, k)
    measured = []
    for r in range(k - 1):
        dot = (W * G.gather(-2, rows[..., r, :, :])).sum(-1)  # g_i' · g_p
        cut = _CANCELLED * bound * bound
        norm2 = torch.where(sq > cut, sq, zero)
        norm_i = norm2.sqrt()
        u = dot * inv_p[..., r, :]
        # s² is a squared norm from the Gram matrix too: below the same cut-off, g_i' is collinear with g_p
        s2 = torch.addcmul(norm2, u, u, value=-1.0)
        s = torch.where(s2 > cut, s2, zero).sqrt()
        den = norm_i * norm_p[..., r, :]
        # the cosine of a zero vector is taken as 0 (the paper leaves it undefined)
        phi = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), zero).clamp(-1.0, 1.0)
        ok = (dot < target[..., r, :] * den) & reach[..., r, :]
        coef = torch.where(ok, (slope[..., r, :] * s - u) * inv_p[..., r, :], zero)
        W = W.scatter_add(-1, cols[..., r, :, :], coef.unsqueeze(-1))
        sq = torch.addcmul(sq, coef, torch.addcmul(2.0 * dot, coef, sq_p[..., r, :]))
        bound = torch.addcmul(bound, coef.abs(), norm_p[..., r, :])
        measured.append(torch.add(kept[..., r, :], phi, alpha=beta))
    if measured:
        phi_hat = phi_hat.scatter(-1, orders, torch.stack(measured, -1))
    return W, phi_hat


class GradVac(GramSolver):
    r"""Gradient Vaccine: when a pair's cosine falls below its running target, add just enough of ``g_j``.

    For each task ``i``, in a random order of the other tasks ``j`` (Wang et al., ICLR 2021, Alg. 1), with
    ``φ_ij = cos(g_i', g_j)`` (``g_i'`` the partly modified gradient, ``g_j`` the original):

    .. math::
        \text{if } φ_{ij} < \hat φ_{ij}:\quad g_i' \leftarrow g_i' + \frac{\|g_i'\|\,(\hat φ_{ij}\sqrt{1-φ_{ij}^2}
        - φ_{ij}\sqrt{1-\hat φ_{ij}^2})}{\|g_j\|\sqrt{1-\hat φ_{ij}^2}}\, g_j, \qquad
        \hat φ_{ij} \leftarrow (1-β)\,\hat φ_{ij} + β\, φ_{ij},

    and ``d = Σ_i g_i'``.  The EMA targets start at ``φ̂ = 0`` (the paper's initialisation; with it, the first
    call only treats negative cosines) and are updated at **every** call, for every visited pair, with the
    cosine measured before that pair's correction (the paper; torchmoo resets them each call, which makes
    the method a fixed-target one).  State: ``φ̂`` ``[..., k, k]``, one matrix per batch element, created at
    the first call (later calls must have the same batch shape and ``k``; :meth:`reset` forgets it), plus the
    generator's state.  Orders as in :class:`~impartial.solvers.PCGrad`: a fresh random order of the other
    tasks per task and call, from ``generator`` or (compilable) from the global RNG.

    Degenerate cases: the cosine of a zero gradient counts as 0; a zero ``g_j``, or a target
    ``|φ̂| ≥ 1 − 10⁻¹²``, leaves ``g_i'`` unchanged (the paper's coefficient is infinite at ``|φ̂| = 1``).
    ``k = 1`` returns the gradient.

    Precision: ``‖g_i'‖²`` comes from the Gram matrix (``(W G Wᵀ)_ii``, updated per correction) with
    round-off ``~k·eps·m²``, ``m = Σ_j |W_ij| ‖g_j‖``.  So a ``g_i'`` that corrections shrink below
    ``√(10⁻¹³) m ≈ 3·10⁻⁷ m`` counts as cancelled (zero), a part of ``g_i'`` across ``g_j`` below that
    counts as zero (a collinear pair), and a ``g_i'`` just above has a cosine good to ``~k·eps·(m/‖g_i'‖)²``.
    The loop on vectors is matched to round-off (tested to ``10⁻¹⁰``) at the first call (``φ̂ = 0`` makes
    every step PCGrad's, which needs no norm) and for tasks in general position; with collinear, duplicate
    or zero tasks and ``d < k`` (gradients that cancel) it is matched to ``10⁻⁵`` of the gradients' scale.

    Gram-space: the mixing matrix is ``W`` (:func:`vaccinate`).

    >>> s = GradVac(beta=0.5)
    >>> s(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))  # the first call acts like PCGrad (targets 0)
    tensor([0.5000, 1.5000])
    >>> s.state_dict()["phi_hat"]  # both pairs measured cos = -1/√2
    tensor([[ 0.0000, -0.3536],
            [-0.3536,  0.0000]], dtype=torch.float64)
    """

    stateless = False
    deterministic = False

    def __init__(self, beta: float = 1e-2, *, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.generator = generator
        self.phi_hat: Tensor | None = None

    def _draw_orders(self, G: Tensor) -> Tensor:
        return random_orders(tuple(G.shape[:-2]), G.shape[-1], self.generator, G.device)

    def solve(
        self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None, mixing: bool = False
    ) -> Solution:
        before = self.phi_hat
        sol = super().solve(G, losses=losses, precision=precision, mixing=mixing)
        bad = nonfinite_problems(sol.status)
        if bad is not None and self.phi_hat is not None:  # (an empty batch sets no state)
            self.phi_hat = keep_where(bad, before, self.phi_hat)
        return sol

    def _mixing(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        if self.phi_hat is None:
            phi_hat = torch.zeros_like(G)
        elif self.phi_hat.shape != G.shape:
            raise ValueError(
                f"GradVac holds targets of shape {tuple(self.phi_hat.shape)} (batch dims, k, k) but got "
                f"G of shape {tuple(G.shape)}; call reset() when the tasks or batch shape change"
            )
        else:
            phi_hat = self.phi_hat.to(G.dtype)
        W, phi_hat = vaccinate(G, phi_hat, self._draw_orders(G), self.beta)
        self.phi_hat = phi_hat.detach()  # state holds no autograd graph
        return W

    def _state_dict(self) -> dict[str, Any]:
        return {} if self.phi_hat is None else {"phi_hat": self.phi_hat.clone()}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"phi_hat"}:
            raise ValueError(f"GradVac: unexpected state keys {sorted(set(state) - {'phi_hat'})}")
        phi_hat = state.get("phi_hat")
        self.phi_hat = None if phi_hat is None else phi_hat.clone()

    def _reset(self) -> None:
        self.phi_hat = None

    def _hparams(self) -> dict[str, Any]:
        return {"beta": self.beta} | ({"generator": self.generator} if self.generator is not None else {})
