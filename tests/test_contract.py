"""Generic invariants, one test each, expanded over the solver registry (``registry.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from impartial.solvers import gram
from registry import SolverInfo, claiming, rows
from strategies import batched_jacobians, jacobians, losses_for


def _kw(info: SolverInfo, J: Tensor, seed: int = 0) -> dict:
    kw = {"losses": losses_for(J, seed)} if info.needs_losses else {}
    if info.context is not None:
        kw.update(info.context(J))
    return kw


def _run(info: SolverInfo, J: Tensor, **kw) -> Tensor:
    return info.make()(J, **(_kw(info, J) | kw))


def assert_close(actual: Tensor, expected: Tensor, tol: float, scale: float | Tensor = 0.0) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), actual
    ref = max(float(expected.abs().max()) if expected.numel() else 0.0, float(scale))
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * ref + 1e-300, f"max abs error {err:.3e} > {tol:.1e} × {ref:.3e}"


def _scale(J: Tensor) -> float:
    return float(J.abs().max()) if J.numel() else 0.0


ALL = [pytest.param(r, id=r.id) for r in rows()]


def _param(claim: str) -> list:
    return [pytest.param(r, id=r.id) for r in claiming(claim)]


@pytest.mark.parametrize("info", ALL)
@given(J=jacobians())
def test_output_is_finite_with_input_shape_and_dtype(info: SolverInfo, J: Tensor) -> None:
    out = _run(info, J)
    assert out.shape == J.shape[-1:] and out.dtype == J.dtype
    assert torch.isfinite(out).all(), out


@pytest.mark.parametrize("info", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_input_keeps_dtype(info: SolverInfo, dtype: torch.dtype) -> None:
    J = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = _run(info, J.to(dtype))
    assert out.dtype == dtype and out.shape == (4, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("info", ALL)
@pytest.mark.parametrize("case", ["zero-matrix", "one-nonzero-row", "collinear", "antiparallel-pair"])
def test_degenerate_inputs_give_no_nan(info: SolverInfo, case: str) -> None:
    g = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    J = {
        "zero-matrix": torch.zeros(4, 9, dtype=torch.float64),
        "one-nonzero-row": torch.stack([torch.zeros(9), torch.zeros(9), g.float(), torch.zeros(9)]).double(),
        "collinear": torch.stack([g, 2 * g, 0.5 * g]),
        "antiparallel-pair": torch.stack([g, -g]),
    }[case]
    out = _run(info, J)
    assert torch.isfinite(out).all(), out


@pytest.mark.parametrize("info", _param("k1"))
@given(J=jacobians(min_k=1, max_k=1))
def test_k1_returns_the_gradient(info: SolverInfo, J: Tensor) -> None:
    assert_close(_run(info, J), info.k1(J[0]), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("permutation"))
@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant(info: SolverInfo, J: Tensor, seed: int) -> None:
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(seed))
    kw = _kw(info, J)
    kw_perm = {key: (v[perm] if key in ("losses",) else v) for key, v in kw.items()}
    if info.context is not None:
        kw_perm.update({key: v for key, v in info.context(J[perm]).items()})
    assert_close(info.make()(J[perm], **kw_perm), info.make()(J, **kw), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("homogeneous"))
@given(J=jacobians(), c=st.sampled_from([1e-3, 0.37, 2.0, 1e3]))
def test_positively_homogeneous(info: SolverInfo, J: Tensor, c: float) -> None:
    kw = _kw(info, J)
    assert_close(info.make()(c * J, **kw), c * info.make()(J, **kw), info.tol, c * _scale(J))


@pytest.mark.parametrize("info", _param("rotation"))
@given(J=jacobians(max_d=16), seed=st.integers(0, 2**31 - 1))
def test_rotation_equivariant(info: SolverInfo, J: Tensor, seed: int) -> None:
    d = J.shape[-1]
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=J.dtype))
    kw = _kw(info, J)
    assert_close(info.make()(J @ R, **kw), info.make()(J, **kw) @ R, info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("batched"))
@given(J=batched_jacobians())
def test_batched_equals_loop(info: SolverInfo, J: Tensor) -> None:
    batched = _run(info, J)
    looped = torch.stack([_run_row(info, J, b) for b in range(J.shape[0])])
    assert_close(batched, looped, info.tol, _scale(J))


def _run_row(info: SolverInfo, J: Tensor, b: int) -> Tensor:
    kw = _kw(info, J)
    return info.make()(J[b], **{key: v[b] for key, v in kw.items()})


@pytest.mark.parametrize("info", _param("vmap"))
@given(J=batched_jacobians(max_b=4))
def test_vmap_equals_loop(info: SolverInfo, J: Tensor) -> None:
    kw = _kw(info, J)
    keys = sorted(kw)
    solver = info.make()

    def one(j: Tensor, *ctx: Tensor) -> Tensor:
        return solver(j, **dict(zip(keys, ctx)))

    vmapped = torch.func.vmap(one)(J, *(kw[key] for key in keys))
    looped = torch.stack([_run_row(info, J, b) for b in range(J.shape[0])])
    assert_close(vmapped, looped, info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("gram_path"))
@given(J=jacobians())
def test_gram_path_equals_jacobian_path(info: SolverInfo, J: Tensor) -> None:
    kw = _kw(info, J)
    losses = kw.pop("losses", None)
    s = info.make()
    assert s.gram_space
    w = info.make().weights(gram(J), losses=losses)
    assert_close(w @ J, s(J, losses=losses, **kw), info.tol, _scale(J))
    M = info.make().mixing(gram(J), losses=losses)
    assert_close(M.sum(-2), w, info.tol, 1.0)
    assert_close(info.make().apply(J, losses=losses, **kw).sum(-2), w @ J, info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("reference"))
@given(J=jacobians())
def test_matches_reference_loop(info: SolverInfo, J: Tensor) -> None:
    kw = _kw(info, J)
    expected = info.reference(J, **kw)
    assert_close(_run(info, J), expected, info.ref_tol, _scale(J))


@pytest.mark.parametrize("info", _param("compile"))
def test_compiles_with_fullgraph(info: SolverInfo) -> None:
    torch._dynamo.reset()
    J = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = _kw(info, J)
    torch.manual_seed(0)  # solvers drawing from the global RNG draw the same numbers in both runs
    expected = info.make()(J, **kw)
    compiled = torch.compile(info.make().__call__, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    assert_close(compiled(J, **kw), expected, info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("checkpoint"))
def test_state_dict_round_trip_continues_identically(info: SolverInfo) -> None:
    gen = torch.Generator().manual_seed(4)
    Js = [torch.randn(5, 11, generator=gen, dtype=torch.float64) for _ in range(4)]
    a = info.make()
    for J in Js[:2]:
        a(J, **_kw(info, J))
    b = info.make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for J in Js[2:]:
        assert torch.equal(a(J, **_kw(info, J)), b(J, **_kw(info, J)))
