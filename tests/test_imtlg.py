"""IMTL-G as its paper states it: equal projections on the unit task gradients, weights summing to 1."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from impartial.solvers import IMTLG, gram
from reference.weighting import imtlg_paper
from strategies import jacobians


@st.composite
def independent_jacobians(draw: st.DrawFn, max_k: int = 8) -> Tensor:
    """Nonzero, linearly independent task gradients (k ≤ d): the paper's setting."""
    J = draw(jacobians(max_k=max_k, min_d=max_k, degenerate=False))
    return J


@given(J=independent_jacobians())
def test_imtlg_equal_projections_on_unit_task_gradients(J: Tensor) -> None:
    d = IMTLG()(J)
    proj = (J @ d) / J.norm(dim=1)
    assert (proj > 0).all(), proj  # the common projection is positive: d is a descent direction for all
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-7, atol=0), proj


@given(J=independent_jacobians())
def test_imtlg_weights_are_the_papers_closed_form_up_to_sign(J: Tensor) -> None:
    w = IMTLG().weights(gram(J))
    paper = imtlg_paper(J)
    sign = 1.0 if float(paper.sum() * w.sum()) > 0 else -1.0
    assert torch.allclose(w, sign * paper, rtol=1e-6, atol=1e-9 * float(paper.abs().max())), (w, paper)
    assert torch.isclose(w.sum().abs(), torch.ones((), dtype=w.dtype), rtol=1e-9)


def test_imtlg_sign_guard_keeps_the_common_projection_positive() -> None:
    # Here the paper's Σα = 1 solution has a negative common projection (it ascends every task).
    J = torch.tensor([[-0.75, 0.0, -0.75], [0.0, -0.25, 0.0], [5.5, -22.25, 2.5]], dtype=torch.float64)
    paper = imtlg_paper(J)
    assert (J @ (paper @ J) < 0).all()
    w = IMTLG().weights(gram(J))
    assert torch.allclose(w, -paper, rtol=1e-12)
    assert (J @ (w @ J) > 0).all()


@given(J=independent_jacobians(max_k=6), where=st.lists(st.integers(0, 6), min_size=1, max_size=3))
def test_imtlg_zero_gradient_gets_zero_weight_and_leaves_the_rest(J: Tensor, where: list[int]) -> None:
    Jz = J
    for i in where:
        i = min(i, Jz.shape[0])
        Jz = torch.cat([Jz[:i], torch.zeros_like(J[:1]), Jz[i:]])
    zero = Jz.norm(dim=1) == 0
    w = IMTLG().weights(gram(Jz))
    assert (w[zero] == 0).all()
    assert torch.allclose(w[~zero], IMTLG().weights(gram(J)), rtol=1e-9, atol=1e-12)


@given(J=jacobians(min_k=1, max_k=1, scales=True), c=st.sampled_from([1.0, 0.5, 3.0]))
def test_imtlg_antiparallel_pair_gives_the_zero_direction(J: Tensor, c: float) -> None:
    # Only d = 0 has equal projections on u and −u (the paper's Σα = 1 solution is α = (½, ½) when c = 1).
    out = IMTLG()(torch.cat([J, -c * J]))
    assert torch.equal(out, torch.zeros_like(out))


@given(seed=st.integers(0, 2**31 - 1), c=st.sampled_from([0.5, 1.0, 3.0]), extra=independent_jacobians(max_k=4))
def test_imtlg_duplicated_direction_keeps_equal_projections(seed: int, c: float, extra: Tensor) -> None:
    # A task repeated (or rescaled) adds no constraint: the direction still has equal unit projections.
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(extra.shape[1], generator=gen, dtype=extra.dtype) * extra.norm(dim=1).mean()
    Jr = torch.cat([extra, g[None], c * g[None]])
    if torch.linalg.matrix_rank(Jr) < Jr.shape[0] - 1:
        return
    d = IMTLG()(Jr)
    proj = (Jr @ d) / Jr.norm(dim=1)
    assert (proj > 0).all()
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-6, atol=0), proj


def test_imtlg_float32_duplicate_rows_match_float64() -> None:
    J = torch.randn(3, 50, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    J = torch.cat([J, J[:1], 2 * J[1:2]])
    expected = IMTLG()(J)
    assert torch.allclose(IMTLG()(J.float()).double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
