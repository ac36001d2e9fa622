"""The Gram pass: exact for small float32 ``J``, accurate and symmetric for large ones, at any finite scale."""

from __future__ import annotations

import pytest
import torch

from impartial.solvers import IMTLG, gram
from impartial.solvers._gram import _CHUNK, _EXACT, _blocked, _chunked, sync_free


def _exact(J: torch.Tensor) -> torch.Tensor:
    X = J.double()
    return X @ X.mT


@pytest.mark.parametrize("k, d", [(3, 200_000), (8, 100_000), (8, 100_000 + 77), (15, 40 * _CHUNK + 1)])
def test_chunked_gram_is_close_to_the_float64_gram_and_symmetric(k: int, d: int) -> None:
    J = torch.randn(k, d, generator=torch.Generator().manual_seed(k + d))
    assert _chunked(J)
    G, exact = gram(J), _exact(J)
    assert G.dtype == torch.float64 and G.shape == (k, k)
    # float32 products, each chunk summed in float32 (~√c·eps), the chunks in float64.  BLAS promises neither
    # the order of the sums nor a bitwise-symmetric product: G is symmetric because gram() averages G and Gᵀ.
    assert torch.allclose(G, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    assert torch.equal(G, G.mT)


@pytest.mark.parametrize("k, d", [(32, 20_000), (64, 5_000), (100, 3_000)])
def test_blocked_gram_is_close_to_the_float64_gram_and_symmetric(k: int, d: int) -> None:
    """Row blocks of J against the rows above them (one J on the CPU, k ≥ 64 or k ≥ 32 with d ≥ 2e4), the
    upper triangle mirrored: every entry is one float32 dot product, as in the full product."""
    J = torch.randn(k, d, generator=torch.Generator().manual_seed(k + d))
    assert _blocked(J) and not _blocked(J[:31]) and not _blocked(J[:32, :9_000])
    G, exact, full = gram(J), _exact(J), (J @ J.mT).double()
    assert G.dtype == torch.float64 and G.shape == (k, k) and torch.equal(G, G.mT)
    tol = 1e-6 * float(exact.abs().max())
    assert torch.allclose(G, exact, rtol=0, atol=tol) and torch.allclose(G, (full + full.mT) / 2, rtol=0, atol=tol)
    # under vmap (sync-free) the plain product runs: the same values
    batched = torch.func.vmap(gram)(J[None])[0]
    assert torch.allclose(batched, G, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "k, d, dtype, batch",
    [
        (2, 10**6, torch.float32, ()),
        (16, 10**5, torch.float32, ()),
        (8, 10**4, torch.float32, ()),
        (8, 10**5, torch.float64, ()),
        (8, 10**5, torch.float32, (2,)),
    ],
)
def test_single_matmul_elsewhere(k: int, d: int, dtype: torch.dtype, batch: tuple[int, ...]) -> None:
    assert not _chunked(torch.empty(*batch, k, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, d", [(4, 7), (16, 4096), (3, 1)])
def test_small_low_precision_gram_has_exact_products(k: int, d: int, dtype: torch.dtype) -> None:
    assert k * d <= _EXACT
    J = torch.randn(2, k, d, generator=torch.Generator().manual_seed(k * d)).to(dtype)
    G, exact = gram(J), _exact(J)
    assert torch.equal(G, G.mT)
    assert torch.allclose(G, exact, rtol=0, atol=1e-13 * float(exact.abs().max()))  # float64 sums, any order


def test_chunked_gram_under_vmap_and_half_precision() -> None:
    J = torch.randn(2, 8, 100_000, generator=torch.Generator().manual_seed(0))
    assert _chunked(J[0])
    vmapped = torch.func.vmap(gram)(J)
    # the same sums, though vmap (sync-free: J rescaled by a power of two, exact) may order them differently
    assert torch.allclose(vmapped, torch.stack([gram(j) for j in J]), rtol=0, atol=1e-6 * float(vmapped.abs().max()))
    Jh = J[0].bfloat16()  # cast to float32, then the same chunked float32 pass
    assert torch.equal(gram(Jh), gram(Jh.float()))
    solver = IMTLG()
    assert torch.allclose(solver(J[0]), solver.weights(gram(J[0])).float() @ J[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-24, 1e-12, 1.0, 1e12, 1e19, 1e25], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("k, d", [(8, 100_000), (20, 5000), (2, 50_000)])
def test_float32_gram_neither_underflows_nor_overflows(scale: float, k: int, d: int) -> None:
    # rows of norms spread over four decades, times a global scale where float32 products would leave its range
    gen = torch.Generator().manual_seed(k)
    spread = torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    base = torch.randn(k, d, generator=gen, dtype=torch.float64) * spread
    J = (base * scale).float()
    assert torch.isfinite(J).all() and k * d > _EXACT
    exact = _exact(J)
    for G in (gram(J), torch.func.vmap(gram)(J.unsqueeze(0))[0]):  # host-checked path, sync-free path
        assert torch.equal(G, G.mT)
        assert torch.allclose(G, exact, rtol=0, atol=1e-6 * float(exact.abs().max())), float((G - exact).abs().max())
        # every row's own norm too (a row 1e4 below the largest keeps its digits)
        assert torch.allclose(G.diagonal(), exact.diagonal(), rtol=1e-5, atol=0)


def test_sync_free_sees_vmap_and_compile() -> None:
    x = torch.ones(3)
    assert not sync_free(x)
    assert torch.func.vmap(lambda t: t + float(sync_free(t)))(torch.ones(2, 3)).eq(2).all()
    compiled = torch.compile(lambda t: t + float(sync_free(t)), fullgraph=True, backend="eager")
    assert compiled(x).eq(2).all()
    assert sync_free(torch.ones(3, device="meta"))
