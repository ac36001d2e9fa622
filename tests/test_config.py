"""ConFIG: conflict-free (equal, positive unit projections) with the projection length."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from impartial.solvers import IMTLG, ConFIG
from strategies import jacobians


@given(J=jacobians(max_k=8, min_d=8, degenerate=False))
def test_config_is_conflict_free_with_equal_unit_projections(J: Tensor) -> None:
    d = ConFIG()(J)
    proj = (J @ d) / J.norm(dim=1)
    assert (proj > 0).all(), proj
    # the unit direction solves U x = 1 (U: the unit rows) to ~cond(U) ε of its length; where it is nearly
    # orthogonal to every task (the thorough profile drew cosines of 2.7e-5 at cond(U) = 6e4: spread 8.8e-7 of
    # the projection) that is most of the projections' size
    U = J / J.norm(dim=1, keepdim=True)
    roundoff = 16 * float(torch.linalg.cond(U)) * torch.finfo(J.dtype).eps * float(d.norm())
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-7, atol=roundoff)


@given(J=jacobians(max_k=16))
def test_config_length_is_the_sum_of_projections_on_its_direction(J: Tensor) -> None:
    d = ConFIG()(J)
    if float(d.norm()) == 0:
        return
    unit = d / d.norm()
    assert torch.allclose(d.norm(), (J @ unit).sum().abs(), rtol=1e-8, atol=1e-12 * float(J.norm(dim=1).sum()))


@given(J=jacobians(max_k=8, min_d=8, degenerate=False))
def test_config_has_the_imtlg_direction_on_independent_gradients(J: Tensor) -> None:
    c, m = ConFIG()(J), IMTLG()(J)
    cos = (c @ m) / (c.norm() * m.norm())
    assert torch.isclose(cos, torch.ones((), dtype=J.dtype), rtol=0, atol=1e-9)


@given(J=jacobians(min_k=1, max_k=1), c=st.sampled_from([1.0, 0.5, 3.0]))
def test_config_antiparallel_pair_gives_the_zero_direction(J: Tensor, c: float) -> None:
    out = ConFIG()(torch.cat([J, -c * J]))
    assert torch.equal(out, torch.zeros_like(out))


@given(J=jacobians(max_k=6, min_d=6, degenerate=False), where=st.integers(0, 6))
def test_config_zero_gradient_takes_no_part(J: Tensor, where: int) -> None:
    i = min(where, J.shape[0])
    Jz = torch.cat([J[:i], torch.zeros_like(J[:1]), J[i:]])
    assert torch.allclose(ConFIG()(Jz), ConFIG()(J), rtol=1e-9, atol=1e-9 * float(J.abs().max()))
    assert ConFIG().weights(Jz @ Jz.T)[i] == 0


def test_float32_direction_is_linear_under_row_scaling() -> None:
    # ConFIG's direction is linear in positive row scalings (unit directions fixed, length Σ g_i·x̂).  The Gram
    # squares the conditioning (singular values 1, 0.3, 0.01 here), so its products must be exact (small J:
    # float64): with float32 products the error here is 5.1e-5, with exact ones 4.3e-6.
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    J = (U[:, :3] @ torch.diag(torch.tensor([1.0, 0.3, 0.01], dtype=torch.float64)) @ V).float()
    gen = torch.Generator().manual_seed(1)
    A = ConFIG()
    worst = 0.0
    for _ in range(20):
        c1, c2 = torch.rand(4, generator=gen), torch.rand(4, generator=gen)
        a, b = torch.rand(2, generator=gen)
        x = A(torch.diag(a * c1 + b * c2) @ J)
        expected = a * A(torch.diag(c1) @ J) + b * A(torch.diag(c2) @ J)
        worst = max(worst, float((x - expected).abs().max() / expected.abs().max()))
    assert worst < 1.5e-5, worst
