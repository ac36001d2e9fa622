"""Models for the end-to-end step benchmark: a multimodal VAE and an MLP trunk of ~1M parameters with k heads.

Each ``make_*`` returns a :class:`Setup`: ``forward()`` builds the graph and returns
``(task losses, non-task losses, the shared representation)``; ``shared`` / ``heads`` are the parameters of
the trunk and of each task head.  ``step(setup, variant, solver)`` returns a closure doing one full training
step's backward (grads zeroed, forward, backward) in one of four ways:
``plain`` (``sum(losses).backward()``), ``auto`` / ``params`` (``impartial.backward`` with that ``block``),
``torchjd`` (TorchJD's ``mtl_backward`` + ``jac_to_grad`` with the same-named aggregator).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Setup:
    name: str
    #: () -> (task losses, non-task losses, the tensor(s) through which every task reaches ``shared``)
    forward: Callable[[], tuple[list[Tensor], list[Tensor], Tensor | list[Tensor]]]
    shared: list[nn.Parameter]
    heads: list[list[nn.Parameter]]
    #: the tasks' paths to ``features`` share nodes (the VAE's fused z): TorchJD must keep the graph between tasks
    shared_paths: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        return self.shared + [p for h in self.heads for p in h]


def _mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_mlp(k: int, batch: int = 128, seed: int = 0) -> Setup:
    """Trunk 256 → 1024 → 768 (1.05M parameters), ReLU, then k linear heads 768 → 8 with an MSE loss each."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(_mlp(256, 1024, 768), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(768, 8) for _ in range(k))
    x = torch.randn(batch, 256)
    ys = torch.randn(k, batch, 8)

    def forward() -> tuple[list[Tensor], list[Tensor], Tensor]:
        h = trunk(x)
        return [F.mse_loss(head(h), ys[i]) for i, head in enumerate(heads)], [], h

    return Setup(f"mlp-k{k}", forward, list(trunk.parameters()), [list(h.parameters()) for h in heads])


def make_vae(batch: int = 128, latent: int = 20, seed: int = 0) -> Setup:
    """A product-of-experts multimodal VAE (MVAE) on digit-sized data: an 8×8 image, its word as 6 one-hot
    characters, and a second 8×8 view.  Tasks are the three reconstruction terms; the KL goes in ``also``.
    Shared parameters: the encoders (every modality's expert shapes z); heads: the three decoders.
    """
    torch.manual_seed(seed)
    dims = {"image": 64, "text": 6 * 27, "view": 64}
    enc = nn.ModuleDict({m: _mlp(n, 256, 256, 2 * latent) for m, n in dims.items()})
    dec = nn.ModuleDict({m: _mlp(latent, 256, 256, n) for m, n in dims.items()})
    data = {
        "image": torch.rand(batch, 64),
        "view": torch.rand(batch, 64),
        "text": F.one_hot(torch.randint(0, 27, (batch, 6)), 27).float().flatten(1),
    }
    eps = torch.randn(batch, latent)

    def forward() -> tuple[list[Tensor], list[Tensor], Tensor]:
        # product of Gaussian experts, prior N(0, I) included: precisions add
        prec, weighted = torch.ones(batch, latent), torch.zeros(batch, latent)
        for m, net in enc.items():
            mu, logvar = net(data[m]).chunk(2, -1)
            p = torch.exp(-logvar)
            prec, weighted = prec + p, weighted + p * mu
        var = 1 / prec
        mu = weighted * var
        z = mu + var.sqrt() * eps
        kl = 0.5 * (var + mu**2 - 1 - var.log()).sum(-1).mean()
        out = {m: net(z) for m, net in dec.items()}
        rec_image = F.mse_loss(out["image"], data["image"], reduction="sum") / batch
        rec_view = F.mse_loss(out["view"], data["view"], reduction="sum") / batch
        logits = out["text"].view(batch, 6, 27)
        rec_text = (
            F.cross_entropy(logits.flatten(0, 1), data["text"].view(batch, 6, 27).argmax(-1).flatten(), reduction="sum")
            / batch
        )
        return [rec_image, rec_text, rec_view], [kl], z

    return Setup("vae-local", forward, list(enc.parameters()), [list(dec[m].parameters()) for m in dims])


def make_zoo_mvae(batch: int = 128, seed: int = 0) -> Setup:
    """The zoo's MVAE (``examples/vae_zoo``) on a batch of the digits trio, as its training step uses it.

    TorchJD needs the tensors where the tasks' paths to the shared parameters start: here every expert's
    ``(mu, logvar)`` (the joint ELBO reaches the encoders through the fused z, the unimodal ELBOs directly),
    recorded by wrapping ``model.expert``.
    """
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from examples.vae_zoo import data, multimodal

    torch.manual_seed(seed)
    train, _ = data.digits_trio(seed=seed)
    x = {m: v[:batch] for m, v in train.x.items()}
    model = multimodal.MVAE({m: v[0].numel() for m, v in train.x.items()})
    feats: list[Tensor] = []
    expert = model.expert

    def recording_expert(m: str, xm: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = expert(m, xm)
        feats.extend((mu, logvar))
        return mu, logvar

    model.expert = recording_expert  # type: ignore[method-assign]

    def forward() -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        feats.clear()
        tasks, also = model.loss(x)
        return tasks, also, list(feats)

    return Setup(
        "vae",
        forward,
        model.encoder_params,
        [list(model.decoders[m].parameters()) for m in model.names],
        shared_paths=True,
    )


def make(name: str) -> Setup:
    """``vae``: the zoo's MVAE (the local PoE VAE where the zoo cannot be imported); ``mlp-k<k>``."""
    if name == "vae":
        try:
            return make_zoo_mvae()
        except ImportError:
            return make_vae()
    return make_mlp(int(name.split("-k")[1]))


def step(setup: Setup, variant: str, solver: str | None) -> Callable[[], None]:
    """One backward step of ``setup`` done the ``variant`` way, with solver class name ``solver``."""
    params = setup.params

    def zero() -> None:
        for p in params:
            p.grad = None

    if variant == "plain":

        def run() -> None:
            zero()
            losses, also, _ = setup.forward()
            torch.stack(losses + also).sum().backward()

        return run

    if variant in ("auto", "params"):
        import impartial
        from impartial import solvers as S

        ours = getattr(S, solver)()

        def run() -> None:
            zero()
            losses, also, _ = setup.forward()
            impartial.backward(losses, setup.shared, solver=ours, block=variant, also=also)

        return run

    if variant == "torchjd":
        import torchjd.aggregation as A
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = getattr(A, solver)()

        def run() -> None:
            zero()
            losses, also, feats = setup.forward()
            if also:  # TorchJD has no non-task losses: backpropagate them first, keeping the graph
                torch.stack(also).sum().backward(retain_graph=True)
            mtl_backward(
                losses,
                features=feats,
                tasks_params=setup.heads,
                shared_params=setup.shared,
                retain_graph=setup.shared_paths,
            )
            jac_to_grad(setup.shared, agg)

        return run

    raise ValueError(f"unknown variant {variant!r}")
