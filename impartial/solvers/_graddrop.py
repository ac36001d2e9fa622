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

from ._base import Solver, _check_jacobian
from ._gram import _LOW

__all__ = ["GradDrop"]

_CHUNK = 1 << 22  # elements of a [k, d] temporary made at once (16 MiB in float32)


def _row_chunks(X: Tensor) -> list[slice]:
    """Slices of J's task rows (dim −2) with about ``_CHUNK`` elements each, one slice when J is small.

    A whole [k, d] temporary (|S|, S ⊙ w) would double J's memory and, on CPU, page-fault at every call.
    """
    k = X.shape[-2]
    rows = max(1, _CHUNK // max(1, X.numel() // max(1, k)))
    return [slice(i, i + rows) for i in range(0, k, rows)]


def _task_sum(X: Tensor, W: Tensor, dim: int) -> Tensor:
    """``Σ_i W_i ⊙ X_i`` over the tasks (``dim``), a chunk of rows at a time (see :func:`_row_chunks`)."""
    parts = []
    for rows in _row_chunks(X.movedim(dim, -2)):
        i, n = rows.start, min(rows.stop, X.shape[dim]) - rows.start
        parts.append((X.narrow(dim, i, n) * W.narrow(dim, i, n)).sum(dim))
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


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

    - **Cost.** Without ``inputs`` and with a scalar ``ℓ``, the direction needs no mask: with
      ``σ = sign(P − U)``, ``Σ_i M_i g_i = σ(σ Σ_i g_i + Σ_i |g_i|)/2`` (the positive part, the negative part,
      or 0 on a tie ``P = U``) and ``d = (1−ℓ)·that + ℓ Σ_i g_i``: two reductions over the tasks, 4 passes over
      J in all.  The kept part is then exact to the rounding of ``Σ|g|`` rather than of itself.  ``apply``
      and the other forms build the ``[k, F]`` factors ``(1−ℓ_i) M_i + ℓ_i``.  Temporaries of J's size are
      made a few task rows at a time (about 4M elements), so the extra memory stays bounded.

    ``k = 1`` returns the gradient (``P`` is 1 where ``g > 0`` and 0 where ``g < 0``).  Positively homogeneous
    and, for a scalar leakage, permutation invariant, for a fixed draw.  Work runs in J's dtype (float32 for
    half precision); no host sync.

    >>> J = torch.tensor([[1.0, -2.0], [3.0, 2.0]])  # coordinate 0: both positive, always kept
    >>> GradDrop(leakage=1.0)(J)
    tensor([4., 0.])
    >>> GradDrop(generator=torch.Generator().manual_seed(0))(J)[0]
    tensor(4.)
    """

    deterministic = False

    def __init__(self, leakage: float | Sequence[float] = 0.0, *, generator: torch.Generator | None = None) -> None:
        leak = (float(leakage),) if isinstance(leakage, (int, float)) else tuple(float(x) for x in leakage)
        if not leak or not all(0.0 <= x <= 1.0 for x in leak):
            raise ValueError(f"GradDrop: leakage must be in [0, 1] (a float or one per task), got {leakage!r}")
        self.leakage: float | tuple[float, ...] = leak[0] if isinstance(leakage, (int, float)) else leak
        self.generator = generator

    def __call__(self, J: Tensor, *, losses: Tensor | None = None, **context: Tensor) -> Tensor:
        _check_jacobian(J, type(self).__name__)
        X, S, inputs = self._signals(J, context)
        total, mass, side = self._side(S)
        if inputs is None and not isinstance(self.leakage, tuple):
            # Σ_i M_i g_i is the positive part (Σg + Σ|g|)/2 where side = 1, the negative part (Σg − Σ|g|)/2
            # where side = −1, 0 on a tie: side·(side·Σg + Σ|g|)/2, with no [k, d] mask (4 passes over J).
            kept = torch.addcmul(mass, side, total).mul_(side).mul_(0.5)
            return (kept if self.leakage == 0.0 else torch.lerp(kept, total, self.leakage)).to(J.dtype)
        W = self._weights(S, side)
        if inputs is None:
            return _task_sum(X, W, -2).to(J.dtype)
        return _task_sum(X.unflatten(-1, inputs.shape[-2:]), W.unsqueeze(-2), -3).flatten(-2).to(J.dtype)

    def _apply(self, J: Tensor, *, losses: Tensor | None, **context: Tensor) -> Tensor:
        X, S, inputs = self._signals(J, context)
        W = self._weights(S, self._side(S)[2])
        if inputs is None:
            return (X * W).to(J.dtype)
        return (X.unflatten(-1, inputs.shape[-2:]) * W.unsqueeze(-2)).flatten(-2).to(J.dtype)

    def _signals(self, J: Tensor, context: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``X`` (J, float32 for half precision), the signals ``S`` ``[..., k, F]`` and ``inputs`` (or None)."""
        inputs = context.pop("inputs", None)
        if context:
            raise TypeError(f"GradDrop: unexpected context {sorted(context)} (it takes inputs=)")
        X = J.float() if J.dtype in _LOW else J  # float32 sums: a half-precision Σ|g| loses the sign purity
        if inputs is None:
            return X, X, None
        d = J.shape[-1]
        if inputs.ndim != J.ndim or inputs.shape[:-2] != J.shape[:-2] or inputs.shape[-2] * inputs.shape[-1] != d:
            raise ValueError(
                f"GradDrop: inputs must have shape [..., B, F] with [...] = {tuple(J.shape[:-2])} "
                f"(J's leading dims) and B·F = d = {d}; got {tuple(inputs.shape)}"
            )
        sign, Xb = torch.sign(inputs).to(X.dtype).unsqueeze(-3), X.unflatten(-1, inputs.shape[-2:])
        return X, torch.cat([(Xb[..., rows, :, :] * sign).sum(-2) for rows in _row_chunks(X)], -2), inputs

    def _side(self, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``Σ S_i``, ``Σ |S_i|`` and the kept side ``sign(P − U)`` (1 positive, −1 negative, 0 none)."""
        chunks = _row_chunks(S)  # Σ S_i over the same rows in the same order: P is 0 or 1 exactly at one sign
        total, mass = S[..., chunks[0], :].sum(-2), S[..., chunks[0], :].abs().sum(-2)
        for rows in chunks[1:]:
            part = S[..., rows, :]
            total, mass = total + part.sum(-2), mass + part.abs().sum(-2)
        # The least subnormal: every mass > 0 stays as it is (P to the bit), and a zero mass, where total is 0
        # too, gives P = ½ with no NaN; clamp_min, not an `if`: no host sync.
        least = torch.finfo(S.dtype).tiny * torch.finfo(S.dtype).eps
        P = (total / mass.clamp_min(least)).add_(1.0).mul_(0.5)
        # P − U is 0 exactly when P = U (gradual underflow), so its sign is both comparisons of Alg. 1 at once.
        return total, mass, torch.sign(P - self._draw_uniform(P))

    def _weights(self, S: Tensor, side: Tensor) -> Tensor:
        """The factors ``(1 − ℓ_i) M_i + ℓ_i`` ``[..., k, F]``: 1 where kept, ``ℓ_i`` where dropped."""
        k = S.shape[-2]
        # S_i·side > 0: S_i > 0 with P > U, or S_i < 0 with P < U (the mask M_i); never on a tie or S_i = 0.
        # sign of the positive part: 1.0 / 0.0 in S's dtype, with no bool tensor and no torch.where (slow on CPU).
        M = (S * side.unsqueeze(-2)).clamp(min=0).sign()
        if isinstance(self.leakage, tuple):
            if len(self.leakage) != k:
                raise ValueError(f"GradDrop has {len(self.leakage)} leakages but J has k = {k} tasks")
            leak = torch.tensor(self.leakage, dtype=S.dtype, device=S.device).unsqueeze(-1)
            return M.mul_(1.0 - leak).add_(leak)
        return M if self.leakage == 0.0 else M.mul_(1.0 - self.leakage).add_(self.leakage)

    def _draw_uniform(self, P: Tensor) -> Tensor:
        where = self.generator.device if self.generator is not None else P.device
        return torch.rand(P.shape, generator=self.generator, dtype=P.dtype, device=where).to(P.device)

    def _hparams(self) -> dict[str, Any]:
        return {"leakage": self.leakage} | ({"generator": self.generator} if self.generator is not None else {})
