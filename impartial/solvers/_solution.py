"""What a solve returns (:class:`Solution`, :class:`Status`), the helpers that build it, and the input checks
shared by every solver; the protocol itself is :mod:`impartial.solvers._base`."""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._gram import _LOW, sync_free


def is_low(precision: torch.dtype) -> bool:
    """Whether cut-offs for ``precision`` are float32's (float32 and lower), not float64's."""
    return precision in _LOW or precision == torch.float32


def _check_jacobian(J: Tensor, who: str) -> None:
    if not isinstance(J, Tensor):
        raise TypeError(f"{who}: expected a tensor J of shape [..., k, d], got {type(J).__name__}")
    if J.ndim < 2:
        raise ValueError(f"{who}: expected J of shape [..., k, d] (at least 2 dims), got shape {tuple(J.shape)}")
    if not J.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point J, got {J.dtype}")
    if J.shape[-2] == 0:
        raise ValueError(f"{who}: J has k = 0 task gradients; at least one is needed")


def _check_gram(G: Tensor, who: str) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{who}: expected a tensor G of shape [..., k, k], got {type(G).__name__}")
    if G.ndim < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"{who}: expected a square Gram matrix G of shape [..., k, k], got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point G, got {G.dtype}")
    if G.shape[-1] == 0:
        raise ValueError(f"{who}: G has k = 0 tasks; at least one is needed")


class Status(enum.IntEnum):
    """How a solve ended, per problem (a tensor of these codes; the worst of several is their maximum)."""

    #: solved to the method's documented tolerance
    OK = 0
    #: Pareto-stationary: the exact direction is 0 (0 is a nonnegative combination of the task gradients)
    STATIONARY = 1
    #: the iteration budget ended before the residual met the method's tolerance (weights: the last iterate)
    NOT_CONVERGED = 2
    #: the input had a NaN or an infinity; the weights are NaN
    NONFINITE = 3


class Solution(NamedTuple):
    """The result of :meth:`GramSolver.solve` for a batch of problems ``[...]``."""

    #: ``[..., k]``: the direction is ``wᵀJ``
    weights: Tensor
    #: ``[...]`` int8 codes of :class:`Status`
    status: Tensor
    #: ``[...]`` the method's optimality residual (relative; 0 for closed forms)
    residual: Tensor
    #: ``[..., k, k]`` the mixing matrix (new task gradients ``M J``) when asked for, else None
    mixing: Tensor | None = None


def closed_form(w: Tensor, G: Tensor, M: Tensor | None = None) -> Solution:
    """The solution of a closed-form method: status OK, or STATIONARY where every task gradient is 0."""
    zero = G.diagonal(dim1=-2, dim2=-1).amax(-1) <= 0
    status = zero.to(torch.int8)  # STATIONARY is 1, OK 0 (one op: this runs on every call)
    return Solution(w, status, torch.zeros_like(zero, dtype=w.dtype), M)


def weighting_solution(w: Tensor, status: Tensor, residual: Tensor, mixing: bool) -> Solution:
    """A weighting method's solution, with its mixing matrix ``diag(w)`` when ``mixing``."""
    return Solution(w, status, residual, torch.diag_embed(w) if mixing else None)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, read on the host.  Its sum is finite exactly then, but for
    finite entries whose sum overflows, which the elementwise test (~4x the cost at k ≤ 64) rules out."""
    return math.isfinite(x.sum().item()) or bool(x.isfinite().all())


def _nonfinite(sol: Solution, finite: Tensor) -> Solution:
    """NaN weights (and mixing, residual) and status NONFINITE where ``finite`` is False; torch.where: no sync."""
    nan = float("nan")
    return Solution(
        torch.where(finite.unsqueeze(-1), sol.weights, nan),
        torch.where(finite, sol.status, int(Status.NONFINITE)),
        torch.where(finite, sol.residual, nan),
        None if sol.mixing is None else torch.where(finite[..., None, None], sol.mixing, nan),
    )


def keep_where(bad: Tensor, old: Tensor | None, new: Tensor) -> Tensor:
    """``new``, with the problems where ``bad`` (``[...]``, a prefix of ``new``'s shape) taken from ``old``
    (a stateful solver's rule for non-finite problems: their state stays as it was); ``new`` when no ``old``."""
    if old is None:
        return new
    return torch.where(bad.reshape(bad.shape + (1,) * (new.ndim - bad.ndim)), old.to(new.dtype), new)


def nonfinite_problems(status: Tensor) -> Tensor | None:
    """The problems of a solve whose input was not finite (``[...]`` bool), for a stateful solver to keep their
    state; None when there is none, which is known without a sync only on the CPU, untraced."""
    if not sync_free(status) and (status.numel() == 0 or status.max().item() < int(Status.NONFINITE)):
        return None  # NONFINITE is the largest code: one reduction, no mask (this runs on every call)
    return status == int(Status.NONFINITE)
