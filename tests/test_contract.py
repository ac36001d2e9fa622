"""Generic invariants, one test each, expanded over the solver registry (``registry.py``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from impartial.solvers import GramSolver, Mean, Random, Status, Sum, combine, gram
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


def _cast(info: SolverInfo, J: Tensor) -> Tensor:
    """The drawn float64 ``J`` in the row's dtype."""
    return J.to(info.dtype)


@pytest.mark.parametrize("info", ALL)
@given(J=jacobians())
def test_output_is_finite_with_input_shape_and_dtype(info: SolverInfo, J: Tensor) -> None:
    J = _cast(info, J)
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
    out = _run(info, _cast(info, J))
    assert torch.isfinite(out).all(), out


#: Gram-space solvers whose direction needs no Gram matrix (J.sum(-2) and the like): a NaN stays where it was
_NO_GRAM_CALL = (Sum, Mean, Random)


@pytest.mark.parametrize("info", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_gives_nan_only_where_it_is(info: SolverInfo, bad: float) -> None:
    # a batch of three problems; the second has one non-finite entry: no exception, no host sync needed, the
    # others are solved as if alone, and a Gram-space solver says NONFINITE with NaN weights for that one
    # (coordinate solvers, and those that combine J without a Gram, put the NaN where it was, as plain sums do)
    J = _cast(info, torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    J[1, 2, 3] = bad
    kw = _kw(info, J)
    out = info.make()(J, **kw)
    assert not torch.isfinite(out[1]).all()
    if "batched" in info.claims:
        for b in (0, 2):
            assert_close(out[b], _run_row(info, J, b), info.tol, _scale(J[b]))
    s = info.make()
    if s.gram_space:
        assert out[1].isnan().all() or isinstance(s, _NO_GRAM_CALL)
        sol = s.solve(gram(J), losses=kw.get("losses"), precision=J.dtype)
        assert sol.status.tolist() != [] and int(sol.status[1]) == Status.NONFINITE
        assert all(int(sol.status[b]) != Status.NONFINITE for b in (0, 2))
        assert sol.weights[1].isnan().all() and sol.weights[[0, 2]].isfinite().all()
    else:
        assert out[1, 3].isnan().all() or not torch.isfinite(out[1, 3]).all()


@pytest.mark.parametrize("info", [pytest.param(r, id=r.id) for r in rows() if r.make().gram_space])
def test_nonfinite_gram_diagonal_gives_nan_weights(info: SolverInfo) -> None:
    J = _cast(info, torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    G = gram(J)
    G[2, 2] = float("nan")
    sol = info.make().solve(G, losses=_kw(info, J).get("losses"), precision=J.dtype)
    assert int(sol.status) == Status.NONFINITE and sol.weights.isnan().all() and sol.residual.isnan()


def _without(state: Any, keys: set[str]) -> Any:
    if isinstance(state, dict):
        return {k: _without(v, keys) for k, v in state.items() if k not in keys}
    return state


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.shape == b.shape
            and torch.equal(a.double().nan_to_num(7.0), b.double().nan_to_num(7.0))
        )
    return a == b


@pytest.mark.parametrize("info", [pytest.param(r, id=r.id) for r in rows() if not r.make().stateless])
def test_nonfinite_input_leaves_the_kept_state(info: SolverInfo) -> None:
    gen = torch.Generator().manual_seed(8)
    Js = [_cast(info, torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)) for _ in range(2)]
    s = info.make()
    for J in Js:
        s(J, **_kw(info, J))
    before = _without(s.state_dict(), {"step", "generator"})
    bad = Js[0].clone()
    bad[:, 1, 2] = float("nan")  # every problem non-finite
    s(bad, **_kw(info, bad))
    assert _same_state(_without(s.state_dict(), {"step", "generator"}), before)


@pytest.mark.parametrize("info", _param("k1"))
@given(J=jacobians(min_k=1, max_k=1))
def test_k1_returns_the_gradient(info: SolverInfo, J: Tensor) -> None:
    J = _cast(info, J)
    assert_close(_run(info, J), info.k1(J[0]), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("permutation"))
@given(J=jacobians(), seed=st.integers(0, 2**31 - 1))
def test_permutation_invariant(info: SolverInfo, J: Tensor, seed: int) -> None:
    J = _cast(info, J)
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(seed))
    kw = _kw(info, J)
    kw_perm = {key: (v[perm] if key in ("losses",) else v) for key, v in kw.items()}
    if info.context is not None:
        kw_perm.update({key: v for key, v in info.context(J[perm]).items()})
    assert_close(info.make()(J[perm], **kw_perm), info.make()(J, **kw), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("homogeneous"))
@given(J=jacobians(), c=st.sampled_from([2.0**-10, 0.375, 2.0, 2.0**10]))
def test_positively_homogeneous(info: SolverInfo, J: Tensor, c: float) -> None:
    J = _cast(info, J)  # c a power of two (or 0.375): cJ is exact in float32 too
    kw = _kw(info, J)
    assert_close(info.make()(c * J, **kw), c * info.make()(J, **kw), info.tol, c * _scale(J))


@pytest.mark.parametrize("info", _param("rotation"))
@given(J=jacobians(max_d=16), seed=st.integers(0, 2**31 - 1))
def test_rotation_equivariant(info: SolverInfo, J: Tensor, seed: int) -> None:
    d = J.shape[-1]
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=J.dtype))
    J, JR = _cast(info, J), _cast(info, J @ R)
    kw = _kw(info, J)
    assert_close(info.make()(JR, **kw), info.make()(J, **kw) @ R.to(J.dtype), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("batched"))
@given(J=batched_jacobians())
def test_batched_equals_loop(info: SolverInfo, J: Tensor) -> None:
    J = _cast(info, J)
    batched = _run(info, J)
    looped = torch.stack([_run_row(info, J, b) for b in range(J.shape[0])])
    assert_close(batched, looped, info.tol, _scale(J))


def _run_row(info: SolverInfo, J: Tensor, b: int) -> Tensor:
    kw = _kw(info, J)
    return info.make()(J[b], **{key: v[b] for key, v in kw.items()})


@pytest.mark.parametrize("info", _param("vmap"))
@given(J=batched_jacobians(max_b=4))
def test_vmap_equals_loop(info: SolverInfo, J: Tensor) -> None:
    J = _cast(info, J)
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
    # every entry point sees the precision of J: solve(G, precision=J.dtype), weights, mixing, __call__, apply
    J = _cast(info, J)
    kw = _kw(info, J)
    losses = kw.pop("losses", None)
    s = info.make()
    assert isinstance(s, GramSolver) and s.gram_space
    G = gram(J)
    sol = info.make().solve(G, losses=losses, precision=J.dtype, mixing=True)
    w = info.make().weights(G, losses=losses, precision=J.dtype)
    assert torch.equal(sol.weights, w) and sol.mixing is not None
    assert_close(combine(w, J), s(J, losses=losses, **kw), info.tol, _scale(J))
    assert_close(sol.mixing.sum(-2), w, info.tol, 1.0)
    M = info.make().mixing(G, losses=losses, precision=J.dtype)
    assert_close(M, sol.mixing, info.tol, 1.0)
    assert_close(info.make().apply(J, losses=losses, **kw).sum(-2), combine(w, J), info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("reference"))
@given(J=jacobians())
def test_matches_reference_loop(info: SolverInfo, J: Tensor) -> None:
    J = _cast(info, J)
    kw = _kw(info, J)
    expected = info.reference(J.double(), **{key: v.double() for key, v in kw.items()})
    assert_close(_run(info, J).double(), expected, info.ref_tol, _scale(J))


@pytest.mark.parametrize("info", _param("compile"))
def test_compiles_with_fullgraph(info: SolverInfo) -> None:
    torch._dynamo.reset()
    J = _cast(info, torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    kw = _kw(info, J)
    torch.manual_seed(0)  # solvers drawing from the global RNG draw the same numbers in both runs
    expected = info.make()(J, **kw)
    compiled = torch.compile(info.make().__call__, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    assert_close(compiled(J, **kw), expected, info.tol, _scale(J))


@pytest.mark.parametrize("info", _param("checkpoint"))
def test_state_dict_round_trip_continues_identically(info: SolverInfo) -> None:
    # the parent's own state and two blocks' (for_block), interleaved as impartial.backward calls them
    gen = torch.Generator().manual_seed(4)
    Js = [_cast(info, torch.randn(5, 11, generator=gen, dtype=torch.float64)) for _ in range(12)]
    a = info.make()
    calls = [lambda s: s, lambda s: s.for_block(0), lambda s: s.for_block(3)]
    for i, J in enumerate(Js[:6]):
        calls[i % 3](a)(J, **_kw(info, J))
    b = info.make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i, J in enumerate(Js[6:]):
        assert torch.equal(calls[i % 3](a)(J, **_kw(info, J)), calls[i % 3](b)(J, **_kw(info, J)))


def test_every_public_solver_has_a_row() -> None:
    import inspect

    from impartial import solvers

    made = {type(r.make()) for r in rows()}
    public = {getattr(solvers, n) for n in solvers.__all__}
    methods = {c for c in public if inspect.isclass(c) and issubclass(c, solvers.Solver)} - {solvers.Solver, GramSolver}
    missing = sorted(c.__name__ for c in methods - made)
    assert not missing, f"solvers with no registry row: {missing}"
