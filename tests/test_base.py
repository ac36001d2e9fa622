"""The Gram pass: the chunked float32 form equals one matmul, in float32 accumulation, with any remainder."""

from __future__ import annotations

import pytest
import torch

from impartial.solvers import IMTLG, gram
from impartial.solvers._base import _CHUNK, _chunked


@pytest.mark.parametrize("k, d", [(3, 200_000), (8, 100_000), (8, 100_000 + 77), (15, 40 * _CHUNK + 1)])
def test_chunked_gram_equals_the_float64_gram(k: int, d: int) -> None:
    J = torch.randn(k, d, generator=torch.Generator().manual_seed(k + d))
    assert _chunked(J)
    G, exact = gram(J), J.double() @ J.double().T
    assert G.dtype == torch.float64 and G.shape == (k, k)
    # float32 accumulation: each chunk's dot products carry ~√c·eps, their sum adds ~√(d/c)·eps
    assert torch.allclose(G, exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert torch.equal(G, G.mT)


@pytest.mark.parametrize("k, d, dtype, batch", [(2, 10**6, torch.float32, ()), (16, 10**5, torch.float32, ()),
                                               (8, 10**4, torch.float32, ()), (8, 10**5, torch.float64, ()),
                                               (8, 10**5, torch.float32, (2,))])
def test_single_matmul_elsewhere(k: int, d: int, dtype: torch.dtype, batch: tuple[int, ...]) -> None:
    assert not _chunked(torch.empty(*batch, k, d, dtype=dtype))


def test_chunked_gram_under_vmap_and_half_precision() -> None:
    J = torch.randn(2, 8, 100_000, generator=torch.Generator().manual_seed(0))
    assert _chunked(J[0])
    vmapped = torch.func.vmap(gram)(J)
    # the same sums, though vmap may order the float32 accumulation differently
    assert torch.allclose(vmapped, torch.stack([gram(j) for j in J]), rtol=0, atol=1e-6 * float(vmapped.abs().max()))
    Jh = J[0].bfloat16()  # cast to float32, then the same chunked float32 pass
    assert torch.equal(gram(Jh), gram(Jh.float()))
    solver = IMTLG()
    assert torch.allclose(solver(J[0]), solver.weights(gram(J[0])).float() @ J[0], rtol=1e-6, atol=1e-6)
