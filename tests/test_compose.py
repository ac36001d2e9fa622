"""Compose: Gram-space members compose in Gram space and equal applying them in turn; GradDrop works on J."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_contract import assert_close
from torch import Tensor

from impartial.solvers import NSGD, Compose, GradDrop, GradNorm, GradVac, PCGrad, gram
from rows.projection import _CyclicPCGrad
from strategies import jacobians


def _members(seed: int) -> list:
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    return [
        GradNorm(alpha=0.5, lr=0.2, progress="grad", reference_step=1),
        PCGrad(generator=gen()),
        GradVac(0.3, generator=gen()),
        NSGD(reference_step=1),
    ]


# d >= k: tasks in general position.  With d < k, GradVac's projected gradients can cancel to round-off, where
# its cosine targets are ill-defined and the Gram and coordinate computations part at ~1e-5 (see _gradvac.py).
@given(J=jacobians(max_k=10, min_d=10, degenerate=False), seed=st.integers(0, 2**31 - 1))
def test_compose_of_gram_solvers_equals_applying_them_in_turn(J: Tensor, seed: int) -> None:
    composed, members = Compose(*_members(seed)), _members(seed)
    assert composed.gram_space
    scale = float(J.abs().max())
    for t in range(4):
        Jt = J * (1.0 + 0.5 * t)
        expected = Jt
        for s in members:
            expected = s.apply(expected)
        assert_close(composed(Jt), expected.sum(0), 1e-9, scale * J.shape[0] ** 2)


@given(J=jacobians(max_k=10), seed=st.integers(0, 2**31 - 1))
def test_compose_mixing_is_the_product_of_the_members_mixings_on_the_successive_grams(J: Tensor, seed: int) -> None:
    G = gram(J)
    M = Compose(GradNorm(alpha=0.0), PCGrad(generator=torch.Generator().manual_seed(seed)), NSGD()).mixing(G)
    a, b, c = GradNorm(alpha=0.0), PCGrad(generator=torch.Generator().manual_seed(seed)), NSGD()
    Ma = a.mixing(G)
    Mb = b.mixing(Ma @ G @ Ma.T)
    G2 = (Mb @ Ma) @ G @ (Mb @ Ma).T
    expected = c.mixing(G2) @ Mb @ Ma
    assert_close(M, expected, 1e-12, float(expected.abs().max()))


@given(J=jacobians(max_k=10, max_d=24), seed=st.integers(0, 2**31 - 1))
def test_compose_with_graddrop_last_works_on_the_jacobian(J: Tensor, seed: int) -> None:
    d = J.shape[1]
    inputs = torch.randn(1, d, generator=torch.Generator().manual_seed(seed), dtype=J.dtype)
    make = lambda: (NSGD(), _CyclicPCGrad(), GradDrop(0.2, generator=torch.Generator().manual_seed(seed)))  # noqa: E731
    composed = Compose(*make())
    assert not composed.gram_space
    expected = J
    for s in make():
        expected = s.apply(expected, inputs=inputs) if isinstance(s, GradDrop) else s.apply(expected)
    assert_close(composed(J, inputs=inputs), expected.sum(0), 1e-12, float(J.abs().max()) * J.shape[0])


def test_compose_with_graddrop_has_no_gram_form() -> None:
    with pytest.raises(TypeError, match="GradDrop"):
        Compose(PCGrad(), GradDrop()).weights(torch.eye(3))


def test_compose_state_round_trips_through_all_members() -> None:
    gen = torch.Generator().manual_seed(0)
    Js = [torch.randn(4, 7, generator=gen, dtype=torch.float64) for _ in range(4)]
    a = Compose(*_members(3))
    for J in Js[:2]:
        a(J)
    b = Compose(*_members(99))  # other seeds: the loaded generator states must take over
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for J in Js[2:]:
        assert torch.equal(a(J), b(J))


def test_compose_reports_the_worst_member_status_and_passes_the_precision() -> None:
    from impartial.solvers import IMTLG, NashMTL, Status, Sum

    g = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = gram(torch.stack([g, -g]))
    assert int(Compose(Sum(), IMTLG()).solve(G).status) == Status.STATIONARY
    J = (
        torch.randn(5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    )
    sol = Compose(IMTLG(), NashMTL(iters=1)).solve(gram(J))
    assert int(sol.status) == Status.NOT_CONVERGED and sol.weights.isfinite().all()
    assert int(Compose(IMTLG(), NashMTL()).solve(gram(J)).status) == Status.OK
    # the members see J's precision (IMTLG's cut-offs differ between float32 and float64 here)
    gen = torch.Generator().manual_seed(0)
    a, b, noise = (torch.randn(4096, generator=gen) for _ in range(3))
    J32 = torch.stack([a, 2 * a, -0.5 * a + 1e-4 * noise, b])
    G32 = gram(J32)
    assert torch.allclose(
        Compose(Sum(), IMTLG()).weights(G32, precision=torch.float32),
        IMTLG().weights(G32, precision=torch.float32),
        rtol=1e-12,
        atol=0,
    )
    assert not torch.allclose(Compose(Sum(), IMTLG()).weights(G32), IMTLG().weights(G32, precision=torch.float32))
