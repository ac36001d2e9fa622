"""VAEs for heterogeneous tables with per-column likelihoods: VAE, IWAE, IWAE with DReG, and HI-VAE (two latents).

Each column j has its own likelihood (the paper's first experiments, after HI-VAE):

* ``real`` — Gaussian on the standardised value; ``pos`` — log-normal (Gaussian on the standardised log);
* ``count`` — Poisson on the *raw* counts (rate ``λ = exp(η)·mean``), so its log-likelihood and gradient
  grow with the counts' scale (wine's proline is ~750): the natural imbalance between columns;
* ``cat`` — categorical (softmax over the column's classes).

The encoder sees the standardised table with hidden entries zeroed plus the observation mask; every column
has its *own* decoder head, so the per-column tasks meet only at the latent samples (the blocks: ``z``, and
``z`` and ``s`` for HI-VAE).  Loss terms are summed over the observed entries of a row and averaged over rows;
:meth:`TabularVAE.loss` returns one task per column and the KL (or prior) terms as ``also``.

* HI-VAE — Nazábal, Olmos, Ghahramani, Valera, "Handling Incomplete Heterogeneous Data using VAEs", Pattern
  Recognition 2020: a categorical ``s`` (Gumbel-softmax) and ``z ~ q(z|x, s)`` with prior ``N(μ(s), I)``;
  each column's head reads ``z`` and ``s``.
* IWAE — Burda, Grosse, Salakhutdinov, ICLR 2016: ``K`` samples.  Its bound does not split over columns, but
  its gradient does: ``∇ log (1/K) Σₖ wₖ = Σₖ w̃ₖ ∇ log wₖ`` (``w̃`` the normalised weights, held constant), so
  column j's task is ``−Σₖ w̃ₖ log p(x_j|zₖ)`` and the prior/posterior part goes to ``also``; their sum has the
  IWAE gradient exactly.
* DReG — Tucker, Lawson, Gu, Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives",
  ICLR 2019: the IWAE bound, with the encoder's gradient estimated by ``Σₖ w̃ₖ² (∂ log wₖ/∂zₖ)(∂zₖ/∂φ)``, where
  ``log q`` in ``log wₖ`` holds its parameters constant; the decoder's gradient is IWAE's.  It splits over
  columns like IWAE's, with squared weights (see :class:`DReG`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data import Table

Batch = tuple[Tensor, Tensor]  # (x [n, C] raw values, observed [n, C] bool)


class Columns:
    """Per-column encoding (standardisation fitted on observed entries) and log-likelihoods."""

    def __init__(self, t: Table) -> None:
        self.kinds, self.n_classes = t.kinds, t.n_classes
        self.loc, self.scale = [], []
        for j, kind in enumerate(self.kinds):
            v = t.x[t.observed[:, j], j]
            v = v.log() if kind == "pos" else v.log1p() if kind == "count" else v
            self.loc.append(float(v.mean()) if kind != "cat" else 0.0)
            self.scale.append(float(v.std()) if kind != "cat" else 1.0)
        self.count_mean = [float(t.x[t.observed[:, j], j].mean()) for j in range(len(self.kinds))]
        self.n_params = [c if k == "cat" else 1 if k == "count" else 2 for k, c in zip(self.kinds, self.n_classes)]
        self.n_in = sum(c if k == "cat" else 1 for k, c in zip(self.kinds, self.n_classes)) + len(self.kinds)

    def encode(self, x: Tensor, obs: Tensor) -> Tensor:
        """Encoder input ``[n, n_in]``: standardised values (one-hot for categories), zero where hidden, + mask."""
        cols = []
        for j, kind in enumerate(self.kinds):
            v = x[:, j]
            if kind == "cat":
                cols.append(nn.functional.one_hot(v.long(), self.n_classes[j]).float() * obs[:, j, None])
                continue
            v = v.log() if kind == "pos" else v.log1p() if kind == "count" else v
            cols.append((((v - self.loc[j]) / self.scale[j]) * obs[:, j])[:, None])
        return torch.cat(cols + [obs.float()], dim=1)

    def nll(self, j: int, p: Tensor, x: Tensor) -> Tensor:
        """``−log p(x | params p)`` per row, up to a constant per column (the change of units)."""
        kind = self.kinds[j]
        if kind == "cat":
            # one-hot product rather than cross_entropy: p may carry IWAE's leading sample dim
            return -(p.log_softmax(-1) * nn.functional.one_hot(x.long(), p.shape[-1])).sum(-1)
        if kind == "count":
            log_rate = p[..., 0] + math.log(self.count_mean[j])
            return log_rate.exp() - x * log_rate + torch.lgamma(x + 1)
        v = x.log() if kind == "pos" else x
        v = (v - self.loc[j]) / self.scale[j]
        mu, log_sd = p[..., 0], p[..., 1].clamp(-5.0, 5.0)
        return 0.5 * ((v - mu) / log_sd.exp()).pow(2) + log_sd + 0.5 * math.log(2 * math.pi)

    def predict(self, j: int, p: Tensor) -> Tensor:
        """A point imputation from the params: mean (Gaussian), median (log-normal), rate, or the mode."""
        kind = self.kinds[j]
        if kind == "cat":
            return p.argmax(-1).float()
        if kind == "count":
            return (p[..., 0] + math.log(self.count_mean[j])).exp()
        v = p[..., 0] * self.scale[j] + self.loc[j]
        return v.exp() if kind == "pos" else v


class TabularVAE(nn.Module):
    """A Gaussian-latent VAE with one decoder head per column (the plain VAE of the zoo)."""

    def __init__(self, table: Table, z_dim: int = 4, hidden: int = 64, head: int = 16) -> None:
        super().__init__()
        self.cols = Columns(table)
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(self.cols.n_in, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.heads = nn.ModuleList(self._head(z_dim, head, n) for n in self.cols.n_params)

    @staticmethod
    def _head(n_in: int, n_hidden: int, n_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))

    @property
    def encoder_params(self) -> list[nn.Parameter]:
        """The parameters all columns share: the encoder's."""
        return list(self.encoder.parameters())

    def posterior(self, x: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(self.cols.encode(x, obs)).chunk(2, -1)
        return mu, logvar.clamp(-8.0, 8.0)

    def column_nll(self, z: Tensor, x: Tensor, obs: Tensor) -> list[Tensor]:
        """Per column: ``−log p(x_j | z)`` per row (``[..., n]``), zero at hidden entries."""
        return [self.cols.nll(j, h(z), x[:, j]) * obs[:, j] for j, h in enumerate(self.heads)]

    def loss(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        x, obs = batch
        mu, logvar = self.posterior(x, obs)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        return [t.mean() for t in self.column_nll(z, x, obs)], [kl]

    @torch.no_grad()
    def impute(self, x: Tensor, obs: Tensor) -> Tensor:
        """Every entry predicted from the observed ones (decoded at the posterior mean) ``[n, C]``."""
        mu, _ = self.posterior(x, obs)
        return torch.stack([self.cols.predict(j, h(mu)) for j, h in enumerate(self.heads)], dim=1)


class IWAE(TabularVAE):
    """Importance-weighted VAE with ``K`` samples; per-column tasks carry the normalised weights."""

    def __init__(self, table: Table, K: int = 8, **kw) -> None:
        super().__init__(table, **kw)
        self.K = K

    def _sample(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(mu, logvar, eps, z)``: the posterior and ``K`` reparameterised samples ``z [K, n, z_dim]``."""
        mu, logvar = self.posterior(*batch)
        eps = torch.randn((self.K, *mu.shape), dtype=mu.dtype)
        return mu, logvar, eps, mu + (0.5 * logvar).exp() * eps

    def _log_weights(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        mu, logvar, eps, z = self._sample(batch)
        log_prior_ratio = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + 0.5 * logvar).sum(-1)  # log p(z) − log q(z|x)
        return self.column_nll(z, *batch), log_prior_ratio  # each nll [K, n]

    def loss(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        nll, log_prior_ratio = self._log_weights(batch)
        w = torch.softmax(log_prior_ratio - sum(nll), dim=0).detach()  # normalised, held constant (see top)
        return [(w * t).sum(0).mean() for t in nll], [-(w * log_prior_ratio).sum(0).mean()]

    def bound(self, batch: Batch) -> Tensor:
        """The IWAE bound ``log (1/K) Σₖ wₖ`` (up to per-column constants), averaged over rows."""
        nll, log_prior_ratio = self._log_weights(batch)
        return (torch.logsumexp(log_prior_ratio - sum(nll), dim=0) - math.log(self.K)).mean()


class DReG(IWAE):
    """IWAE trained with the doubly-reparameterised estimator (DReG) of its encoder gradient.

    With ``log wₖ = log p(x|zₖ) + log p(zₖ) − log q(zₖ|x)`` and ``w̃`` the normalised weights (held constant),
    DReG estimates the bound's encoder gradient by ``Σₖ w̃ₖ² (∂ log wₖ/∂zₖ)(∂zₖ/∂φ)``: the surrogate
    ``Σₖ w̃ₖ² log wₖ`` with ``q``'s parameters held constant inside ``log q``, so only the path through ``zₖ``
    remains.  The decoder keeps IWAE's gradient ``Σₖ w̃ₖ ∇_θ log p(x|zₖ)``.  As in the paper's reference code,
    each column's task has two parts: ``−Σₖ w̃ₖ² log p(x_j|zₖ)`` with the head's parameters held constant (it
    reaches the encoder only, through ``z``) and ``−Σₖ w̃ₖ log p(x_j|sg(zₖ))`` (it reaches the head only);
    ``also`` is ``−Σₖ w̃ₖ² (log p(zₖ) − log q(zₖ))``.  So the block at ``z`` sees the DReG task gradients.
    """

    def loss(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        mu, logvar, _, z = self._sample(batch)
        decoder = self.column_nll(z.detach(), *batch)  # the heads' part: IWAE's gradient
        log_prior_ratio = self._log_prior_ratio(z, mu.detach(), logvar.detach())  # q's parameters held constant
        w = torch.softmax(log_prior_ratio.detach() - sum(decoder).detach(), dim=0)  # [K, n]
        encoder = self._nll_through_z(z, *batch)
        tasks = [((w.pow(2) * e).sum(0) + (w * d).sum(0)).mean() for e, d in zip(encoder, decoder)]
        return tasks, [-(w.pow(2) * log_prior_ratio).sum(0).mean()]

    def _nll_through_z(self, z: Tensor, x: Tensor, obs: Tensor) -> list[Tensor]:
        """:meth:`column_nll` with every head's parameters held constant: its gradient reaches ``z`` only."""
        out = []
        for j, head in enumerate(self.heads):
            frozen = {name: p.detach() for name, p in head.named_parameters()}
            out.append(self.cols.nll(j, torch.func.functional_call(head, frozen, (z,)), x[:, j]) * obs[:, j])
        return out

    @staticmethod
    def _log_prior_ratio(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        """``log p(z) − log q(z | mu, logvar)`` per sample ``[K, n]`` (standard-normal prior)."""
        return (-0.5 * z.pow(2) + 0.5 * (z - mu).pow(2) / logvar.exp() + 0.5 * logvar).sum(-1)


class HIVAE(TabularVAE):
    """HI-VAE: ``s ~ Cat`` (Gumbel-softmax, ``n_s`` components) and ``z ~ q(z|x, s)``; heads read ``z`` and ``s``."""

    def __init__(self, table: Table, n_s: int = 4, tau: float = 1.0, **kw) -> None:
        super().__init__(table, **kw)
        hidden, head = kw.get("hidden", 64), kw.get("head", 16)
        self.n_s, self.tau = n_s, tau
        self.enc_s = nn.Sequential(nn.Linear(self.cols.n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_s))
        self.encoder = nn.Sequential(
            nn.Linear(self.cols.n_in + n_s, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.z_dim)
        )
        self.prior_mu = nn.Linear(n_s, self.z_dim)
        # each head has its own input layers for z and s, so the columns' paths meet at z and at s themselves
        self.heads_s = nn.ModuleList(nn.Linear(n_s, head, bias=False) for _ in self.cols.n_params)

    @property
    def encoder_params(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.enc_s.parameters())

    def _encode(self, x: Tensor, obs: Tensor, hard: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = self.cols.encode(x, obs)
        logits = self.enc_s(h)
        s = (
            nn.functional.one_hot(logits.argmax(-1), self.n_s).float()
            if hard
            else nn.functional.gumbel_softmax(logits, tau=self.tau)
        )
        mu, logvar = self.encoder(torch.cat([h, s], 1)).chunk(2, -1)
        return logits, s, mu, logvar.clamp(-8.0, 8.0)

    def _decode(self, j: int, z: Tensor, s: Tensor) -> Tensor:
        first, rest = self.heads[j][0], self.heads[j][1:]
        return rest(first(z) + self.heads_s[j](s))

    def loss(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        x, obs = batch
        logits, s, mu, logvar = self._encode(x, obs, hard=False)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        tasks = [(self.cols.nll(j, self._decode(j, z, s), x[:, j]) * obs[:, j]).mean() for j in range(len(self.heads))]
        pm = self.prior_mu(s)
        kl_z = 0.5 * ((mu - pm).pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        q = logits.softmax(-1)
        kl_s = (q * (q.clamp_min(1e-12).log() + math.log(self.n_s))).sum(-1).mean()  # uniform p(s)
        return tasks, [kl_z, kl_s]

    @torch.no_grad()
    def impute(self, x: Tensor, obs: Tensor) -> Tensor:
        _, s, mu, _ = self._encode(x, obs, hard=True)
        return torch.stack([self.cols.predict(j, self._decode(j, mu, s)) for j in range(len(self.heads))], dim=1)


MODELS = {"vae": TabularVAE, "iwae": IWAE, "dreg": DReG, "hivae": HIVAE}
