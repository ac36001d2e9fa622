"""``block="params"`` with every task one sample (a 1-D loss tensor): the Gram matrix from each layer's rows of one
plain backward, proven against the ``J`` path (the oracle: the per-sample stage switched off) in float64, for every
layer kind; the proof refuses (and says why) wherever a loss could depend on another sample."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import impartial
import impartial._generic_gram as GG
import impartial._gram_base as GB
import impartial._layer_grams as LG
import impartial._params as PM
from impartial.solvers import IMTLG, MGDA, GradDrop, Sum, UPGrad

D = torch.float64
B = 6
Loss = Callable[[Tensor], Tensor]


def _ce(classes: int = 3, seed: int = 1) -> Loss:
    y = torch.randint(0, classes, (B,), generator=torch.Generator().manual_seed(seed))
    return lambda out: F.cross_entropy(out, y, reduction="none")


def _run(model: nn.Module, x: Tensor, loss: Loss, fast: bool, times: int = 1, **kw) -> tuple[list, object]:
    for p in model.parameters():
        p.grad = None
    orig = PM.per_sample_stage
    if not fast:
        PM.per_sample_stage = lambda *a: "switched off"
    try:
        L = loss(model(x))
        for _ in range(times):
            rep = impartial.backward(L, model, block="params", **kw)
    finally:
        PM.per_sample_stage = orig
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], rep


def _close(a: list, b: list, tol: float) -> None:
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, rtol=tol, atol=tol * float(y.abs().max())), float((x - y).abs().max())


def _paths(model: nn.Module, x: Tensor, loss: Loss, kinds: set[str], tol: float = 1e-12, **kw) -> object:
    """The per-sample path ran with these rules, and equals the J path (Gram, keep_norm scale, every gradient)."""
    a, ra = _run(model, x, loss, True, **kw)
    b, rb = _run(model, x, loss, False, **kw)
    (blk,), (ref,) = ra.blocks, rb.blocks
    assert (blk.gram_from, blk.task_grads, ref.gram_from) == ("per-sample", "plain", "J"), blk.note
    assert {k for _, k in blk.rules} == kinds
    _close([blk.gram], [ref.gram], 1e-12)
    _close([blk.scale] + a, [ref.scale] + b, tol)  # the keep_norm scale comes out of the solve, as the gradients do
    return ra


class Seq(nn.Module):
    """Linear layers on ``[B, T, F]``, a LayerNorm, a mean over ``T``; ``small`` is a layer whose per-sample
    products are cheaper than its kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.small, self.out = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2), nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.small(self.norm(F.gelu(self.a(x)))).mean(1))


class TimeMajor(nn.Module):
    """A Linear on ``[T, B, F]`` (samples in dim 1: ``mm`` then a broadcast bias add)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x.transpose(0, 1))).sum(0))


class Tokens(nn.Module):
    def __init__(self, **emb) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(9, 4, **emb), nn.Linear(4, 3)

    def forward(self, i: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(i)).mean(1))


class Encoder(nn.Module):
    """Embedding + a learned positional table (broadcast add) + a Transformer encoder layer + mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, 8), nn.Parameter(torch.randn(5, 8))
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, i: Tensor) -> Tensor:
        return self.out(self.enc(self.emb(i) + self.pos).mean(1))


class Attention(nn.Module):
    def __init__(self, batch_first: bool, cross: bool = False) -> None:
        super().__init__()
        kv = 6 if cross else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kv, vdim=kv)
        self.out, self.batch_first, self.cross = nn.Linear(8, 3), batch_first, cross

    def forward(self, h: Tensor) -> Tensor:
        kv = h[..., :6] if self.cross else h
        y, _ = self.attn(h, kv, kv, need_weights=not self.batch_first)
        return self.out(y.mean(1 if self.batch_first else 0))


class Tied(nn.Module):
    """The embedding table is also the output projection: its per-sample gradients add over both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)

    def forward(self, i: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(i))).mean(1), self.emb.weight)


class Scaled(nn.Module):
    """A temperature (``/``: no closed form, the generic rule) and a gain (``*``, broadcast)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.temp, self.gain = nn.Parameter(torch.rand(3) + 1), nn.Parameter(torch.randn(1, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) / self.temp * self.gain


def _tokens(n: int, T: int = 5, seed: int = 2) -> Tensor:
    return torch.randint(0, n, (B, T), generator=torch.Generator().manual_seed(seed))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor], set[str]]] = {
    "linear": (_mlp, lambda: torch.randn(B, 5), {"linear"}),
    "linear-sequence+layernorm": (Seq, lambda: torch.randn(B, 4, 5), {"linear", "norm"}),
    "linear-time-major": (TimeMajor, lambda: torch.randn(B, 4, 5), {"linear", "broadcast"}),
    "conv2d+pool+groupnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, stride=2, groups=2),
            nn.GroupNorm(2, 4),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        lambda: torch.randn(B, 2, 6, 6),
        {"conv", "norm", "linear"},
    ),
    "conv1d-dilated": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, dilation=2, padding=2, stride=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        lambda: torch.randn(B, 2, 9),
        {"conv", "linear"},
    ),
    "batchnorm-eval": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval(),
        lambda: torch.randn(B, 2, 6, 6),
        {"conv", "norm", "linear"},
    ),
    "embedding-padding": (lambda: Tokens(padding_idx=0), lambda: _tokens(9), {"embedding", "linear"}),
    "embedding-freq": (lambda: Tokens(scale_grad_by_freq=True), lambda: _tokens(4), {"embedding", "linear"}),
    "attention-batch-first": (lambda: Attention(True), lambda: torch.randn(B, 5, 8), {"linear", "broadcast"}),
    "attention-time-major": (lambda: Attention(False), lambda: torch.randn(5, B, 8), {"linear"}),
    "transformer-encoder": (Encoder, lambda: _tokens(11), {"embedding", "broadcast", "linear", "norm"}),
    "generic-prelu": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3)),
        lambda: torch.randn(B, 5),
        {"linear", "generic"},
    ),
    "generic-divide": (Scaled, lambda: torch.randn(B, 5), {"linear", "generic", "broadcast"}),
    "generic-cross-attention": (
        lambda: Attention(True, cross=True),
        lambda: torch.randn(B, 5, 8),
        {"linear", "generic"},
    ),
    "tied": (Tied, lambda: _tokens(7), {"embedding+linear", "linear"}),
}


def _case(name: str, seed: int = 0) -> tuple[nn.Module, Tensor, set[str]]:
    make, data, kinds = CASES[name]
    torch.manual_seed(seed)
    model, x = make().to(D), data()
    return model, x.to(D) if x.is_floating_point() else x, kinds


@pytest.mark.parametrize("name", list(CASES))
def test_each_layer_kind_matches_J(name: str) -> None:
    model, x, kinds = _case(name)
    _paths(model, x, _ce(), kinds, solver=Sum())  # every gradient and the keep_norm scale, to round-off
    _paths(model, x, _ce(), kinds, tol=1e-7, solver=UPGrad())  # the QP amplifies the Gram's round-off


@pytest.mark.parametrize(
    "name",
    [
        "linear-sequence+layernorm",
        "conv2d+pool+groupnorm",
        "embedding-padding",
        "transformer-encoder",
        "generic-cross-attention",
        "tied",
    ],
)
def test_chunked_computations_match_J(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk loop (kernels by samples, products by features, convolutions by channels, tokens, the generic
    rule by samples) gives the same Gram as in one piece."""
    for module in (GB, LG, GG):
        monkeypatch.setattr(module, "budget", lambda B: 1)
    model, x, kinds = _case(name)
    _paths(model, x, _ce(), kinds, solver=Sum())


@pytest.mark.parametrize("solver", [Sum, UPGrad, MGDA, IMTLG])
@pytest.mark.parametrize("keep_norm", [True, False])
def test_solvers(solver: type, keep_norm: bool) -> None:
    model, x, kinds = _case("linear-sequence+layernorm", seed=3)
    _paths(model, x, _ce(), kinds, tol=1e-7, solver=solver(), keep_norm=keep_norm)


def test_sum_without_keep_norm_is_the_plain_backward() -> None:
    model, x, _ = _case("transformer-encoder")
    loss = _ce()
    a, rep = _run(model, x, loss, True, solver=Sum(), keep_norm=False)
    loss(model(x)).sum().backward()  # accumulates onto ours
    for g, p in zip(a, model.parameters()):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "BatchNorm in training mode"),
        (lambda: _Centered(), "an op mixes samples"),
        (lambda: _Cumprod(), "no per-sample rule for CumprodBackward0"),
        (lambda: _PerSampleParam(), "takes part per sample"),
    ],
    ids=["batchnorm-train", "batch-mean", "unknown-op", "per-sample-parameter"],
)
def test_what_couples_samples_takes_the_J_path_and_says_why(build: Callable, why: str) -> None:
    torch.manual_seed(0)
    model, x = build().to(D), torch.randn(B, 5, dtype=D)
    _, rep = _run(model, x, _ce(), True, solver=UPGrad())
    assert rep.blocks[0].gram_from == "J" and why in rep.blocks[0].note and why in str(rep)


class _Centered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0))  # every sample's output depends on every sample


class _Cumprod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x).cumprod(1)


class _PerSampleParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.offset = nn.Linear(5, 3), nn.Parameter(torch.randn(B, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.offset


def test_a_list_of_the_entries_is_the_same_problem() -> None:
    """``[L[i] for i in order]`` (or ``list(L)``) is the per-sample problem too."""
    model, x, kinds = _case("linear")
    a, ra = _run(model, x, _ce(), True, solver=UPGrad())
    for p in model.parameters():
        p.grad = None
    L = _ce()(model(x))
    order = [5, 0, 1, 2, 3, 4]
    rep = impartial.backward([L[i] for i in order], model, block="params", solver=UPGrad())
    assert rep.blocks[0].gram_from == "per-sample"
    _close([rep.blocks[0].gram], [ra.blocks[0].gram[order][:, order]], 1e-12)
    _close([p.grad for p in model.parameters()], a, 1e-7)


def test_other_inputs_take_the_J_path() -> None:
    model, x, _ = _case("linear")
    y = torch.randint(0, 3, (B,))
    separate = [F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) for i in range(B)]  # B graphs: not one tensor
    rep = impartial.backward(separate, model, block="params", solver=UPGrad())
    assert rep.blocks[0].gram_from == "J" and rep.blocks[0].note is None
    rep = impartial.backward(_ce()(model(x)), model, block="params", solver=GradDrop())
    assert rep.blocks[0].gram_from == "J" and "Gram-space solver" in rep.blocks[0].note


def test_a_nonfinite_sample() -> None:
    """Sample 3's loss is not finite: ``raise`` names it; ``skip`` solves on the others, as if it were not in the
    batch (the J path cannot: ``0 × nan`` puts its NaN in every task's row of a shared weight)."""
    model, x, kinds = _case("linear-sequence+layernorm")
    x[3, 0, 0] = float("inf")
    y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(FloatingPointError, match=r"losses\[3\]"):
        _run(model, x, lambda out: F.cross_entropy(out, y, reduction="none"), True, solver=UPGrad())
    a, ra = _run(
        model, x, lambda out: F.cross_entropy(out, y, reduction="none"), True, solver=UPGrad(), nonfinite="skip"
    )
    assert ra.skipped == ("losses[3]",) and ra.blocks[0].gram_from == "per-sample"
    rest = [0, 1, 2, 4, 5]
    b, rb = _run(model, x[rest], lambda out: F.cross_entropy(out, y[rest], reduction="none"), False, solver=UPGrad())
    _close([ra.blocks[0].gram], [rb.blocks[0].gram], 1e-12)
    _close(a, b, 1e-7)


def test_retain_graph_twice_and_freed_otherwise() -> None:
    model, x, kinds = _case("transformer-encoder")
    _paths(model, x, _ce(), kinds, tol=1e-7, solver=UPGrad(), retain_graph=True, times=2)
    L = _ce()(model(x))
    impartial.backward(L, model, block="params", solver=UPGrad())
    with pytest.raises(RuntimeError, match="second time|freed"):
        L.sum().backward()


def test_parameter_hooks_fire_once() -> None:
    model, x, _ = _case("conv2d+pool+groupnorm")
    seen: list[int] = []
    for i, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, i=i: seen.append(i))
    _run(model, x, _ce(), True, solver=UPGrad())
    assert sorted(seen) == list(range(len(list(model.parameters()))))


def test_float32_is_close_to_float64() -> None:
    model, x, kinds = _case("transformer-encoder")
    a, ra = _run(model, x, _ce(), True, solver=UPGrad())
    a32, ra32 = _run(model.float(), x, _ce(), True, solver=UPGrad())
    assert ra32.blocks[0].gram.dtype == torch.float64 and ra32.blocks[0].gram_from == "per-sample"
    _close([ra32.blocks[0].gram], [ra.blocks[0].gram], 1e-5)
    _close([g.double() for g in a32], a, 1e-4)


def test_report_at_hundreds_of_tasks_is_a_summary() -> None:
    torch.manual_seed(0)
    k = 200
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(k, 5), torch.randn(k)
    rep = impartial.backward(
        F.mse_loss(model(x).squeeze(1), y, reduction="none"), model, block="params", solver=UPGrad()
    )
    text = str(rep).splitlines()
    assert len(text) < 12 and max(map(len, text)) < 200 and "losses[199]" in text[0] and "losses[100]" not in text[0]
    b = rep.blocks[0]
    s = b.summary()
    G = b.gram
    iu = torch.triu_indices(k, k, 1)
    assert s["conflicting"] == pytest.approx(float((G[iu[0], iu[1]] < 0).double().mean()))
    assert s["norm_max"] == pytest.approx(float(G.diagonal().max().sqrt()))
    assert s["effective_tasks"] == pytest.approx(float(b.weights.abs().sum() ** 2 / b.weights.pow(2).sum()))
    assert f"{100 * s['conflicting']:.1f}% conflicting" in str(rep) and b.gram.shape == (k, k)


class _Op(nn.Module):
    """``op(lin(x))`` for ``x`` ``[B, 4, 5]``, summed to one loss per sample."""

    def __init__(self, op: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.lin, self.op = nn.Linear(5, 6), op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(self.lin(x)).reshape(B, -1).sum(1)


KEEP_APART: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax-features": lambda h: h.softmax(-1) * h,
    "logsumexp-time": lambda h: h.logsumexp(1),
    "var-std-norm": lambda h: h.var(1).sum(1) + h.std(2, keepdim=True).squeeze(2).sum(1) + h.norm(dim=2).sum(1),
    "amax-cumsum-flip-roll": lambda h: h.amax(2) + h.cumsum(1).flip(2).roll(1, 1).sum(2),
    "cat-stack-split-unbind": lambda h: (
        torch.cat(h.split([2, 2], 1), 2).sum(1) + torch.stack(h.unbind(1), 2).reshape(B, 24)[:, :12]
    ),
    "select-slice-permute": lambda h: h[:, 1] * h[:, 1:3].permute(0, 2, 1).sum(2),
    "bmm-baddbmm": lambda h: torch.baddbmm(h @ h.transpose(1, 2), h, h.mT).tanh(),
    "time-major-view": lambda h: h.transpose(0, 1).reshape(4 * B, 6).tanh().reshape(4, B, 6).transpose(0, 1),
    "where-maximum-huber": lambda h: (
        torch.where(h > 0, h, 0.1 * h).maximum(h.sin()) + F.huber_loss(h, h.cos(), reduction="none")
    ),
    "pool3d": lambda h: F.max_pool3d(h.reshape(B, 1, 2, 2, 6), 2) + F.avg_pool3d(h.reshape(B, 1, 2, 2, 6), 2),
}
MIX: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "softmax-over-samples": (lambda h: h.softmax(0), "works along the samples"),
    "cumsum-over-samples": (lambda h: h.cumsum(0), "works along the samples"),
    "batch-sum-broadcast": (lambda h: h * h.sum(0), "an op mixes samples"),
    "sort": (lambda h: h.sort(0).values, "no per-sample rule for SortBackward0"),
    "slice-of-samples": (lambda h: torch.cat([h[3:], h[:3]]), "works along the samples"),
    "samples-in-columns": (lambda h: h.transpose(0, 2) @ torch.ones(B, 6, dtype=h.dtype), "columns"),
}


@pytest.mark.parametrize("op", list(KEEP_APART))
def test_op_rules_keep_the_samples_apart(op: str) -> None:
    torch.manual_seed(0)
    model = _Op(KEEP_APART[op]).to(D)
    _paths(model, torch.randn(B, 4, 5, dtype=D), lambda out: out, {"linear"}, tol=1e-7, solver=UPGrad())


@pytest.mark.parametrize("op", list(MIX))
def test_ops_that_mix_samples_are_refused(op: str) -> None:
    torch.manual_seed(0)
    fn, why = MIX[op]
    model = _Op(fn).to(D)
    _, rep = _run(model, torch.randn(B, 4, 5, dtype=D), lambda out: out, True, solver=UPGrad())
    assert rep.blocks[0].gram_from == "J" and why in rep.blocks[0].note


def test_symmetric_blocks_at_large_batches() -> None:
    """``J Jᵀ`` and the kernels by upper row blocks (mirrored) equal the whole products (blocks from n = 64 where
    each entry is a long product, from n = 256 always)."""
    torch.manual_seed(0)
    for n, R, P in ((64, 16, 2048), (100, 16, 2048), (300, 3, 50)):  # blocks of 32, 32 (the last one short), 75 rows
        J = torch.randn(n, P, dtype=D)
        assert torch.allclose(GB.sq(J), J @ J.T, rtol=1e-13, atol=1e-12)
        X, Dl = torch.randn(n * R, 4, dtype=D), torch.randn(n * R, 5, dtype=D)
        want = ((X @ X.T + 0.5) * (Dl @ Dl.T)).view(n, R, n, R).sum((1, 3))
        assert torch.allclose(LG.Linear._kernels(X, Dl, n, R, 0.5), want, rtol=1e-13, atol=1e-11)
