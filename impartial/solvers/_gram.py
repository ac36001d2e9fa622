"""The passes over ``J`` that Gram-space solvers share: ``G = J Jᵀ`` (:func:`gram`), the direction ``wᵀJ``
(:func:`combine`) and new task gradients ``M J`` (:func:`mix`); the dtype of the ``k × k`` work
(:func:`solve_dtype`); and :func:`sync_free`, which says where a solver may read a value on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["combine", "gram", "mix", "solve_dtype", "sync_free"]

_LOW = (torch.float16, torch.bfloat16)

#: float32 and lower ``J`` with at most this many elements per problem is multiplied in float64: the
#: products are then exact, and it costs no more than the float32 product at that size.
_EXACT = 2**16
#: chunk length of the chunked float32 Gram (4 KiB per row: a [k, c] chunk stays in L1/L2 for k < 16)
_CHUNK = 1024
#: the largest diagonal entry of a float32 Gram in this range (norms in [2^-30, 2^30]) means no product
#: overflowed and the rows that matter stayed in float32's normal range; outside it, ``J`` is rescaled first
_SAFE = (2.0**-60, 2.0**60)
#: elements of ``J`` scaled at once by :func:`_rescaled_gram` (4 MiB of float32)
_RESCALE = 2**20


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ``k × k`` work runs in: float64 for float32 and lower, else ``dtype`` itself."""
    if dtype in _LOW or dtype == torch.float32:
        return torch.float64
    return dtype


def sync_free(*tensors: Tensor) -> bool:
    """Whether work on ``tensors`` must never wait on the host: on an accelerator (or meta), or traced by
    ``torch.compile``, a ``torch.func`` transform (``vmap``, ``grad``) or ``torch.jit``.  Elsewhere (plain
    CPU tensors) reading a value on the host costs nothing, and a solver may branch on it."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    # torch._C._functorch: the one way to see a vmap/grad wrapper; tests/test_base.py fails if it goes away
    for t in tensors:  # a loop, not any(generator): this runs on every call, and the generator costs 1 µs
        if t.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
    return False


def _chunked(J: Tensor) -> bool:
    """Whether the float32 Gram is summed over chunks of ``d``: decided by the static shape alone.

    For a few tasks (``2 < k < 16``) and a large ``J`` (``k d ≥ 6e5``) one ``sgemm`` with ``k`` rows streams
    ``J`` several times (measured 1.7 to 6 passes at ``k = 5 … 15``); a batch of ``[k, 1024] × [1024, k]``
    products summed over the chunks takes about one.  Elsewhere the single matmul is as fast or faster.
    """
    k, d = J.shape[-2], J.shape[-1]
    return J.ndim == 2 and J.dtype == torch.float32 and 2 < k < 16 and k * d >= 600_000


def _symmetric(G: Tensor) -> Tensor:
    # BLAS does not promise a bitwise-symmetric J Jᵀ (it is not, on some CPUs): average the two triangles
    return (G + G.mT) * 0.5


def _blocked(J: Tensor) -> bool:
    """Whether the float32 Gram of one ``J`` on the CPU is taken a block of rows at a time (:func:`_lower_gram`).

    From 64 tasks on (32 where ``k d ≥ 3e5``), while ``J`` is at most 64 MiB: one ``sgemm`` does all ``k²`` dot
    products where ``k(k+1)/2`` are distinct; row blocks against the rows above them do ``(n+1)/2n`` of the flops
    (``n`` blocks).  :func:`gram` with it over :func:`gram` without, measured (one thread, interleaved, min of
    100-200): 0.92-0.96 at k = 32, d = 1e4-1.5e4 (1.07 at d = 4e3: the extra ops cost more than the flops save),
    0.89-0.96 at k = 64, 0.80-0.89 at k = 128, 0.78 at k = 256 (d = 1e3-1e4); the product alone, 0.85-0.90 of
    one ``sgemm`` at k = 64, 0.74-0.86 at k = 128, 0.68 at k = 256 (d = 1e4 and 1e5).  Larger ``J`` is
    memory-bound: each block row reads its part of ``J`` again, and the full product is as fast (1.01 at k = 32,
    d = 1e6).
    """
    k, d = J.shape
    return (k >= 64 or (k >= 32 and k * d >= 300_000)) and k * d <= 2**24 and J.device.type == "cpu"


def _lower_gram(J: Tensor) -> Tensor:
    """``J Jᵀ`` ``[k, k]`` in float64 from float32 products of row blocks of ``J`` ``[k, d]`` with the rows up to
    theirs (blocks of 16 or 32 rows: ``sgemm``'s kernels run fastest on multiples of 16), mirrored above."""
    k = J.shape[0]
    s = 32 if k >= 64 else 16
    G = torch.empty(k, k, dtype=torch.float64)
    for i in range(0, k, s):
        e = min(i + s, k)
        P = J[i:e] @ J[:e].mT
        G[i:e, :e] = P
        if i:
            G[:i, i:e] = P[:, :i].mT
    return G


def _float32_gram(J: Tensor, blocked: bool = False) -> Tensor:
    """``J Jᵀ`` of a float32 ``J``: float32 products, partial sums over chunks of ``d`` added in float64.
    ``blocked`` (a plain CPU tensor only): by row blocks where :func:`_blocked` says it is faster."""
    if blocked and J.ndim == 2 and _blocked(J):
        return _lower_gram(J)
    if _chunked(J):
        k, d = J.shape
        n = d // _CHUNK
        blocks = J[:, : n * _CHUNK].view(k, n, _CHUNK).transpose(0, 1)  # [n, k, c]: a view, no copy
        G = torch.bmm(blocks, blocks.mT).sum(0, dtype=torch.float64)
        if n * _CHUNK < d:
            rest = J[:, n * _CHUNK :]
            G = G + (rest @ rest.T).double()
        return G
    return (J @ J.mT).double()


def _rescaled_gram(J: Tensor) -> Tensor:
    """The float32 Gram of ``2^-e J`` times ``4^e`` (per problem), ``2^e`` about ``max|J|``: no product
    overflows or underflows, and scaling by a power of two is exact.  The scaled copy is made a chunk of
    about :data:`_RESCALE` elements at a time, which stays in cache (a whole copy page-faults)."""
    # amax and amin read J without a copy (vector_norm(ord=inf) and aminmax(dim=) measured 7-20x slower)
    top = torch.maximum(J.amax(dim=(-2, -1)), -J.amin(dim=(-2, -1))).double()
    e = torch.where((top > 0) & top.isfinite(), torch.floor(torch.log2(top)), 0.0).clamp(-126, 126)
    scale = torch.exp2(-e).to(J.dtype)[..., None, None]
    k, d = J.shape[-2], J.shape[-1]
    c = max(_CHUNK, _RESCALE // k // _CHUNK * _CHUNK)
    G = _float32_gram(J[..., :c] * scale)
    for start in range(c, d, c):  # a loop fixed by the shape: vmap and compile see one graph
        G = G + _float32_gram(J[..., start : start + c] * scale)
    return G * torch.exp2(2 * e)[..., None, None]


def gram(J: Tensor) -> Tensor:
    """``G = J Jᵀ`` ``[..., k, k]`` of task gradients ``J`` ``[..., k, d]``, in :func:`solve_dtype`, symmetric.

    One pass over ``J``.  Float32 and half precision: up to ``k d = 2^16`` elements per problem the products
    are taken in float64 (exact); beyond, in float32 (half precision cast first), summed over chunks of
    ``d`` in float64 where that reads ``J`` once (see :func:`_chunked`), or, for one ``J`` on the CPU with many
    tasks, by blocks of rows that skip the mirrored half of the products (see :func:`_blocked`).  A float32
    product overflows above ``|J| ≈ 1e19`` and underflows below ``1e-23``: where the largest norm of a problem is
    outside ``[2^-30, 2^30]``, ``J`` is first scaled by a power of two (exact).  On the CPU that is decided after the
    fact from ``G``'s diagonal (the rescale costs ~1.5 more passes, only at such scales); where the work must
    be sync-free (:func:`sync_free`) it is always done (about half a pass more; BENCHMARKS.md).  Float64
    ``J`` is one ``J @ J.mT``.
    """
    if J.dtype in _LOW or J.dtype == torch.float32:
        if J.shape[-2] * J.shape[-1] <= _EXACT or J.shape[:-2].numel() == 0:  # (an empty batch: no reduction)
            X = J.double()
            return _symmetric(X @ X.mT)
        if J.dtype != torch.float32:  # a no-op .to() is still a dispatch: these run on every call
            J = J.float()
        if sync_free(J):
            return _symmetric(_rescaled_gram(J))
        G = _float32_gram(J, blocked=True)
        if G.ndim == 2:  # host reads: CPU
            lo = hi = G.diagonal().max().item()
        else:
            lo, hi = torch.stack(torch.aminmax(G.diagonal(dim1=-2, dim2=-1).amax(-1))).tolist()
        if _SAFE[0] <= lo and hi <= _SAFE[1]:
            return _symmetric(G)
        return _symmetric(_rescaled_gram(J))
    return _symmetric(J @ J.mT)


def combine(w: Tensor, J: Tensor) -> Tensor:
    """The direction ``wᵀJ`` ``[..., d]`` for weights ``w`` ``[..., k]`` and ``J`` ``[..., k, d]``."""
    if J.dtype in _LOW:
        return (w.float().unsqueeze(-2) @ J.float()).squeeze(-2).to(J.dtype)
    if J.ndim == 2 and w.ndim == 1:
        return torch.mv(J.mT, w.to(J.dtype))  # one gemv: the fewest ops for one problem
    return (w.to(J.dtype).unsqueeze(-2) @ J).squeeze(-2)


def mix(M: Tensor, J: Tensor) -> Tensor:
    """New task gradients ``M J`` ``[..., k, d]`` for a mixing matrix ``M`` ``[..., k, k]``."""
    if J.dtype in _LOW:
        return (M.float() @ J.float()).to(J.dtype)
    return M.to(J.dtype) @ J
