"""GradDrop: keep, per coordinate, only the task gradients of one randomly chosen sign.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep Multitask
Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1, with the identity keep function ``f``).  Not
linear in ``J``: the masks look at the sign of every coordinate, so this is a Jacobian solver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import _LOW, Solver
from ._pcgrad import _load_rng_state, _rng_state

__all__ = ["GradDrop"]


class GradDrop(Solver):
    r"""Gradient sign dropout: at each coordinate keep the positive parts with probability ``P``, else the negative.

    With ``S_i`` the sign signal of task ``i`` (below), the *gradient positive sign purity*, one uniform
    draw ``U`` and the masks are (Chen et al., NeurIPS 2020, eq. 1 and Alg. 1, ``f`` = identity):

    .. math::
        P = \tfrac12\Bigl(1 + \frac{\sum_i S_i}{\sum_i |S_i|}\Bigr),\qquad
        M_i = \mathbb 1[P > U]\,\mathbb 1[S_i > 0] + \mathbb 1[P < U]\,\mathbb 1[S_i < 0],\qquad
        d = \sum_i \bigl((1-ℓ_i) M_i + ℓ_i\bigr) \odot g_i .

    - **Signal.** Without ``inputs``, ``S_i = g_i``: one purity and one draw per coordinate (the paper's
      un-batched form).  With ``inputs`` (the block's activations ``A``; GradDrop acts on the gradient at
      ``A``), J's rows are the flattened ``[B, F]`` block gradients, batch-major, and ``inputs`` has shape
      ``[..., B, F]`` (``...`` = J's leading dims, ``B·F = d``); as in the paper and its code, the signal is
      premultiplied by the input sign and summed over the batch, ``S_i = Σ_b sign(A_b) ⊙ g_{i,b}`` ``[F]``,
      and the mask of feature ``f`` applies to all ``B`` rows.  (torchmoo drops the input sign on batched
      gradients; we do not.)  Pass ``inputs`` of shape ``[..., 1, d]`` to use the sign with no batch sum.
    - **Leakage** ``ℓ`` (a float, or one per task), in ``[0, 1]``, default **0.0**: pure GradDrop, the
      paper's main setting and its code's usual choice.  ``ℓ = 1`` passes every gradient through: the sum.
    - Where every ``S_i`` is 0 the purity is taken as ``½`` (nothing there to keep or drop).
    - ``U`` is drawn per feature (and per batch element of J's leading dims) at every call, from
      ``generator`` (its state is checkpointed by :meth:`state_dict`) or, compilable, the global RNG.

    ``k = 1`` returns the gradient (``P`` is 1 where ``g > 0`` and 0 where ``g < 0``).  Positively homogeneous
    and, for a scalar leakage, permutation invariant, for a fixed draw.  Work runs in J's dtype (float32 for
    half precision); no host sync.

    >>> J = torch.tensor([[1.0, -2.0], [3.0, 2.0]])  # coordinate 0: both positive, always kept
    >>> GradDrop(leakage=1.0)(J)
    tensor([4., 0.])
    >>> GradDrop(generator=torch.Generator().manual_seed(0))(J)[0]
    tensor(4.)
    """

    def __init__(self, leakage: float | Sequence[float] = 0.0, *, generator: torch.Generator | None = None) -> None:
        leak = (float(leakage),) if isinstance(leakage, (int, float)) else tuple(float(x) for x in leakage)
        if not leak or not all(0.0 <= x <= 1.0 for x in leak):
            raise ValueError(f"GradDrop: leakage must be in [0, 1] (a float or one per task), got {leakage!r}")
        self.leakage: float | tuple[float, ...] = leak[0] if isinstance(leakage, (int, float)) else leak
        self.generator = generator

    def _draw_uniform(self, P: Tensor) -> Tensor:
        where = self.generator.device if self.generator is not None else P.device
        return torch.rand(P.shape, generator=self.generator, dtype=P.dtype, device=where).to(P.device)

    def _apply(self, J: Tensor, *, losses: Tensor | None, inputs: Tensor | None = None, **context: Tensor) -> Tensor:
        if context:
            raise TypeError(f"GradDrop: unexpected context {sorted(context)} (it takes inputs=)")
        k, d = J.shape[-2:]
        X = J.float() if J.dtype in _LOW else J  # float32 sums: a half-precision Σ|g| loses the sign purity
        if inputs is None:
            S = X
        else:
            if inputs.ndim != J.ndim or inputs.shape[:-2] != J.shape[:-2] or inputs.shape[-2] * inputs.shape[-1] != d:
                raise ValueError(f"GradDrop: inputs must have shape [..., B, F] with [...] = {tuple(J.shape[:-2])} "
                                 f"(J's leading dims) and B·F = d = {d}; got {tuple(inputs.shape)}")
            B, F = inputs.shape[-2:]
            S = (X.unflatten(-1, (B, F)) * torch.sign(inputs).to(X.dtype).unsqueeze(-3)).sum(-2)  # [..., k, F]
        total, mass = S.sum(-2), S.abs().sum(-2)
        safe = torch.where(mass > 0, mass, torch.ones_like(mass))  # torch.where: no NaN, no host sync
        P = torch.where(mass > 0, 0.5 * (1.0 + total / safe), torch.full_like(mass, 0.5))
        U = self._draw_uniform(P).unsqueeze(-2)
        P = P.unsqueeze(-2)
        M = ((P > U) & (S > 0)) | ((P < U) & (S < 0))
        if inputs is not None:
            M = M.unsqueeze(-2).expand(*M.shape[:-1], B, F).flatten(-2)  # one mask per feature, all rows
        if isinstance(self.leakage, tuple):
            if len(self.leakage) != k:
                raise ValueError(f"GradDrop has {len(self.leakage)} leakages but J has k = {k} tasks")
            leak = torch.tensor(self.leakage, dtype=X.dtype, device=X.device).unsqueeze(-1)
        else:
            leak = self.leakage
        return (((1.0 - leak) * M.to(X.dtype) + leak) * X).to(J.dtype)

    def state_dict(self) -> dict[str, Any]:
        return _rng_state(self.generator)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_rng_state(self, self.generator, state)

    def _hparams(self) -> dict[str, Any]:
        return {"leakage": self.leakage} | ({"generator": self.generator} if self.generator is not None else {})
