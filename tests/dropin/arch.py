"""Drawn multi-task architectures: a trunk of feature layers, one or two latents, heads, and the roles of
every activation and parameter (which hooks ``impartial.backward`` promises to fire exactly once).

    x ─ inp ─ h0 ─ trunk[0] ─ h1 ─ … ─ hout ─┬─ lat_z ─ z ─┬─ head 0 ─ y0 ─ task 0          (one task)
                                              │             ├─ head 1 ─ y1 ─ tasks 1, 2      (a shared head)
                                              ├─ lat_s ─ s ─┘  (second latent: every head reads z and s)
                                              └─ lower ─ task k-1                         (a loss joining lower)

Heads read the latents through ``read``: ``"linear"`` (a Linear, which saves the latent), ``"relu"`` or
``"cat"`` (ops that save nothing of the latent).  ``tie`` makes head 0 also read ``z`` through ``inp``'s
weight (weight tying).  ``skip`` adds a long skip ``hout = h_n + h0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from dropin.features import FEATURES, SPECIAL, B, T, W

DTYPE = torch.float64
MODES = ("auto", "params", "marked")
#: frozen parameters are tested on their own (issue 10 point 5: today they raise), not drawn into architectures
DRAWN = tuple(f for f in FEATURES if f != "frozen")


@dataclass(frozen=True)
class Arch:
    features: tuple[str, ...] = ("linear",)
    latents: int = 1
    read: str = "linear"
    #: tasks per head: (1, 2) is a one-task head and a head shared by two tasks (two columns of its output)
    groups: tuple[int, ...] = (1, 1)
    lower: bool = False
    tie: bool = False
    skip: bool = False
    also: tuple[str, ...] = ()
    #: the input ``x`` requires grad (a leaf that is not a parameter)
    x_grad: bool = False
    seed: int = 0

    @property
    def k(self) -> int:
        return sum(self.groups) + self.lower

    @property
    def tied_block(self) -> bool:
        """Whether ``inp.weight`` is an automatic leaf block (head 0 is one task, raw, and tied to it)."""
        return self.tie and self.groups[0] == 1

    @property
    def latent_block(self) -> bool:
        """Whether the latents are automatic blocks: two or more tasks, at least one arriving raw."""
        return 1 in self.groups

    def saved(self, latent: str) -> bool:
        """Whether every head reads ``latent`` through an op that saves it (autograd keeps a handle on it).  The
        tie's ``F.linear(z, inp.weight)`` saves ``z``, but the heads read it through ``read`` as well: with
        ``relu`` or ``cat`` the other heads read it only through ops that save nothing (docs/backward.md: its hooks
        then fire per task too; found by the thorough profile, which drew a tie with a relu read)."""
        return self.read == "linear"


@st.composite
def archs(draw: st.DrawFn, features: tuple[str, ...] = DRAWN, max_features: int = 3) -> Arch:
    groups = draw(st.lists(st.integers(1, 2), min_size=1, max_size=3).filter(lambda g: sum(g) >= 2))
    return Arch(
        features=tuple(draw(st.lists(st.sampled_from(features), min_size=1, max_size=max_features))),
        latents=draw(st.integers(1, 2)),
        read=draw(st.sampled_from(["linear", "relu", "cat"])),
        groups=tuple(groups),
        lower=draw(st.booleans()),
        tie=draw(st.booleans()),
        skip=draw(st.booleans()),
        also=draw(st.sampled_from([(), ("kl",), ("reg",), ("kl", "reg")])),
        x_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


class Head(nn.Module):
    def __init__(self, latents: int, read: str, cols: int) -> None:
        super().__init__()
        self.read = read
        self.ins = nn.ModuleList(
            [nn.Linear(latents * W, W)] if read == "cat" else [nn.Linear(W, W) for _ in range(latents)]
        )
        self.out = nn.Linear(W, cols)

    def forward(self, lats: list[Tensor], tied: Tensor | None = None) -> Tensor:
        if self.read == "cat":
            y = self.ins[0](torch.cat(lats, -1))
        else:
            y = sum(lin(z.relu() if self.read == "relu" else z) for lin, z in zip(self.ins, lats))
        if tied is not None:
            y = y + F.linear(lats[0], tied)
        return self.out(torch.tanh(y))


class Tap:
    """Where the model reports its activations (the hook harness overrides ``act``)."""

    def act(self, name: str, t: Tensor, role: str) -> Tensor:
        return t


class Net(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        with torch.random.fork_rng():
            torch.manual_seed(arch.seed)
            self.inp = nn.Linear(W, W)
            self.trunk = nn.ModuleList((FEATURES | SPECIAL)[f]() for f in arch.features)
            self.lat = nn.ModuleList(nn.Linear(W, W) for _ in range(arch.latents))
            self.heads = nn.ModuleList(Head(arch.latents, arch.read, c) for c in arch.groups)
            self.lower = nn.Linear(W, 1) if arch.lower else None
        self.to(DTYPE)
        gen = torch.Generator().manual_seed(arch.seed + 1)
        self.x = torch.randn(B, T, W, generator=gen, dtype=DTYPE)
        self.targets = torch.randn(arch.k, generator=gen, dtype=DTYPE)

    def shared(self) -> list[nn.Parameter]:
        """The shared parameters: the trunk (input layer, features) and the latents (frozen ones included)."""
        return [*self.inp.parameters(), *self.trunk.parameters(), *self.lat.parameters()]

    def roles(self) -> dict[str, str]:
        """Each parameter's role: ``trunk``, ``tied`` (inp.weight when tied), ``head1``, ``head2``, ``lower``."""
        out = {n: "trunk" for n, _ in self.named_parameters()}
        for i, c in enumerate(self.arch.groups):
            out.update({f"heads.{i}.{n}": f"head{c}" for n, _ in self.heads[i].named_parameters()})
        if self.lower is not None:
            out.update({f"lower.{n}": "lower" for n, _ in self.lower.named_parameters()})
        if self.arch.tie:
            out["inp.weight"] = "tied"
        return out

    def input(self, micro: int = 0) -> Tensor:
        x = (
            self.x
            if micro == 0
            else torch.randn(B, T, W, generator=torch.Generator().manual_seed(self.arch.seed + 7 * micro), dtype=DTYPE)
        )
        return x.clone().requires_grad_(self.arch.x_grad)

    def losses(self, x: Tensor, tap: Tap | None = None, micro: int = 0) -> tuple[list[Tensor], list[Tensor], dict]:
        """``(tasks, also, acts)``; the RNG is reseeded so that every copy draws the same Dropout masks."""
        with torch.random.fork_rng():
            torch.manual_seed(self.arch.seed + 2 + micro)
            return self._losses(x, tap or Tap())

    def _losses(self, x: Tensor, tap: Tap) -> tuple[list[Tensor], list[Tensor], dict]:
        a = self.arch
        if a.x_grad:
            tap.act("x", x, "input")
        h0 = h = tap.act("h0", self.inp(x), "trunk")
        for j, layer in enumerate(self.trunk):
            last = j == len(self.trunk) - 1 and not a.skip
            h = tap.act(f"h{j + 1}", layer(h), "out" if last else "trunk")
        hout = tap.act("hout", h + h0, "out") if a.skip else h
        lats = [tap.act(n, lat(hout), "latent") for n, lat in zip("zs", self.lat)]
        tasks, ys, t = [], [], 0
        for i, (head, c) in enumerate(zip(self.heads, a.groups)):
            y = tap.act(f"y{i}", head(lats, self.inp.weight if a.tie and i == 0 else None), f"head{c}")
            ys.append(y)
            for j in range(c):
                tasks.append((y[..., j] - self.targets[t]).pow(2).mean())
                t += 1
        if self.lower is not None:
            y = tap.act("ylow", self.lower(hout), "lower")
            tasks.append((y[..., 0] - self.targets[t]).pow(2).mean())
        also = []
        if "kl" in a.also:
            also.append(1e-2 * sum(z.pow(2).mean() for z in lats))
        if "reg" in a.also:
            also.append(1e-3 * sum(p.pow(2).sum() for p in self.inp.parameters()))
        acts = {"z": lats[0], "s": lats[1] if len(lats) > 1 else None, "hout": hout, "y": ys}
        return tasks, also, acts

    def marked(self, acts: dict) -> list[Tensor]:
        """The blocks to mark: the latents (and the trunk output where a loss joins lower)."""
        return [t for t in (acts["z"], acts["s"]) if t is not None] + ([acts["hout"]] if self.arch.lower else [])

    def blocks(self, mode: str, acts: dict) -> list[Tensor]:
        """The blocks of ``mode``, top-down, by the rule of ``impartial.graph`` worked out by hand on this
        architecture: a shared head's output; the latents where a one-task head reads them (a raw stream);
        the trunk output where a loss joins lower; ``inp.weight`` where head 0 is one task and tied to it."""
        a = self.arch
        if mode == "marked":
            return self.marked(acts)
        assert mode == "auto", mode
        out = [y for y, c in zip(acts["y"], a.groups) if c > 1]
        if a.latent_block:
            out += [t for t in (acts["z"], acts["s"]) if t is not None]
        if a.lower:
            out.append(acts["hout"])
        if a.tied_block:
            out.append(self.inp.weight)
        return out
