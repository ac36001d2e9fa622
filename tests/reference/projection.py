"""Reference loops for PCGrad, GradVac, GradDrop, GradNorm and NSGD: the papers' algorithms, written plainly.

Each works on one block (``J [k, d]``, float64) with explicit Python loops over tasks (and coordinates for
GradDrop), on the gradient vectors themselves, not on the Gram matrix.  Random draws (orders, uniforms) are
inputs, so the fast paths can be compared for the same draw.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cyclic_orders(batch_shape: tuple[int, ...], k: int) -> Tensor:
    """The fixed order ``i+1, i+2, …`` (mod k) for every task: ``[*batch_shape, k, k - 1]``."""
    i = torch.arange(k).unsqueeze(-1)
    r = torch.arange(1, k).unsqueeze(0)
    return ((i + r) % k).expand(*batch_shape, k, k - 1)


def pcgrad_ref(J: Tensor, orders: Tensor) -> Tensor:
    """Yu et al. 2020, Algorithm 1: each task projects off the original gradients it conflicts with, in order."""
    k = J.shape[0]
    total = torch.zeros_like(J[0])
    for i in range(k):
        g = J[i].clone()
        for j in orders[i].tolist():
            dot = float(g @ J[j])
            norm2 = float(J[j] @ J[j])
            if dot < 0 and norm2 > 0:
                g = g - dot / norm2 * J[j]
        total = total + g
    return total


def gradvac_ref(J: Tensor, orders: Tensor, phi_hat: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Wang et al. 2021, Algorithm 1 (one group), with the EMA targets carried in and out.

    The coefficient is the paper's, ``‖g‖(φ̂ sin φ − φ sin φ̂) / (‖g_j‖ sin φ̂)``, written with the parts of
    ``g`` along and across ``g_j`` (``u = g·ĝ_j = ‖g‖ φ``, ``s = ‖g − u ĝ_j‖ = ‖g‖ sin φ``):
    ``(φ̂ s / sin φ̂ − u) / ‖g_j‖``.  A ``g`` that has cancelled to below the solver's documented cut-off
    (``√1e-13`` of its bound ``Σ |coef| ‖g_j‖``) has cosine 0 and no part across ``g_j``; a part across
    ``g_j`` below that cut-off is zero.
    """
    k = J.shape[0]
    phi_hat = phi_hat.clone()
    total = torch.zeros_like(J[0])
    for i in range(k):
        g = J[i].clone()
        bound = float(J[i].norm())
        for j in orders[i].tolist():
            norm_j = float(J[j].norm())
            norm_i = float(g.norm())
            if norm_i <= 1e-13**0.5 * bound:
                norm_i = 0.0
            dot = float(g @ J[j])
            u = dot / norm_j if norm_j > 0 else 0.0
            s = float((g - u / norm_j * J[j]).norm()) if norm_j > 0 and norm_i > 0 else 0.0
            if s <= 1e-13**0.5 * bound:  # collinear pair: no part across g_j (the solver's cut-off)
                s = 0.0
            phi = min(1.0, max(-1.0, dot / (norm_i * norm_j))) if norm_i * norm_j > 0 else 0.0
            target = float(phi_hat[i, j])
            # φ < φ̂, compared without dividing (a cancelled g: its sign of g·g_j against 0)
            if dot < target * norm_i * norm_j and norm_j > 0 and abs(target) < 1 - 1e-12:
                coef = (target * s / math.sqrt(1 - target**2) - u) / norm_j
                g = g + coef * J[j]
                bound += abs(coef) * norm_j
            phi_hat[i, j] = (1 - beta) * target + beta * phi
        total = total + g
    return total, phi_hat


def graddrop_ref(J: Tensor, U: Tensor, leakage: float | list[float] = 0.0, inputs: Tensor | None = None) -> Tensor:
    """Chen et al. 2020, Algorithm 1 with f = identity, one coordinate (feature) at a time.

    ``inputs`` ``[B, F]``: J's rows are flattened ``[B, F]``; signals are ``Σ_b sign(A_b) g_{i,b}``.
    ``U`` holds one uniform per feature.
    """
    k, d = J.shape
    leak = [float(leakage)] * k if isinstance(leakage, (int, float)) else [float(x) for x in leakage]
    B, F = (1, d) if inputs is None else tuple(inputs.shape)
    out = torch.zeros_like(J[0])
    for f in range(F):
        S = []
        for i in range(k):
            s = 0.0
            for b in range(B):
                sign = 1.0 if inputs is None else float(torch.sign(inputs[b, f]))
                s += sign * float(J[i, b * F + f])
            S.append(s)
        mass = sum(abs(s) for s in S)
        P = 0.5 * (1 + sum(S) / mass) if mass > 0 else 0.5
        u = float(U[f])
        for i in range(k):
            keep = (P > u and S[i] > 0) or (P < u and S[i] < 0)
            for b in range(B):
                out[b * F + f] += ((1 - leak[i]) * float(keep) + leak[i]) * J[i, b * F + f]
    return out


def gradnorm_ref(
    Js: list[Tensor],
    losses: list[Tensor] | None,
    alpha: float,
    lr: float,
    progress: str = "loss",
    reference_step: int = 0,
) -> list[Tensor]:
    """Chen et al. 2018, Algorithm 1, over a sequence of calls: the direction uses w(t), then w takes its step.

    The step is on log w and scaled by 1/Ḡ, as the solver documents.
    """
    k = Js[0].shape[0]
    w = [1.0] * k
    ref = [1.0] * k
    out = []
    for t, J in enumerate(Js):
        n = [float(J[i].norm()) for i in range(k)]
        if progress == "grad":
            values = n
        elif losses is not None:
            values = [float(x) for x in losses[t]]
        else:
            values = [1.0] * k
        if t == reference_step:
            ref = list(values)
        out.append(sum(w[i] * J[i] for i in range(k)))
        rate = [max(values[i] / ref[i], 0.0) if ref[i] > 0 else 1.0 for i in range(k)]
        mean_rate = sum(rate) / k
        r = [x / mean_rate if mean_rate > 0 else 1.0 for x in rate]
        g_bar = sum(w[i] * n[i] for i in range(k)) / k
        new = []
        for i in range(k):
            diff = w[i] * n[i] - g_bar * r[i] ** alpha
            sign = (diff > 0) - (diff < 0)
            grad = sign * n[i] / g_bar if g_bar > 0 else 0.0  # ∂L_grad/∂w_i, scaled by 1/Ḡ
            new.append(w[i] * math.exp(-lr * w[i] * grad))  # a step on log w: ∂/∂log w_i = w_i ∂/∂w_i
        total = sum(new)
        w = [k * x / total for x in new]
    return out


def nsgd_ref(Js: list[Tensor], reference_step: int = 20) -> list[Tensor]:
    """torchmoo's NSGD over a sequence of calls: unit task gradients times a ratio-weighted mean norm."""
    k = Js[0].shape[0]
    ref = [1.0] * k
    out = []
    for t, J in enumerate(Js):
        n = [float(J[i].norm()) for i in range(k)]
        if t == reference_step:
            ref = list(n)
        rho = [n[i] / ref[i] if ref[i] > 0 else 1.0 for i in range(k)]
        total = sum(rho)
        a = [x / total if total > 0 else 0.0 for x in rho]
        S = sum(a[i] * n[i] for i in range(k))
        out.append(sum((S / n[i] if n[i] > 0 else 0.0) * J[i] for i in range(k)))
    return out
