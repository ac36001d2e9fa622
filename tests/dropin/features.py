"""The trunk layers the harness draws: module types and autograd patterns, each ``[B, T, W] -> [B, T, W]``.

Every layer is small (float64, ``W = 4``) and deterministic given the global seed at construction and the
RNG state at the forward (the harness reseeds before each forward, so Dropout draws the same masks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

B, T, W = 3, 4, 4


class _Softsign(torch.autograd.Function):
    """A custom Function with its own backward (saves its input; no vmap rule, so batched passes fall back)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x / (1 + x.abs())

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g / (1 + x.abs()).pow(2)


class Layer(nn.Module):
    """``fn(self, h)`` with the submodules and parameters in ``parts``."""

    def __init__(self, fn: Callable[[Layer, Tensor], Tensor], **parts: nn.Module | Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, part in parts.items():
            if isinstance(part, nn.Module):
                self.add_module(name, part)
            elif isinstance(part, nn.Parameter):
                self.register_parameter(name, part)
            else:
                self.register_buffer(name, part)

    def forward(self, h: Tensor) -> Tensor:
        return self.fn(self, h)


def _seq(h: Tensor) -> Tensor:  # [B, T, W] -> [B, W, T] for the channel-first layers
    return h.transpose(1, 2)


def _no_grad_island(m: Layer, h: Tensor) -> Tensor:
    with torch.no_grad():  # a scale computed from h but outside the graph
        s = h.pow(2).mean(-1, keepdim=True).add(1).sqrt()
    return m.lin(h) / s


def _inplace_view(m: Layer, h: Tensor) -> Tensor:
    y = m.lin(h).clone()
    y[:, 0] = y[:, 0] * 2  # CopySlices: an in-place write through a view
    return y


def _sdpa(m: Layer, h: Tensor) -> Tensor:
    q, k, v = m.qkv(h).chunk(3, -1)
    return F.scaled_dot_product_attention(q, k, v)


def _split(m: Layer, h: Tensor) -> Tensor:
    a, b = h.chunk(2, -1)
    return torch.cat([torch.tanh(a), torch.sigmoid(b) * a], -1)


def _checkpointed(m: Layer, h: Tensor) -> Tensor:
    return checkpoint(m.inner, h, use_reentrant=False)


def _checkpointed_reentrant(m: Layer, h: Tensor) -> Tensor:
    return checkpoint(m.inner, h, use_reentrant=True)


def _frozen() -> Layer:
    lin = nn.Linear(W, W)
    lin.weight.requires_grad_(False)  # frozen inside the trunk; its bias still trains
    return Layer(lambda m, h: torch.tanh(m.lin(h)), lin=lin)


def _weight_norm() -> Layer:
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(W, W))
    return Layer(lambda m, h: torch.tanh(m.lin(h)), lin=lin)


def _lin() -> nn.Linear:
    return nn.Linear(W, W)


def _tanh_lin() -> nn.Sequential:
    return nn.Sequential(nn.Linear(W, W), nn.Tanh())


#: name -> factory; every entry is one module type or autograd pattern
FEATURES: dict[str, Callable[[], nn.Module]] = {
    "linear": _tanh_lin,
    "conv1d": lambda: Layer(lambda m, h: _seq(m.conv(_seq(h))), conv=nn.Conv1d(W, W, 3, padding=1)),
    "conv2d": lambda: Layer(lambda m, h: m.conv(h.unsqueeze(1)).mean(1), conv=nn.Conv2d(1, 2, 3, padding=1)),
    "conv_transpose": lambda: Layer(lambda m, h: _seq(m.conv(_seq(h))), conv=nn.ConvTranspose1d(W, W, 3, padding=1)),
    "embedding": lambda: Layer(lambda m, h: h + m.emb(m.ids), emb=nn.Embedding(7, W), ids=torch.randint(0, 7, (B, T))),
    "layernorm": lambda: nn.LayerNorm(W),
    "batchnorm": lambda: Layer(lambda m, h: _seq(m.bn(_seq(h))), bn=nn.BatchNorm1d(W)),
    "groupnorm": lambda: Layer(lambda m, h: _seq(m.gn(_seq(h))), gn=nn.GroupNorm(2, W)),
    "instancenorm": lambda: Layer(lambda m, h: _seq(m.n(_seq(h))), n=nn.InstanceNorm1d(W, affine=True)),
    "dropout": lambda: nn.Dropout(0.3),
    "mha": lambda: Layer(lambda m, h: h + m.mha(h, h, h)[0], mha=nn.MultiheadAttention(W, 2, batch_first=True)),
    "sdpa": lambda: Layer(_sdpa, qkv=nn.Linear(W, 3 * W)),
    "lstm": lambda: Layer(lambda m, h: m.rnn(h)[0], rnn=nn.LSTM(W, W, batch_first=True)),
    "gru": lambda: Layer(lambda m, h: m.rnn(h)[0], rnn=nn.GRU(W, W, batch_first=True)),
    "rnn": lambda: Layer(lambda m, h: m.rnn(h)[0], rnn=nn.RNN(W, W, batch_first=True)),
    "transformer": lambda: nn.TransformerEncoderLayer(W, 2, dim_feedforward=8, dropout=0.1, batch_first=True),
    "skip": lambda: Layer(lambda m, h: h + torch.tanh(m.lin(h)), lin=_lin()),
    "detach": lambda: Layer(lambda m, h: torch.tanh(h) + m.lin(h.detach()), lin=_lin()),
    "no_grad": lambda: Layer(_no_grad_island, lin=_lin()),
    "checkpoint": lambda: Layer(_checkpointed, inner=nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, W))),
    "function": lambda: Layer(lambda m, h: _Softsign.apply(m.lin(h)), lin=_lin()),
    "gelu": lambda: nn.Sequential(nn.Linear(W, W), nn.GELU()),
    "prelu": lambda: nn.PReLU(W),
    "bilinear": lambda: Layer(lambda m, h: m.bil(h, torch.tanh(h)), bil=nn.Bilinear(W, W, W)),
    "maxpool": lambda: Layer(lambda m, h: _seq(F.max_pool1d(_seq(h), 3, 1, 1)) + h),
    "inplace": lambda: Layer(lambda m, h: F.elu(m.lin(h), inplace=True), lin=_lin()),
    "inplace_view": lambda: Layer(_inplace_view, lin=_lin()),
    "reuse": lambda: Layer(lambda m, h: m.lin(torch.tanh(m.lin(h))), lin=_lin()),
    "split": lambda: Layer(_split),
    "gather": lambda: Layer(lambda m, h: h + 0.5 * h[:, m.perm], perm=torch.randperm(T)),
    "cumsum": lambda: Layer(lambda m, h: h.cumsum(1) / T),
    "normalize": lambda: Layer(lambda m, h: 2 * F.normalize(h, dim=-1)),
    "softmax": lambda: Layer(lambda m, h: W * torch.softmax(h, -1) * h),
    "where": lambda: Layer(lambda m, h: torch.where(m.mask, h, 0.5 * h.pow(2)), mask=torch.rand(T, W) < 0.5),
    "einsum": lambda: Layer(lambda m, h: torch.einsum("btw,wv->btv", h, m.P), P=nn.Parameter(torch.randn(W, W) / 2)),
    "broadcast": lambda: Layer(
        lambda m, h: h * m.scale + m.shift, scale=nn.Parameter(torch.randn(W)), shift=nn.Parameter(torch.randn(T, 1))
    ),
    "weight_norm": _weight_norm,
    "frozen": _frozen,
}

#: features that ``impartial.backward`` may refuse: expected to work as plain or to raise an error naming them
SPECIAL: dict[str, Callable[[], nn.Module]] = {
    "embedding_sparse": lambda: Layer(
        lambda m, h: h + m.emb(m.ids), emb=nn.Embedding(7, W, sparse=True), ids=torch.randint(0, 7, (B, T))
    ),
    "checkpoint_reentrant": lambda: Layer(
        _checkpointed_reentrant, inner=nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, W))
    ),
}
