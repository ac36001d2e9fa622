"""GradDrop: sign-consistent masks, keep probability = sign purity, leakage, and the input sign."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_contract import assert_close
from torch import Tensor

from impartial.solvers import GradDrop, _graddrop
from reference.projection import graddrop_ref
from rows.projection import _HalfGradDrop
from strategies import jacobians


@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_graddrop_with_leakage_one_is_the_sum(J: Tensor, seed: int) -> None:
    out = GradDrop(leakage=1.0, generator=torch.Generator().manual_seed(seed))(J)
    assert_close(out, J.sum(0), 1e-12, float(J.abs().max()))


@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_graddrop_keeps_one_sign_per_coordinate(J: Tensor, seed: int) -> None:
    kept = GradDrop(generator=torch.Generator().manual_seed(seed)).apply(J)
    assert ((kept >= 0).all(0) | (kept <= 0).all(0)).all()
    # and what it keeps is whole task gradients: each entry is g or 0
    assert ((kept == J) | (kept == 0)).all()


def test_graddrop_keeps_the_positive_side_with_probability_equal_to_the_sign_purity() -> None:
    J = torch.tensor([[3.0, -1.0, 2.0], [-1.0, -1.0, -2.0]], dtype=torch.float64)
    P = 0.5 * (1 + J.sum(0) / J.abs().sum(0))  # [0.75, 0, 0.5]
    n = 20000
    kept = GradDrop(generator=torch.Generator().manual_seed(0)).apply(J.expand(n, 2, 3))
    positive = (kept[:, 0] > 0).double().mean(0)  # task 0 is the positive one in coordinates 0 and 2
    assert (positive[[0, 2]] - P[[0, 2]]).abs().max() < 5 * (0.25 / n) ** 0.5
    assert (kept[:, :, 1] == J[:, 1]).all()  # all negative: always kept


@given(J=jacobians(max_k=8, max_d=24), seed=st.integers(0, 2**31 - 1), B=st.sampled_from([1, 2, 3]))
def test_graddrop_with_inputs_and_per_task_leakage_matches_the_loop(J: Tensor, seed: int, B: int) -> None:
    k, d = J.shape
    J = J[:, : d - d % B] if d >= B else J.repeat(1, B)
    d = J.shape[1]
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(B, d // B, generator=gen, dtype=J.dtype)
    leak = torch.rand(k, generator=gen, dtype=J.dtype).tolist()
    U = torch.rand(d // B, generator=torch.Generator().manual_seed(seed), dtype=J.dtype)
    out = GradDrop(leak, generator=torch.Generator().manual_seed(seed))(J, inputs=inputs)
    assert_close(out, graddrop_ref(J, U, leak, inputs), 1e-12, float(J.abs().max()))


class _FixedGradDrop(GradDrop):
    """GradDrop with a given ``U`` (a constant: ½ and 0 make ties P = U at balanced and one-sign coordinates)."""

    def __init__(self, leakage: float, u: float) -> None:
        super().__init__(leakage)
        self.u = u

    def _draw_uniform(self, P: Tensor) -> Tensor:
        return torch.full_like(P, self.u)


@given(
    J=jacobians(max_k=8, max_d=24),
    ints=st.booleans(),
    leak=st.sampled_from([0.0, 0.3, 1.0]),
    draw=st.sampled_from(["seeded", 0.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_graddrop_direction_is_the_kept_sign_part_of_the_sum(
    J: Tensor, ints: bool, leak: float, draw: object, seed: int
) -> None:
    # The direction is formed from Σg and Σ|g| alone: (Σg ± Σ|g|)/2 is the part of the kept sign, 0 on a tie
    # P = U.  It must equal the sum of the per-task gradients (apply) and the loop, for the same draw.
    if ints:  # small integers, and a last row -Σg: every coordinate balanced (P = ½) or one-signed (P ∈ {0, 1})
        J = torch.randint(-2, 3, J.shape, generator=torch.Generator().manual_seed(seed)).to(J.dtype)
        J = torch.cat([J, -J.sum(0, keepdim=True)])
    if draw == "seeded":
        make = lambda: GradDrop(leak, generator=torch.Generator().manual_seed(seed))  # noqa: E731
        U = torch.rand(J.shape[1], generator=torch.Generator().manual_seed(seed), dtype=J.dtype)
    else:
        make = lambda: _FixedGradDrop(leak, float(draw))  # noqa: E731
        U = torch.full((J.shape[1],), float(draw), dtype=J.dtype)
    out = make()(J)
    scale = float(J.abs().max()) * J.shape[0]
    assert_close(out, make().apply(J).sum(0), 1e-13, scale)
    assert_close(out, graddrop_ref(J, U, leak), 1e-13, scale)


def test_graddrop_keeps_nothing_on_a_tie_of_purity_and_draw() -> None:
    # columns: balanced (P = ½), all negative (P = 0), all positive (P = 1), zero (P = ½), mixed (P = 0.6)
    J = torch.tensor(
        [[1.0, -1.0, 2.0, 0.0, 3.0], [-1.0, -2.0, 1.0, 0.0, -1.0], [0.0, -1.0, 1.0, 0.0, -1.0]], dtype=torch.float64
    )
    cases = {
        (0.0, 0.5): [0.0, -4.0, 4.0, 0.0, 3.0],
        (0.0, 0.0): [1.0, 0.0, 4.0, 0.0, 3.0],
        (0.5, 0.5): [0.0, -4.0, 4.0, 0.0, 2.0],
    }
    for (leak, u), expected in cases.items():
        solver = _FixedGradDrop(leak, u)
        assert torch.equal(solver(J), torch.tensor(expected, dtype=torch.float64)), (leak, u)
        assert torch.equal(solver.apply(J).sum(0), solver(J))
        assert torch.equal(graddrop_ref(J, torch.full((5,), u, dtype=torch.float64), leak), solver(J))


@given(
    J=jacobians(max_k=8, max_d=24),
    seed=st.integers(0, 2**31 - 1),
    leak=st.sampled_from([0.0, 0.3, None]),
    with_inputs=st.booleans(),
)
def test_graddrop_in_row_chunks_is_the_same_solver(J: Tensor, seed: int, leak: float | None, with_inputs: bool) -> None:
    # Big blocks are reduced a few task rows at a time (bounded temporaries); tiny chunks must change nothing
    # but the rounding of the sums, for the same draw.
    kw = {"inputs": torch.randn(1, J.shape[1], dtype=J.dtype, generator=torch.Generator().manual_seed(seed))}
    kw = kw if with_inputs else {}
    lk = leak if leak is not None else torch.rand(J.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    make = lambda: GradDrop(lk, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    whole, whole_tasks = make()(J, **kw), make().apply(J, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_graddrop, "_CHUNK", 1)  # one task row per chunk
        chunked, chunked_tasks = make()(J, **kw), make().apply(J, **kw)
    scale = float(J.abs().max()) * J.shape[0]
    assert_close(chunked, whole, 1e-13, scale)
    assert_close(chunked_tasks, whole_tasks, 1e-13, scale)


def test_graddrop_premultiplies_by_the_input_sign_before_summing_over_the_batch() -> None:
    # B = 2 rows, F = 1 feature; the second row's input is negative
    J = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    inputs = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    # signals: task 0: 2 - 1 = 1, task 1: -1 - 3 = -4, so P = 0.2 < U = ½: only task 1 is kept.  Without the
    # input sign (torchmoo's bug) both signals would be positive and both tasks kept (the sum).
    assert torch.equal(_HalfGradDrop()(J, inputs=inputs), J[1])
    assert torch.equal(_HalfGradDrop()(J, inputs=torch.ones(2, 1, dtype=torch.float64)), J.sum(0))


def test_graddrop_rejects_bad_inputs_and_leakage() -> None:
    J = torch.randn(3, 6)
    with pytest.raises(ValueError, match="B·F"):
        GradDrop()(J, inputs=torch.randn(4, 2))
    with pytest.raises(ValueError, match="leakages"):
        GradDrop([0.1, 0.2])(J)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        GradDrop(1.5)
    with pytest.raises(TypeError, match="inputs="):
        GradDrop()(J, activations=torch.randn(6))


def test_graddrop_checkpoints_its_generator() -> None:
    J = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = GradDrop(generator=torch.Generator().manual_seed(2))
    state = a.state_dict()
    first = a(J)
    assert not torch.equal(a(J), first)  # a fresh draw each call
    a.load_state_dict(state)
    assert torch.equal(a(J), first)
