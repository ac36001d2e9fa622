"""Small test models with known impartiality blocks (float64 by default, deterministic forward passes).

Each model has ``trunk`` (the shared module), ``heads`` (one per task) and ``losses(x)`` returning
``(tasks, also, acts)``: the task losses, the non-task terms, and the named activations where blocks sit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DTYPE = torch.float64


def _mse(y: Tensor) -> Tensor:
    return y.pow(2).mean()


class MLP(nn.Module):
    """MLP trunk → z → k linear heads.  Block: ``z``."""

    def __init__(self, d_in: int = 5, d_z: int = 6, k: int = 3, d_out: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_z))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(d_z, d_out), nn.Tanh()) for _ in range(k))

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        z = self.trunk(x)
        tasks = [_mse(h(z) - (i + 1)) * (1 + i) for i, h in enumerate(self.heads)]
        return tasks, [1e-2 * z.pow(2).sum()], {"z": z}


class ConvNet(nn.Module):
    """Conv → BatchNorm → ReLU → pool trunk, then k heads.  Block: the pooled features."""

    def __init__(self, k: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(2, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(4 * channels, 1) for _ in range(k))

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        f = self.trunk(x)
        tasks = [_mse(h(f) - i) for i, h in enumerate(self.heads)]
        return tasks, [], {"z": f}


class VAE(nn.Module):
    """A multimodal VAE: encoder → (μ, log σ²) → z = μ + ε σ → one decoder per modality.

    Tasks are the per-modality reconstruction losses; the KL term is ``also``.  Block: ``z``.  ``eps`` is
    drawn once at construction so that repeated forward passes are identical.
    """

    def __init__(self, dims: tuple[int, ...] = (4, 3, 5), d_z: int = 3, hidden: int = 8, batch: int = 6) -> None:
        super().__init__()
        self.dims = dims
        self.trunk = nn.Sequential(nn.Linear(sum(dims), hidden), nn.Tanh(), nn.Linear(hidden, 2 * d_z))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(d_z, hidden), nn.Tanh(), nn.Linear(hidden, d)) for d in dims)
        self.register_buffer("eps", torch.randn(batch, d_z, generator=torch.Generator().manual_seed(7)))
        #: the first row of ``eps`` this model's batch uses (a rank's slice of the batch, in distributed tests)
        self.eps_offset = 0

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        mu, logvar = self.trunk(x).chunk(2, dim=-1)
        o = self.eps_offset
        z = mu + self.eps[o : o + x.shape[0]].to(x.dtype) * (0.5 * logvar).exp()
        parts = x.split(list(self.dims), dim=-1)
        tasks = [(h(z) - p).pow(2).sum(-1).mean() for h, p in zip(self.heads, parts)]
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return tasks, [kl], {"z": z}


class HIVAE(nn.Module):
    """Two latents ``z`` and ``s``, each read by every head (HI-VAE-like).  Blocks: ``z`` and ``s``."""

    def __init__(self, d_in: int = 6, d_z: int = 3, d_s: int = 2, k: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.to_z, self.to_s = nn.Linear(hidden, d_z), nn.Linear(hidden, d_s)
        self.heads = nn.ModuleList(nn.Linear(d_z + d_s, 2) for _ in range(k))

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        h = self.trunk(x)
        z, s = torch.tanh(self.to_z(h)), torch.sigmoid(self.to_s(h))
        tasks = [_mse(head(torch.cat([z, s], -1)) - i) for i, head in enumerate(self.heads)]
        return tasks, [1e-2 * (z.pow(2).sum() + s.pow(2).sum())], {"z": z, "s": s}

    def shared(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.to_z.parameters(), *self.to_s.parameters()]


class LowerJoin(nn.Module):
    """Heads 0 and 1 on ``z = g(h)``, head 2 directly on ``h = f(x)``: a block below another.

    Blocks: ``z`` (tasks 0, 1) and ``h`` (tasks 0, 1, 2; below ``z``).
    """

    def __init__(self, d_in: int = 5, d_h: int = 6, d_z: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, d_h), nn.Tanh())
        self.mid = nn.Linear(d_h, d_z)
        self.heads = nn.ModuleList([nn.Linear(d_z, 2), nn.Linear(d_z, 2), nn.Linear(d_h, 2)])

    def losses(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        h = self.trunk(x)
        z = torch.tanh(self.mid(h))
        tasks = [_mse(self.heads[0](z) - 1), _mse(self.heads[1](z) + 1), _mse(self.heads[2](h) - 0.5)]
        return tasks, [], {"z": z, "h": h}

    def shared(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.mid.parameters()]


def make(name: str, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """A fresh float64 model (same weights for the same seed) and its input batch: ``(model, x)``."""
    torch.manual_seed(seed)
    model = {"mlp": MLP, "conv": ConvNet, "vae": VAE, "hivae": HIVAE, "lower": LowerJoin}[name]().to(DTYPE)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = {"mlp": (6, 5), "conv": (5, 2, 4, 4), "vae": (6, 12), "hivae": (6, 6), "lower": (6, 5)}[name]
    return model, torch.randn(shape, generator=gen, dtype=DTYPE)


def shared_params(model: nn.Module) -> list[nn.Parameter]:
    return model.shared() if hasattr(model, "shared") else list(model.trunk.parameters())


MODELS = ["mlp", "conv", "vae", "hivae", "lower"]
