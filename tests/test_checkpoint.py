"""Checkpoints and determinism of whole training loops (model + optimizer + solver state, CPU, same seeds).

A run stopped after ``N`` steps, saved with ``torch.save`` and resumed into fresh objects ends bit-identical to
an uninterrupted run; leaving the solver's state out of the checkpoint does not (so the state is what carries
the run, and the comparison can fail).  Randomised solvers with a seeded generator repeat bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import impartial
from impartial.solvers import NSGD, GradDrop, GradNorm, GradVac, NashMTL, PCGrad, Random, Solver
from models import make, shared_params

N, M = 4, 4  # steps before and after the checkpoint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


STATEFUL: dict[str, Callable[[], Solver]] = {
    "GradNorm": lambda: GradNorm(lr=0.2),
    "GradNorm(grad)": lambda: GradNorm(progress="grad", reference_step=2, lr=0.2),
    # the reference norms are taken at step 2, before the checkpoint, and must survive it
    "NSGD": lambda: NSGD(reference_step=2),
    "GradVac": lambda: GradVac(beta=0.5, generator=_gen()),
    "NashMTL": lambda: NashMTL(update_weights_every=3),
    "PCGrad": lambda: PCGrad(generator=_gen()),
    "GradDrop": lambda: GradDrop(generator=_gen()),
}


def _fresh(model_name: str, make_solver: Callable[[], Solver]):
    model, x = make(model_name)
    return model, x, torch.optim.Adam(model.parameters(), lr=5e-2), make_solver()


def _train(model, x, opt, solver, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        tasks, also, _ = model.losses(x)
        impartial.backward(tasks, shared_params(model), solver=solver, also=also)
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _resumed(model_name: str, make_solver: Callable[[], Solver], path: Path, solver_state: bool = True):
    model, x, opt, solver = _fresh(model_name, make_solver)
    _train(model, x, opt, solver, N)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "solver": solver.state_dict()}, path)
    del model, opt, solver
    model, x, opt, solver = _fresh(model_name, make_solver)
    ckpt = torch.load(path)  # weights_only=True (the default): solver state is tensors and ints
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    if solver_state:
        solver.load_state_dict(ckpt["solver"])
    _train(model, x, opt, solver, M)
    return _params(model)


def _uninterrupted(model_name: str, make_solver: Callable[[], Solver]) -> list[torch.Tensor]:
    model, x, opt, solver = _fresh(model_name, make_solver)
    _train(model, x, opt, solver, N + M)
    return _params(model)


@pytest.mark.parametrize("model_name", ["conv", "vae"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_resumed_run_is_bit_identical_to_an_uninterrupted_run(name: str, model_name: str, tmp_path: Path) -> None:
    expected = _uninterrupted(model_name, STATEFUL[name])
    got = _resumed(model_name, STATEFUL[name], tmp_path / "ckpt.pt")
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"parameter {i}: max |Δ| = {float((a - b).abs().max()):.3e}"


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resuming_without_the_solver_state_changes_the_run(name: str, tmp_path: Path) -> None:
    """The loops above are long enough for the solver state to matter (the bit-identity test can fail)."""
    expected = _uninterrupted("conv", STATEFUL[name])
    got = _resumed("conv", STATEFUL[name], tmp_path / "ckpt.pt", solver_state=False)
    assert any(not torch.equal(a, b) for a, b in zip(expected, got))


def test_random_weighting_resumes_bit_identically(tmp_path: Path) -> None:
    make_solver = lambda: Random(generator=_gen())  # noqa: E731
    expected = _uninterrupted("mlp", make_solver)
    got = _resumed("mlp", make_solver, tmp_path / "ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


RANDOMISED: dict[str, Callable[[int], Solver]] = {
    "PCGrad": lambda seed: PCGrad(generator=_gen(seed)),
    "GradDrop": lambda seed: GradDrop(generator=_gen(seed)),
    "Random": lambda seed: Random(generator=_gen(seed)),
    "GradVac": lambda seed: GradVac(generator=_gen(seed)),
}


@pytest.mark.parametrize("name", list(RANDOMISED))
def test_seeded_randomised_solvers_repeat_and_other_seeds_differ(name: str) -> None:
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("other", 1)):
        torch.manual_seed(123 + len(runs))  # the global RNG differs between runs: only the generator counts
        model, x, opt, _ = _fresh("hivae", lambda: None)
        _train(model, x, opt, RANDOMISED[name](seed), N + M)
        runs[key] = _params(model)
    assert all(torch.equal(a, b) for a, b in zip(runs["a"], runs["b"]))
    assert any(not torch.equal(a, b) for a, b in zip(runs["a"], runs["other"]))
