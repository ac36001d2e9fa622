"""The Lightning recipe of ``docs/lightning.md``: manual optimisation with ``impartial.backward``.

Runs when ``lightning`` is installed (the ``lightning`` extra), skipped otherwise.  The Trainer's run equals a
plain loop with the same optimizer and solver bit for bit, and the solver's state goes through Lightning's
checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import impartial
from impartial.solvers import GradNorm, Solver
from models import make, shared_params

L = pytest.importorskip("lightning")


class MultiTask(L.LightningModule):
    """The recipe: ``automatic_optimization = False``; ``impartial.backward`` replaces ``manual_backward``."""

    def __init__(self, net: torch.nn.Module, solver: Solver) -> None:
        super().__init__()
        self.net, self.solver = net, solver
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        tasks, also, _ = self.net.losses(batch)
        report = impartial.backward(tasks, shared_params(self.net), solver=self.solver, also=also)
        opt.step()
        self.log("loss", sum(t.detach() for t in tasks))
        self.last_report = report

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    # the solver's state (GradNorm's weights, EMAs, generators) rides along in Lightning's checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["solver"] = self.solver.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.solver.load_state_dict(checkpoint["solver"])


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _loader(x: torch.Tensor) -> torch.utils.data.DataLoader:
    # one fixed batch per step (the test models' forward passes are deterministic for a fixed batch)
    return torch.utils.data.DataLoader([x] * 8, batch_size=None)


def test_lightning_manual_optimisation_equals_a_plain_loop(tmp_path: Path) -> None:
    net, x = make("vae")
    plain, plain_solver = copy.deepcopy(net), GradNorm(lr=0.2)
    module = MultiTask(net, GradNorm(lr=0.2))
    trainer = _trainer(4)
    trainer.fit(module, _loader(x))
    assert module.last_report.blocks, "impartial.backward found no block"

    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        tasks, also, _ = plain.losses(x)
        impartial.backward(tasks, shared_params(plain), solver=plain_solver, also=also)
        opt.step()
    for (name, p), q in zip(plain.named_parameters(), module.net.parameters()):
        assert torch.equal(p, q), f"{name}: max |Δ| = {float((p - q).abs().max()):.3e}"
    state = plain_solver.state_dict()
    assert torch.equal(module.solver.state_dict()["weights"], state["weights"])
    assert not torch.equal(state["weights"], torch.ones_like(state["weights"]))  # the state did move

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored = MultiTask(copy.deepcopy(net), GradNorm(lr=0.2))
    restored.on_load_checkpoint(torch.load(path, weights_only=False))
    for key, value in module.solver.state_dict().items():
        assert torch.equal(restored.solver.state_dict()[key], value), key
