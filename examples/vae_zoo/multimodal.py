"""Multimodal VAEs on the digits trio: MVAE (product of experts), MMVAE (mixture), MoPoE (mixture of products).

Every model has one Gaussian encoder ("expert") and one decoder per modality, and differs only in how the
experts are fused and which ELBO terms are trained.  :meth:`MultimodalVAE.loss` returns the *tasks* — one
negative log-likelihood per modality, summed over every ELBO term that reconstructs it — and the KL terms,
which are not tasks (they go through ``also=``).  Decoders of different modalities never share a layer, so
the task paths meet exactly at the latent samples ``z``: those are the impartiality blocks.

* MVAE — Wu & Goodman, "Multimodal Generative Models for Scalable Weakly-Supervised Learning", NeurIPS 2018:
  ``q(z|X) ∝ p(z) Πₘ qₘ(z|xₘ)``; trained on the joint ELBO plus each unimodal ELBO (sub-sampled training).
* MMVAE — Shi, Siddharth, Paige, Torr, "Variational Mixture-of-Experts Autoencoders for Multi-Modal Deep
  Generative Models", NeurIPS 2019: ``q(z|X) = (1/M) Σₘ qₘ(z|xₘ)``, stratified: one ``z`` per expert, each
  decoded into every modality.  KL: the mean of the experts' KLs (the upper bound MoPoE also uses), not
  the paper's IWAE/DReG estimator.
* MoPoE — Sutter, Daunhawer, Vogt, "Generalized Multimodal ELBO", ICLR 2021: a mixture over all non-empty
  subsets S of products ``Π_{m∈S} qₘ``, one ``z`` per subset, each decoded into every modality.

At test time any subset of modalities may be given (missing ones are ``None`` or absent from the dict).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from .data import ALPHABET, WORD_LEN


def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out)
    )


def product(experts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Product of Gaussian experts: precisions add, means are precision-weighted."""
    prec = torch.stack([(-lv).exp() for _, lv in experts])
    mu = (torch.stack([m for m, _ in experts]) * prec).sum(0) / prec.sum(0)
    return mu, -prec.sum(0).log()


def kl_std_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, e^logvar) ‖ N(0, I)), summed over latent dims, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


def sample(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


class MultimodalVAE(nn.Module):
    """Base class: per-modality Gaussian encoders and decoders; subclasses choose the fusion and the ELBO.

    ``dims`` maps each modality to its flat input size; ``text`` is categorical over ``ALPHABET`` at each of
    ``WORD_LEN`` positions, every other modality a Gaussian with fixed standard deviation ``sigma`` (the
    *likelihood scaling*: a smaller ``sigma`` weighs pixels more against the text).
    """

    def __init__(self, dims: dict[str, int], z_dim: int = 16, hidden: int = 128, sigma: float = 0.2) -> None:
        super().__init__()
        self.names = list(dims)
        self.z_dim, self.sigma = z_dim, sigma
        self.encoders = nn.ModuleDict({m: mlp(n, hidden, 2 * z_dim) for m, n in dims.items()})
        self.decoders = nn.ModuleDict({m: mlp(z_dim, hidden, n) for m, n in dims.items()})

    # -- pieces ------------------------------------------------------------------------------------------
    def expert(self, m: str, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoders[m](x.flatten(1)).chunk(2, -1)
        return mu, logvar.clamp(-8.0, 8.0)  # clamp: a vanishing variance makes the product's precision inf

    def nll(self, m: str, z: Tensor, x: Tensor) -> Tensor:
        """−log p(xₘ | z), summed over the modality's dimensions, averaged over the batch."""
        out = self.decoders[m](z)
        if m == "text":
            logits = out.view(-1, WORD_LEN, len(ALPHABET))
            return nn.functional.cross_entropy(logits.transpose(1, 2), x.argmax(-1), reduction="sum") / len(x)
        x = x.flatten(1)
        sq = ((x - torch.sigmoid(out)) / self.sigma).pow(2)
        return 0.5 * sq.sum() / len(x) + x.shape[1] * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    def mean(self, m: str, z: Tensor) -> Tensor:
        """The decoder's output for modality m: pixel means, or per-position character probabilities."""
        out = self.decoders[m](z)
        if m == "text":
            return out.view(-1, WORD_LEN, len(ALPHABET)).softmax(-1)
        return torch.sigmoid(out)

    def experts(self, x: dict[str, Tensor | None]) -> dict[str, tuple[Tensor, Tensor]]:
        return {m: self.expert(m, x[m]) for m in self.names if x.get(m) is not None}

    @property
    def encoder_params(self) -> list[nn.Parameter]:
        """The parameters all modalities share (through the fused posterior): the encoders'."""
        return list(self.encoders.parameters())

    # -- what subclasses define -----------------------------------------------------------------------
    def components(self, experts: dict[str, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """The Gaussian components of ``q(z|given)``, a uniform mixture (one component for a PoE)."""
        raise NotImplementedError

    def loss(self, x: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(tasks, also)``: per-modality NLLs in ``self.names`` order, and the KL terms (not tasks)."""
        return self._mixture_loss(x, self.experts(x))

    def _mixture_loss(
        self, x: dict[str, Tensor], experts: dict[str, tuple[Tensor, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        comps = self.components(experts)
        # one z per component, shared by all modalities, so that z is where their paths meet
        tasks: list = [0.0] * len(self.names)
        kls = []
        for mu, lv in comps:
            z = sample(mu, lv)
            for i, m in enumerate(self.names):
                tasks[i] = tasks[i] + self.nll(m, z, x[m]) / len(comps)
            kls.append(kl_std_normal(mu, lv) / len(comps))
        return tasks, [sum(kls)]

    # -- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, x: dict[str, Tensor | None]) -> Tensor:
        """Posterior mean of ``q(z | given modalities)`` (the mixture's mean for MMVAE / MoPoE)."""
        return torch.stack([mu for mu, _ in self.components(self.experts(x))]).mean(0)

    @torch.no_grad()
    def generate(self, x: dict[str, Tensor | None], targets: list[str] | None = None) -> dict[str, Tensor]:
        """Decode every target modality from the given ones: the mixture's predictive mean over components,
        each decoded at its posterior mean.  Output shapes equal the data's (text ``[n, WORD_LEN, |ALPHABET|]``)."""
        comps = self.components(self.experts(x))
        return {m: torch.stack([self.mean(m, mu) for mu, _ in comps]).mean(0) for m in (targets or self.names)}


class MVAE(MultimodalVAE):
    """Product of experts with a standard-normal prior expert; joint ELBO + each unimodal ELBO."""

    def components(self, experts: dict[str, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        mu0 = next(iter(experts.values()))[0]
        prior = (torch.zeros_like(mu0), torch.zeros_like(mu0))
        return [product([prior, *experts.values()])]

    def loss(self, x: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        experts = self.experts(x)
        tasks, also = self._mixture_loss(x, experts)  # the joint ELBO
        for i, m in enumerate(self.names):  # unimodal ELBOs: each reconstructs its own modality only
            mu, lv = self.components({m: experts[m]})[0]
            tasks[i] = tasks[i] + self.nll(m, sample(mu, lv), x[m])
            also.append(kl_std_normal(mu, lv))
        return tasks, also


class MMVAE(MultimodalVAE):
    """Uniform mixture of the unimodal experts."""

    def components(self, experts: dict[str, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        return list(experts.values())


class MoPoE(MultimodalVAE):
    """Uniform mixture over all non-empty subsets of the given experts of their products (no prior expert)."""

    def components(self, experts: dict[str, tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        e = list(experts.values())
        return [product(list(s)) for r in range(1, len(e) + 1) for s in itertools.combinations(e, r)]


MODELS = {"mvae": MVAE, "mmvae": MMVAE, "mopoe": MoPoE}
