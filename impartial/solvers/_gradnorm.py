"""GradNorm (learned task weights that balance gradient norms) and NSGD (normalised task gradients).

Both look at the task gradients only through their norms ``‖g_i‖ = √G_ii``, so both are Gram-space
weightings with explicit state.  Every branch on a value is a ``torch.where`` and the step counter is a
tensor: a call never waits on the host, and compiled code does not recompile as the counter advances.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ._base import GramSolver, Solution, keep_where, nonfinite_problems

__all__ = ["NSGD", "GradNorm"]


def _safe_div(a: Tensor, b: Tensor, default: float) -> Tensor:
    """``a / b`` where ``b > 0``, ``default`` elsewhere (torch.where: no NaN, no host sync)."""
    positive = b > 0
    return torch.where(positive, a / torch.where(positive, b, 1.0), default)


class _Stateful(GramSolver):
    """Shared state plumbing: named tensors created at the first call with the batch shape of ``G``."""

    stateless = False
    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}

    def _get(self, G: Tensor) -> dict[str, Tensor]:
        if not self._state:
            ones = torch.ones(G.shape[:-1], dtype=G.dtype, device=G.device)
            return {name: ones for name in self._state_names if name != "step"} | {
                "step": torch.zeros((), dtype=torch.int64, device=G.device)
            }
        held = self._state[self._state_names[0]]
        if held.shape != G.shape[:-1]:
            raise ValueError(
                f"{type(self).__name__} holds state of shape {tuple(held.shape)} (batch dims, k) but got "
                f"G of shape {tuple(G.shape)}; call reset() when the tasks or batch shape change"
            )
        return {name: t.to(G.dtype) if t.is_floating_point() else t for name, t in self._state.items()}

    def _set(self, **state: Tensor) -> None:
        # state holds no autograd graph (detach only what has one: a dispatch per tensor on every call)
        self._state = {name: t.detach() if t.requires_grad else t for name, t in state.items()}

    def solve(
        self, G: Tensor, *, losses: Tensor | None = None, precision: torch.dtype | None = None, mixing: bool = False
    ) -> Solution:
        before = self._state
        sol = super().solve(G, losses=losses, precision=precision, mixing=mixing)
        # a non-finite problem keeps its state (on a first call the identity it was solved on leaves the
        # initial values); the call counter counts every call
        bad = nonfinite_problems(sol.status)
        if bad is not None:
            self._state = {
                name: t if name == "step" else keep_where(bad, before.get(name), t) for name, t in self._state.items()
            }
        return sol

    def _state_dict(self) -> dict[str, Any]:
        return {name: t.clone() for name, t in self._state.items()}

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        if state and set(state) != set(self._state_names):
            raise ValueError(
                f"{type(self).__name__}: expected state keys {sorted(self._state_names)}, got {sorted(state)}"
            )
        self._state = {name: t.clone() for name, t in state.items()}

    def _reset(self) -> None:
        self._state = {}


class GradNorm(_Stateful):
    r"""GradNorm: task weights ``w`` (``Σw = k``) learned so that weighted gradient norms follow training rates.

    Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", ICML 2018.  With ``n_i = ‖g_i‖``, the inverse training rates
    ``r_i = L̃_i / mean_j L̃_j`` and the GradNorm loss (targets held constant)

    .. math::
        L_{grad}(w) = \sum_i \bigl| w_i n_i - \bar G\, r_i^{α} \bigr|,\qquad \bar G = \operatorname{mean}_j w_j n_j,

    each call returns the current weights ``w(t)`` (the direction is ``Σ_i w_i g_i``; at the first call
    ``w = 1``, the paper's initialisation, so the first direction is the plain sum) and then takes the
    solver's own gradient step on ``L_grad``, renormalised to ``Σw = k`` (the paper's renormalisation).  The
    step is taken on ``θ = log w`` (torchmoo's parametrisation ``w = exp θ``, which keeps every weight
    positive) and divided by the constant ``Ḡ``, which makes ``lr`` unit-free (weights do not depend on the
    scale of the gradients):

    .. math::  w_i \leftarrow w_i \exp\bigl(-lr\ \mathrm{sign}(w_i n_i - \bar G r_i^{α})\, w_i n_i / \bar G\bigr),
               \qquad w \leftarrow k\, w / \textstyle\sum_j w_j .

    (A plain step on ``w`` itself moves a high-norm task's small weight by ``lr · n_i / Ḡ``, far more than
    the weight, and cycles instead of settling.)  Near the balance every ``log w_i`` moves by about ``lr``.

    ``progress`` sets ``L̃_i``:

    - ``"loss"`` (the paper): ``L̃_i = L_i(t) / L_i(t₀)`` from ``losses=`` ``[..., k]``, with the reference
      losses taken at call ``reference_step`` (default 0: the first call, as in the paper).  Losses are
      assumed positive; a zero reference gives ``L̃ = 1`` and negative ratios are floored at 0.  Calling it
      without ``losses`` raises, except with ``alpha = 0``, where the targets do not depend on them.
    - ``"grad"`` (the impartial-optimization paper's code, torchmoo's ``GradNormModified``):
      ``L̃_i = n_i(t) / n_i(t₀)``, reference norms taken at call ``reference_step`` (default 20, as there);
      before it the reference values are 1, as there.

    ``alpha = 0`` balances the gradient norms (targets ``Ḡ``).  ``k = 1`` returns the gradient.  State
    (per batch element): ``weights``, ``reference`` and the call counter ``step``.

    >>> s = GradNorm(alpha=0.0, lr=0.1)
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> s.weights(J @ J.T)  # first call: w = 1; then the step moves weight to the small gradient
    tensor([1., 1.], dtype=torch.float64)
    >>> s.weights(J @ J.T)
    tensor([1.0997, 0.9003], dtype=torch.float64)
    """

    _state_names = ("weights", "reference", "step")

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        *,
        progress: Literal["loss", "grad"] = "loss",
        reference_step: int | None = None,
    ) -> None:
        super().__init__()
        if progress not in ("loss", "grad"):
            raise ValueError(f"GradNorm: progress must be 'loss' or 'grad', got {progress!r}")
        if alpha < 0 or lr < 0:
            raise ValueError(f"GradNorm: alpha and lr must be non-negative, got alpha={alpha}, lr={lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.progress = progress
        self.reference_step = int(reference_step if reference_step is not None else (0 if progress == "loss" else 20))

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
        if self.progress == "grad":
            values = norms
        elif losses is not None:
            if losses.shape != norms.shape:
                raise ValueError(
                    f"GradNorm: losses must have shape {tuple(norms.shape)} (batch dims, k), got {tuple(losses.shape)}"
                )
            values = losses.detach().to(G.dtype)
        elif self.alpha == 0.0:
            values = torch.ones_like(norms)  # α = 0: r^α = 1 whatever the losses
        else:
            raise ValueError(
                "GradNorm(progress='loss') needs the task losses: call it with losses=[..., k] "
                "(or use progress='grad', or alpha=0)"
            )
        state = self._get(G)
        w, step = state["weights"], state["step"]
        reference = torch.where(step == self.reference_step, values, state["reference"])
        rate = _safe_div(values, reference, 1.0).clamp(min=0.0)
        r = _safe_div(rate, rate.mean(-1, keepdim=True), 1.0)
        weighted = w * norms
        g_bar = weighted.mean(-1, keepdim=True)
        # ∂L_grad/∂θ_i = w_i ∂L_grad/∂w_i, divided by Ḡ (0 where every gradient is 0: nothing to balance)
        grad = torch.sign(weighted - g_bar * r.pow(self.alpha)) * _safe_div(weighted, g_bar, 0.0)
        new = w * torch.exp(-self.lr * grad)
        new = G.shape[-1] * new / new.sum(-1, keepdim=True)  # Σ > 0: the weights stay positive
        self._set(weights=new, reference=reference, step=step + 1)
        return w

    def _hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr, "progress": self.progress, "reference_step": self.reference_step}


class NSGD(_Stateful):
    r"""Normalised-gradient descent: every task gradient rescaled to one common norm ``S``.

    From the reference code (torchmoo) of Javaloy, Meghdadi, Valera, "Mitigating Modality Collapse in
    Multimodal VAEs via Impartial Optimization", ICML 2022.  With ``n_i = ‖g_i‖`` and reference norms
    ``n_i⁰`` (1 until call ``reference_step``, default 20, whose norms become the reference):

    .. math::
        ρ_i = \frac{n_i}{n_i^0},\qquad a_i = \frac{ρ_i}{\sum_j ρ_j},\qquad S = \sum_i a_i n_i,\qquad
        d = \sum_i \frac{S}{n_i}\, g_i .

    So every task contributes a unit direction, and the common length ``S`` is a mean of the norms weighted
    towards the tasks that converge slowest (largest ``ρ``).  Before the reference step ``a ∝ n``, as in
    torchmoo.  A zero gradient gets weight 0; a zero reference norm counts as ``ρ = 1``.  ``k = 1`` returns
    the gradient; positively homogeneous, permutation and rotation invariant.  State (per batch element):
    ``reference`` and the call counter ``step``.

    >>> NSGD()(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # S = (3·3 + 1·1) / 4
    tensor([2.5000, 2.5000])
    """

    _state_names = ("reference", "step")

    def __init__(self, reference_step: int = 20) -> None:
        super().__init__()
        self.reference_step = int(reference_step)

    def _weights(self, G: Tensor, *, losses: Tensor | None) -> Tensor:
        norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
        state = self._get(G)
        step = state["step"]
        reference = torch.where(step == self.reference_step, norms, state["reference"])
        self._set(reference=reference, step=step + 1)
        rho = _safe_div(norms, reference, 1.0)
        a = _safe_div(rho, rho.sum(-1, keepdim=True), 0.0)
        S = (a * norms).sum(-1, keepdim=True)
        return _safe_div(S.expand_as(norms), norms, 0.0)

    def _hparams(self) -> dict[str, Any]:
        return {"reference_step": self.reference_step}
