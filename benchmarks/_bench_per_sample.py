"""Models and steps for the per-sample benchmark (issue 14): every sample its own task.

Three small models as people train them with per-sample losses: an MLP (64 → 256 → 256 → 1, MSE), a convnet on
3 × 16 × 16 images (two conv + pool blocks, 10 classes) and a Transformer encoder on 16 tokens (vocabulary 100,
width 64, 2 layers of 2 heads, a learned positional table, mean pool, 10 classes).  ``step(...)`` returns a closure
for one training step's gradient (zero grads, forward, backward) one of three ways:

- ``plain``: ``L.mean().backward()``;
- ``impartial``: ``impartial.backward(L, model, block="params", solver=..., keep_norm=False)`` (the Gram from the
  per-sample rows of one backward; ``keep_norm=False`` so that the direction is ``Σ_b w_b ∇ℓ_b``, as TorchJD's);
- ``torchjd``: TorchJD's ``autogram.Engine(model, batch_dim=0)``: ``G = engine.compute_gramian(L)``, the weighting's
  ``w = weighting(G)``, ``L.backward(w)``.

Each variant has its own copy of the model (TorchJD's engine hooks the modules it is given; the same weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import impartial
from impartial import solvers

MODELS = ("mlp", "convnet", "transformer")
SIZES = (32, 128, 512)
WEIGHTINGS = ("Mean", "UPGrad")


class Positions(nn.Module):
    """A learned positional table, in a module of its own (TorchJD hooks modules that hold parameters)."""

    def __init__(self, T: int, E: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(T, E) * 0.02)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.table


class Encoder(nn.Module):
    def __init__(self, vocab: int = 100, T: int = 16, E: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, E), Positions(T, E)
        layer = nn.TransformerEncoderLayer(E, 2, 2 * E, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, classes)

    def forward(self, i: Tensor) -> Tensor:
        return self.head(self.enc(self.pos(self.emb(i))).mean(1))


@dataclass
class Case:
    name: str
    B: int
    model: nn.Module
    x: Tensor
    loss: Callable[[Tensor], Tensor]  # model output → per-sample losses [B]

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make(name: str, B: int, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        x, y = torch.randn(B, 64, generator=g), torch.randn(B, generator=g)
        return Case(name, B, model, x, lambda out: F.mse_loss(out.squeeze(1), y, reduction="none"))
    y = torch.randint(0, 10, (B,), generator=g)
    if name == "convnet":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip
        x = torch.randn(B, 3, 16, 16, generator=g)
    elif name == "transformer":
        model, x = Encoder(), torch.randint(0, 100, (B, 16), generator=g)
    else:
        raise ValueError(name)
    return Case(name, B, model, x, lambda out: F.cross_entropy(out, y, reduction="none"))


def step(case: Case, variant: str, weighting: str | None = None) -> Callable[[], object]:
    """One step's gradient, written to a copy of the model's ``.grad``; returns what the variant returns."""
    model = copy.deepcopy(case.model)
    x, loss = case.x, case.loss
    if variant == "plain":

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            loss(model(x)).mean().backward()

        return plain
    if variant == "impartial":
        solver = getattr(solvers, weighting or "Mean")()

        def ours() -> object:
            model.zero_grad(set_to_none=True)
            return impartial.backward(loss(model(x)), model, block="params", solver=solver, keep_norm=False)

        return ours
    from torchjd import aggregation
    from torchjd.autogram import Engine

    engine = Engine(model, batch_dim=0)
    weigh = getattr(aggregation, f"{weighting or 'Mean'}Weighting")()

    def torchjd() -> tuple[Tensor, Tensor]:
        model.zero_grad(set_to_none=True)
        L = loss(model(x))
        G = engine.compute_gramian(L)
        w = weigh(G)
        L.backward(w)
        return G, w

    return torchjd


def model_of(run: Callable[[], object]) -> nn.Module:
    """The model copy a step closure writes ``.grad`` to."""
    return next(c.cell_contents for c in run.__closure__ or () if isinstance(c.cell_contents, nn.Module))


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def reference(case: Case) -> Tensor:
    """``J`` ``[B, params]`` in float64: each sample's loss differentiated on its own (B backward passes)."""
    model = copy.deepcopy(case.model).double()
    x = case.x.double() if case.x.is_floating_point() else case.x
    L = case.loss(model(x))
    params = list(model.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(L[b], params, retain_graph=True)]) for b in range(case.B)
    ]
    return torch.stack(rows)
