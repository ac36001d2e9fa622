"""Nash-MTL and FairGrad: the bargaining solvers (the Newton machinery and its statuses: :mod:`._bargain`)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from ._bargain import bargain
from ._base import GramSolver, Solution, is_low, keep_where, nonfinite_problems, weighting_solution

__all__ = ["FairGrad", "NashMTL"]


class _Bargaining(GramSolver):
    #: calls so far, and the kept (weights, status, residual) of the last solve (``update_weights_every > 1``)
    step: int
    last: tuple[Tensor, Tensor, Tensor] | None

    def __init__(self, *, update_weights_every: int = 1, iters: int | None = None) -> None:
        if not isinstance(update_weights_every, int) or update_weights_every < 1:
            raise ValueError(f"update_weights_every must be a positive int, got {update_weights_every!r}")
        if iters is not None and (not isinstance(iters, int) or iters < 0):
            raise ValueError(f"{type(self).__name__}: iters must be None or a non-negative int, got {iters!r}")
        self.update_weights_every = update_weights_every
        self.iters = iters
        self._reset()

    @property
    def stateless(self) -> bool:  # type: ignore[override]
        return self.update_weights_every == 1

    @abstractmethod
    def _fresh(self, G: Tensor, low: bool) -> tuple[Tensor, Tensor, Tensor]: ...

    def solve(
        self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None, mixing: bool = False
    ) -> Solution:
        before = self.last
        sol = super().solve(G, losses=losses, precision=precision, mixing=mixing)
        bad = nonfinite_problems(sol.status)
        if bad is not None and self.last is not None and self.last is not before:  # fresh: a bad problem keeps its old
            kept = [None, None, None] if before is None else list(before)
            w, status, residual = (keep_where(bad, o, n) for o, n in zip(kept, (sol.weights, sol.status, sol.residual)))
            self.last = (w, status, residual)
        return sol

    def _solve(self, G: Tensor, *, losses: Tensor | None, precision: torch.dtype, mixing: bool) -> Solution:
        if self.update_weights_every == 1:  # stateless: nothing kept between calls
            return weighting_solution(*self._fresh(G, is_low(precision)), mixing)
        # the official code solves every `update_weights_every` steps and reuses the weights in between
        if self.step % self.update_weights_every == 0 or self.last is None:
            w, status, residual = (t.detach() for t in self._fresh(G, is_low(precision)))
            self.last = (w, status, residual)
        elif self.last[0].shape != G.shape[:-1]:
            raise ValueError(
                f"{type(self).__name__}: kept weights of shape {tuple(self.last[0].shape)} do not fit "
                f"a Gram of shape {tuple(G.shape)}; call reset() when the task set changes"
            )
        self.step += 1
        w, status, residual = self.last
        return weighting_solution(w.to(G.dtype), status, residual.to(G.dtype), mixing)

    def _state_dict(self) -> dict[str, Any]:
        if self.update_weights_every == 1:
            return {}
        if self.last is None:
            return {"step": self.step, "weights": None, "status": None, "residual": None}
        w, status, residual = self.last
        return {"step": self.step, "weights": w, "status": status, "residual": residual}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        if self.update_weights_every == 1:
            super()._load_state_dict(state)
            return
        if set(state) != {"step", "weights", "status", "residual"}:
            raise ValueError(
                f"{type(self).__name__}: expected state keys ['residual', 'status', 'step', 'weights'], "
                f"got {sorted(state)}"
            )
        self.step = int(state["step"])
        kept = (state["weights"], state["status"], state["residual"])
        self.last = None if kept[0] is None else kept  # type: ignore[assignment]

    def _reset(self) -> None:
        self.step = 0
        self.last = None

    def _hparams(self) -> dict[str, Any]:
        return ({} if self.update_weights_every == 1 else {"update_weights_every": self.update_weights_every}) | (
            {} if self.iters is None else {"iters": self.iters}
        )


class NashMTL(_Bargaining):
    r"""Nash bargaining weights ``w = √‖G‖_F · α*``, where ``α* > 0`` solves ``α*_i (Gα*)_i = 1``.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a Bargaining
    Game", ICML 2022.  The Nash bargaining solution is the direction ``∝ α*ᵀJ``: it maximises
    ``Σ log(g_i·d)`` over a ball, and gives task ``i`` the utility ``g_i·(α*ᵀJ) = 1/α*_i``.

    **Scale.**  The paper updates with ``α*ᵀJ`` itself, and so does the official code (its normalisation
    factor ``‖G‖_F`` only conditions the convex program: its constraint ``α_i ‖G‖_F (Ĝα)_i ≥ 1`` with
    ``Ĝ = G/‖G‖_F`` is ``α_i (Gα)_i ≥ 1``), followed by clipping the gradient of all shared parameters to
    ``max_norm = 1``; TorchJD's port returns ``α*ᵀJ`` clipped to norm 1.  That direction has norm ``√k``
    whatever the gradients' scale (``α*(cJ) = α*(J)/c``).  We return ``√‖G‖_F · α*``: the same direction,
    scaled with the gradients, so the method is positively homogeneous like every other solver here (a
    learning rate means the same thing; ``k = 1`` returns ``g``, where ``α*`` gives ``g/‖g‖``) and
    ``NashMTL`` composes and compares with them.  The paper's weights are ``weights(G) / √‖G‖_F``.

    - ``update_weights_every``: solve every n-th call and reuse the weights in between (the official code's
      option; state is ``step`` and the kept weights, status and residual, see :meth:`state_dict`).
    - ``iters``: the Newton steps of the sync-free schedule (default 32), or the cap of the CPU loop, which
      stops at convergence (default 200).
    - ``max_norm`` is a training step, left to ``torch.nn.utils.clip_grad_norm_`` (clipping per block would
      be a different method).
    - Zero task gradients have no stake (utility 0 whatever ``d``): weight 0, the others bargain.
    - Pareto-stationary tasks (e.g. an antiparallel pair) have no bargaining solution: the weights are 0
      (the disagreement point) and the status STATIONARY; see the module docstring for the statuses.

    >>> J = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    >>> NashMTL()(J)  # α* = (1/3, 1/4), times √‖G‖_F = 337^{1/4}
    tensor([4.2846, 4.2846])
    """

    def _fresh(self, G: Tensor, low: bool) -> tuple[Tensor, Tensor, Tensor]:
        beta, status, residual = bargain(G, 0.0, low, self.iters)
        return beta * torch.linalg.matrix_norm(G).sqrt().unsqueeze(-1), status, residual


class FairGrad(_Bargaining):
    r"""α-fair weights: ``w > 0`` with ``(Gw)_i = w_i^{-1/α}``; the direction is ``d = wᵀJ``.

    Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.  Each task's utility
    ``g_i·d = w_i^{-1/α}``; ``α = 1`` is proportional fairness (Nash-MTL without its normalisation), ``α → ∞``
    approaches max-min fairness.  Solved as the minimiser of
    ``½wᵀGw − Σ w_i^{1−1/α}/(1−1/α)`` (``−Σ log w_i`` at ``α = 1``) by the damped Newton of Nash-MTL.  The
    official code solves the same equation on the raw ``G`` with ``scipy.optimize.least_squares`` and then
    multiplies the direction by ``k`` ("to match the sum loss") and clips the shared gradient to
    ``max_norm``; we follow the paper, ``d = wᵀJ``, with neither.  Scale: ``A(cJ) = c^{(1−α)/(1+α)} A(J)``
    (not 1-homogeneous unless ``α → 0``); ``k = 1`` returns ``‖g‖^{(1−α)/(1+α)} g/‖g‖``.  Zero gradients,
    Pareto-stationary tasks, ``update_weights_every`` and ``iters`` are handled as in :class:`NashMTL`.

    >>> J = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    >>> FairGrad(alpha=1.0)(J)  # α = 1: w_i = 1/‖g_i‖ here, so both utilities g_i·d = 1/w_i = ‖g_i‖
    tensor([1., 1.])
    """

    def __init__(self, alpha: float = 1.0, *, update_weights_every: int = 1, iters: int | None = None) -> None:
        if not alpha > 0:
            raise ValueError(f"FairGrad: alpha must be positive, got {alpha!r}")
        self.alpha = float(alpha)
        super().__init__(update_weights_every=update_weights_every, iters=iters)

    def _fresh(self, G: Tensor, low: bool) -> tuple[Tensor, Tensor, Tensor]:
        return bargain(G, 1.0 - 1.0 / self.alpha, low, self.iters)

    def _hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **super()._hparams()}
