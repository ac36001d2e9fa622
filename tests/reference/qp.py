"""Reference loops for the QP solvers: textbook algorithms in coordinate space (on ``J``, not ``G``), float64.

- :func:`min_norm_point`: Wolfe's algorithm ("Finding the nearest point in a polytope", Math. Prog. 1976),
  major/minor cycles, one point added at a time: MGDA.
- :func:`nnls`: Lawson & Hanson's NNLS (*Solving Least Squares Problems*, 1974, ch. 23): the projection onto
  the dual cone ``{x : Jx ≥ 0}`` is ``y + Jᵀλ`` with ``λ = argmin_{λ ≥ 0} ‖y + Jᵀλ‖``: UPGrad, DualProj.
- :func:`cagrad_ref`: CAGrad's dual through ``√x = min_t x/(2t) + t/2``: for fixed ``t`` the dual is the
  min-norm point of the shifted hull ``{g_i + (t/r) g₀}``; ``t`` solves ``‖g_{w(t)}‖ = t`` (bisection).

Each returns only after checking its own optimality conditions, so a wrong reference fails loudly.
Slow and obvious by design (numpy + scipy's ``brentq``: test code only).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

EPS = 1e-13


def _affine_min(P: np.ndarray) -> np.ndarray:
    """Weights ``α`` (``Σα = 1``) of the min-norm point of the affine hull of the rows of ``P``."""
    m = P.shape[0]
    K = np.zeros((m + 1, m + 1))
    K[:m, :m] = P @ P.T
    K[:m, m] = 1
    K[m, :m] = 1
    rhs = np.zeros(m + 1)
    rhs[m] = 1
    return np.linalg.lstsq(K, rhs, rcond=None)[0][:m]


def _wolfe(P: np.ndarray) -> np.ndarray:
    k = P.shape[0]
    scale = float(np.linalg.norm(P, axis=1).max())
    if scale == 0.0:
        return np.full(k, 1.0 / k)
    P = P / scale
    S = [int(np.linalg.norm(P, axis=1).argmin())]
    lam = np.zeros(k)
    lam[S[0]] = 1.0
    for _major in range(50 * k + 50):
        x = lam @ P
        j = int((P @ x).argmin())
        if x @ x - P[j] @ x <= EPS or j in S:
            break
        S.append(j)
        for _minor in range(k + 5):
            alpha = np.zeros(k)
            alpha[S] = _affine_min(P[S])
            if all(alpha[i] > 0 for i in S):
                lam = alpha
                break
            theta = min(lam[i] / (lam[i] - alpha[i]) for i in S if alpha[i] <= 0)
            lam = (1 - theta) * lam + theta * alpha
            S = [i for i in S if lam[i] > 1e-15]
            lam[[i for i in range(k) if i not in S]] = 0
    x = lam @ P
    assert (P @ x).min() >= x @ x - 1e-9, "Wolfe: KKT violated"
    return lam


def min_norm_point(P: Tensor) -> Tensor:
    """Weights ``w ∈ Δ`` of the min-norm point of the convex hull of the rows of ``P`` [k, d] (Wolfe)."""
    return torch.from_numpy(_wolfe(P.double().numpy()))


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    d, k = A.shape
    scale = float(np.abs(A).max()) if A.size else 0.0
    if scale == 0.0:
        return np.zeros(k)
    A, b = A / scale, b / scale
    P: list[int] = []
    x = np.zeros(k)
    tol = 1e-13 * max(1.0, float(np.linalg.norm(b))) * max(1.0, float(np.linalg.norm(A)))
    for _outer in range(3 * k + 10):
        g = A.T @ (b - A @ x)
        cand = [j for j in range(k) if j not in P and g[j] > tol]
        if not cand:
            break
        P.append(max(cand, key=lambda j: g[j]))
        for _inner in range(k + 5):
            z = np.zeros(k)
            z[P] = np.linalg.lstsq(A[:, P], b, rcond=None)[0]
            if all(z[i] > 0 for i in P):
                x = z
                break
            alpha = min(x[i] / (x[i] - z[i]) for i in P if z[i] <= 0)
            x = x + alpha * (z - x)
            P = [i for i in P if x[i] > 1e-15]
            x[[i for i in range(k) if i not in P]] = 0
    return x  # scale-free: A and b were divided by the same number


def nnls(A: Tensor, b: Tensor) -> Tensor:
    """``argmin_{x ≥ 0} ‖A x − b‖`` (Lawson–Hanson), ``A`` [d, k]."""
    return torch.from_numpy(_nnls(A.double().numpy(), b.double().numpy()))


def project_dual_cone(J: Tensor, y: Tensor) -> Tensor:
    """The Euclidean projection of ``y`` [d] onto ``{x : J x ≥ 0}``."""
    lam = nnls(J.T, -y)
    x = y + lam @ J
    s = float(J.norm(dim=1).max()) * max(float(y.norm()), 1e-300)
    assert float((J @ x).min()) >= -1e-8 * s, "NNLS: projection not in the dual cone"
    return x


def mgda_ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
    return min_norm_point(J) @ J


def upgrad_ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
    return torch.stack([project_dual_cone(J, g) for g in J]).mean(0)


def dualproj_ref(J: Tensor, losses: Tensor | None = None) -> Tensor:
    return project_dual_cone(J, J.mean(0))


def cagrad_ref(J: Tensor, losses: Tensor | None = None, c: float = 0.4, reg: float = 1e-12) -> Tensor:
    """CAGrad on the perturbed gradients ``[J, √reg·diag(‖g_i‖)]`` the solver documents (a zero ``g_i``
    counts as the largest norm); returns the ``J`` part."""
    k, d = J.shape
    if c == 0.0:
        return J.mean(0)
    Jn = J.double().numpy()
    s = float((Jn * Jn).sum(1).max())
    s = s if s > 0 else 1.0
    norms = np.sqrt((Jn * Jn).sum(1))
    norms = np.where(norms > 0, norms, s**0.5)
    Jp = np.concatenate([Jn, reg**0.5 * np.diag(norms)], axis=1) / s**0.5
    g0 = Jp.mean(0)
    r = c * float(np.linalg.norm(g0))

    def w_of(t: float) -> np.ndarray:
        return _wolfe(Jp + (t / r) * g0)

    def h(t: float) -> float:
        return float(np.linalg.norm(w_of(t) @ Jp)) - t

    hi = max(float(np.linalg.norm(Jp, axis=1).max()), 1e-300)
    while h(hi) > 0:
        hi *= 2
    # h(0) = ‖MGDA point‖ > 0 (the perturbation keeps 0 out of the hull), and h crosses 0 once
    t = brentq(h, 0.0, hi, xtol=1e-16 * hi, rtol=4 * np.finfo(float).eps, maxiter=200)
    w = w_of(t)
    q = float(np.linalg.norm(w @ Jp))
    return J.mean(0) + (r / q) * (torch.from_numpy(w) @ J)
