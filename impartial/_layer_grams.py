"""Per-sample gradients of one layer's parameters from its saved input and its output gradient, for
:mod:`impartial._per_sample`: each layer's share of the Gram matrix ``G = J Jᵀ`` of the per-sample Jacobian and of the
direction ``wᵀ J``, without forming ``J`` where a closed form is cheaper.

For sample ``b``, ``X_b`` its rows of a layer's input and ``Δ_b`` its rows of the output gradient (the rows of one
plain backward, :mod:`impartial._samples`):

- **matrix product** (``nn.Linear`` with any leading dims: ``R`` rows per sample): ``g_b = α X_bᵀ Δ_b``, so
  ``G_bc = α² ⟨X_b X_cᵀ, Δ_b Δ_cᵀ⟩`` (``(X Xᵀ) ⊙ (Δ Δᵀ)`` summed over each pair's rows), or, where cheaper, ``Σ`` over
  chunks of output features of the per-sample products; the bias ``β 1ᵀ Δ_b``;
- **convolution**: ``g_b`` the kernel gradient of sample ``b``'s images alone (``torch.func.vmap`` of the
  convolution's weight gradient over the samples), chunked over output channels; the bias sums ``Δ_b``;
- **embedding**: ``g_b = Σ_t e_{i_bt} Δ_btᵀ``, over the tokens the batch uses (``padding_idx`` rows are 0,
  ``scale_grad_by_freq`` divides by the batch's counts, as autograd does);
- **LayerNorm, GroupNorm, eval BatchNorm**: ``Σ Δ_b ⊙ x̂_b`` and ``Σ Δ_b`` over sample ``b``'s positions, per channel;
- **a parameter broadcast by** ``+``, ``-``, ``*``, ``expand``: its gradient per sample, summed over the broadcast dims;
- **any other node** (:class:`Generic`): the node's own backward seeded with each sample's rows alone (one batched
  backward through that node and the parameter side below it, in chunks of samples): exact for any op.

>>> X, D = torch.randn(6, 3), torch.randn(6, 2)   # 6 samples, one row each
>>> J = torch.einsum("bk,bm->bkm", X, D).reshape(6, -1)
>>> torch.allclose((X @ X.T) * (D @ D.T), J @ J.T, atol=1e-5)
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gram_base import Rule, Unreadable, budget, per_sample_sum, reduce_to, samples, sq, symmetric, total
from ._sample_ops import axis, lay
from ._samples import Layer
from ._torch_compat import linear_saved, saved, saved_input

__all__ = ["DEDICATED"]


class Linear(Rule):
    """``addmm(bias, X, W)`` / ``mm(X, W)`` with the samples in the rows of ``X`` (``nn.Linear``)."""

    kind = "linear"

    def __init__(self, layer: Layer, B: int) -> None:
        super().__init__(layer, B)
        X, self.alpha, self.beta = linear_saved(self.node)
        if X is None or X.dim() != 2:
            raise Unreadable(self.node.name())
        self.X = X.detach()
        self.wslot = 2 if self.node.name() == "AddmmBackward0" else 1

    def bind(self, delta: dict[int, Tensor], kept: Tensor | None) -> None:
        super().bind(delta, kept)
        D, B = delta[0], self.B
        _, a, f = axis(tuple(D.shape), self.layer.outs[0], B) or (0, 1, 1)
        self.Xs = self.sel(samples(self.X, lay(tuple(self.X.shape), 0, a, f), B).reshape(B, -1, self.X.shape[1]))
        self.Ds = self.sel(samples(D, self.layer.outs[0], B).reshape(B, -1, D.shape[1]))

    def _vector_bias(self, slots: list[int]) -> bool:
        """Whether slot 0 is in ``slots`` and a bias of one entry per output feature (``[M]`` or ``[1, M]``)."""
        shape = self.layer.shapes[0]
        M = self.Ds.shape[2]
        return 0 in slots and shape is not None and len(shape) > 0 and shape[-1] == M and math.prod(shape) == M

    def _jacobian(self, slot: int) -> Tensor:
        if slot == self.wslot:
            return torch.bmm(self.Xs.transpose(1, 2), self.Ds) * self.alpha
        shape = self.layer.shapes[slot]
        assert shape is not None
        return self.sel(reduce_to(self.delta[0] * self.beta, self.layer.outs[0], self.B, shape))

    def gram(self, slots: list[int]) -> Tensor:
        if self.wslot not in slots:
            return super().gram(slots)
        Xs, Ds = self.Xs, self.Ds
        n, R, K = Xs.shape
        M = Ds.shape[2]
        if (n * R) ** 2 * (K + M + 1) <= n * R * K * M + n * n * K * M:
            # through the kernels: ⟨X_bᵀΔ_b, X_cᵀΔ_c⟩ = Σ (X_b X_cᵀ) ⊙ (Δ_b Δ_cᵀ); a bias adds Σ (Δ_b Δ_cᵀ)
            fold = self._vector_bias(slots)
            shift = (self.beta / self.alpha) ** 2 if fold else 0.0
            G = self._kernels(Xs.reshape(n * R, K), Ds.reshape(n * R, M), n, R, shift).mul_(self.alpha**2)
            rest = [j for j in slots if j != self.wslot and not (fold and j == 0)]
        else:  # per-sample products, a chunk of output features at a time
            step = max(1, budget(n) // (n * K))
            G = total(sq(torch.bmm(Xs.transpose(1, 2), Ds[:, :, m : m + step])) for m in range(0, M, step))
            G = G.mul_(self.alpha**2)
            rest = [j for j in slots if j != self.wslot]
        return G.add_(super().gram(rest)) if rest else G

    @staticmethod
    def _kernels(Xf: Tensor, Df: Tensor, n: int, R: int, shift: float) -> Tensor:
        """``Σ_{r,r'} ((X_b X_cᵀ) + shift) ⊙ (Δ_b Δ_cᵀ)`` over each pair's rows, by blocks of samples."""

        def rows(i: int, j: int) -> Tensor:
            KX = Xf[i * R : j * R] @ Xf[i * R :].T
            KX = KX.add_(shift) if shift else KX
            KX = KX.mul_(Df[i * R : j * R] @ Df[i * R :].T)
            return KX if R == 1 else KX.view(j - i, R, n - i, R).sum((1, 3))

        return symmetric(n, rows, max(1, budget(n) // (R * R * n)), inner=R * R * (Xf.shape[1] + Df.shape[1]))

    def directions(self, slots: list[int], w: Tensor) -> list[Tensor]:
        K, M = self.Xs.shape[2], self.Ds.shape[2]
        Dw = self.Ds * w.view(-1, 1, 1)
        out = []
        for j in slots:
            if j == self.wslot:
                out.append((self.Xs.reshape(-1, K).T @ Dw.reshape(-1, M)).mul_(self.alpha))
            elif self._vector_bias([j]):
                shape = self.layer.shapes[j]
                assert shape is not None
                out.append(Dw.sum((0, 1)).mul_(self.beta).reshape(shape))
            else:
                out += super().directions([j], w)
        return out


class Conv(Rule):
    """``nn.Conv1d/2d/3d``: the samples in dim 0 of the input and output."""

    kind = "conv"

    def __init__(self, layer: Layer, B: int) -> None:
        super().__init__(layer, B)
        x = saved_input(self.node, "input")
        if x is None or saved(self.node, "transposed"):
            raise Unreadable(self.node.name())
        self.x = x.detach()
        self.args = (
            saved(self.node, "stride"),
            saved(self.node, "padding"),
            saved(self.node, "dilation"),
            False,
            saved(self.node, "output_padding"),
            saved(self.node, "groups"),
        )

    def bind(self, delta: dict[int, Tensor], kept: Tensor | None) -> None:
        super().bind(delta, kept)
        D, B, x = delta[0], self.B, self.x
        _, a, f = axis(tuple(D.shape), self.layer.outs[0], B) or (0, 1, 1)
        self.xs = self.sel(samples(x, lay(tuple(x.shape), 0, a, f), B).reshape(B, -1, *x.shape[1:]))
        self.ds = self.sel(samples(D, self.layer.outs[0], B).reshape(B, -1, *D.shape[1:]))

    def _wgrad(self, d: Tensor, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        w = d.new_empty(1).expand(shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(d, x, w, None, *self.args, [False, True, False])[1]

    def _per_sample(self, c0: int, c1: int) -> Tensor:
        shape = self.layer.shapes[1]
        assert shape is not None
        part = (c1 - c0, *shape[1:])
        return torch.func.vmap(lambda d, x: self._wgrad(d, x, part))(self.ds[:, :, c0:c1], self.xs)

    def _jacobian(self, slot: int) -> Tensor:
        if slot == 1:
            return self._per_sample(0, self.ds.shape[2])
        return self.sel(per_sample_sum(self.delta[0], self.layer.outs[0], self.B, [1]))

    def gram(self, slots: list[int]) -> Tensor:
        shape = self.layer.shapes[1]
        if 1 not in slots or shape is None:
            return super().gram(slots)
        C, n = shape[0], self.ds.shape[0]
        step = C if self.args[5] != 1 else max(1, budget(n) // (n * math.prod(shape[1:])))
        if step >= C:  # in one piece: kept for the direction (wᵀ J instead of another weight gradient)
            G = sq(self.jac(1))
        else:
            G = total(sq(self._per_sample(c, min(C, c + step))) for c in range(0, C, step))
        rest = [j for j in slots if j != 1]
        return G + super().gram(rest) if rest else G

    def directions(self, slots: list[int], w: Tensor) -> list[Tensor]:
        out = []
        for j in slots:
            shape = self.layer.shapes[1]
            if j != 1 or shape is None or j in self._jac:
                out += super().directions([j], w)
                continue
            ds = self.ds * w.view(-1, *[1] * (self.ds.dim() - 1))
            out.append(self._wgrad(ds.flatten(0, 1), self.xs.flatten(0, 1), shape))
        return out


class Embedding(Rule):
    """``nn.Embedding`` (dense gradient)."""

    kind = "embedding"

    def __init__(self, layer: Layer, B: int) -> None:
        super().__init__(layer, B)
        idx = saved_input(self.node, "indices")
        if idx is None:
            raise Unreadable(self.node.name())
        self.idx, self.V = idx, int(saved(self.node, "weight_sym_argsize_0"))
        self.pad, self.freq = saved(self.node, "padding_idx"), saved(self.node, "scale_grad_by_freq")

    def bind(self, delta: dict[int, Tensor], kept: Tensor | None) -> None:
        super().bind(delta, kept)
        D, B, (outer, inner) = delta[0], self.B, self.layer.outs[0]
        m = D.shape[-1]
        Ds = samples(D, (outer, inner), B).reshape(B, -1, m)
        Is = samples(self.idx, (outer, inner // m), B).reshape(B, -1)
        if self.freq:  # autograd divides each row by its token's count in the whole batch
            counts = torch.bincount(self.idx.reshape(-1), minlength=self.V)
            Ds = Ds / counts[Is].unsqueeze(-1).to(Ds.dtype)
        if self.pad >= 0:
            Ds = Ds * (Is != self.pad).unsqueeze(-1).to(Ds.dtype)
        self.Ds, self.Is = self.sel(Ds), self.sel(Is)

    def _sums(self, keys: Tensor, n: int, mask: Tensor | None = None) -> Tensor:
        """``[B', n, m]``: each sample's rows summed by ``keys`` (``[B', R]`` in ``[0, n)``)."""
        b, _, m = self.Ds.shape
        flat = (torch.arange(b, device=keys.device).unsqueeze(1) * n + keys).reshape(-1)
        rows_ = self.Ds.reshape(-1, m)
        if mask is not None:
            flat, rows_ = flat[mask.reshape(-1)], rows_[mask.reshape(-1)]
        return self.Ds.new_zeros(b * n, m).index_add_(0, flat, rows_).view(b, n, m)

    def _jacobian(self, slot: int) -> Tensor:
        return self._sums(self.Is, self.V)

    def gram(self, slots: list[int]) -> Tensor:
        _, inv = torch.unique(self.Is, return_inverse=True)  # the tokens this batch uses
        U = int(inv.max()) + 1
        b, _, m = self.Ds.shape
        step = max(1, budget(b) // (b * m))
        if step >= U:
            return sq(self._sums(inv, U))
        return total(sq(self._sums(inv - u, step, (inv >= u) & (inv < u + step))) for u in range(0, U, step))

    def directions(self, slots: list[int], w: Tensor) -> list[Tensor]:
        m = self.Ds.shape[-1]
        Dw = (self.Ds * w.view(-1, 1, 1)).reshape(-1, m)
        return [self.Ds.new_zeros(self.V, m).index_add_(0, self.Is.reshape(-1), Dw)]


class Norm(Rule):
    """The affine parameters of ``NativeLayerNorm`` / ``NativeGroupNorm`` / eval ``NativeBatchNorm``."""

    kind = "norm"

    def __init__(self, layer: Layer, B: int) -> None:
        super().__init__(layer, B)
        node, name = self.node, self.node.name()
        x = saved_input(node, "input")
        x = None if x is None else x.detach()
        if name == "NativeBatchNormBackward0":
            rm, rv = saved_input(node, "running_mean"), saved_input(node, "running_var")
            if x is None or rm is None or rv is None:
                raise Unreadable(name)
            view = [1, -1] + [1] * (x.dim() - 2)
            self.xhat = (x - rm.view(view)) * torch.rsqrt(rv.view(view) + saved(node, "eps"))
            self.keep = [1]
            return
        mean, rstd = saved_input(node, "result1"), saved_input(node, "result2")
        if x is None or mean is None or rstd is None:
            raise Unreadable(name)
        mean, rstd = mean.detach(), rstd.detach()  # outputs of the forward op: they have a grad_fn
        if name == "NativeLayerNormBackward0":
            self.xhat = (x - mean) * rstd
            k = len(saved(node, "normalized_shape"))
            self.keep = list(range(x.dim() - k, x.dim()))
        else:  # group norm: statistics per (sample, group)
            N, G = x.shape[0], int(saved(node, "group"))
            self.xhat = ((x.reshape(N, G, -1) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
            self.keep = [1]

    def _jacobian(self, slot: int) -> Tensor:
        shape = self.layer.shapes[slot]
        assert shape is not None
        D = self.delta[0]
        t = D * self.xhat.to(D.dtype) if slot == 1 else D
        return self.sel(per_sample_sum(t, self.layer.outs[0], self.B, self.keep).reshape(self.B, *shape))


class Broadcast(Rule):
    """A parameter broadcast over the samples by ``+``, ``-``, ``expand`` or ``*``."""

    kind = "broadcast"

    def __init__(self, layer: Layer, B: int) -> None:
        super().__init__(layer, B)
        name = self.node.name()
        self.factor: dict[int, Tensor | float] = {}
        for j in layer.slots:
            if name == "MulBackward0":
                other = saved_input(self.node, "other" if j == 0 else "self")
                if other is None:
                    raise Unreadable(name)
                self.factor[j] = other.detach()
            elif j == 0 or name == "ExpandBackward0":
                self.factor[j] = 1.0
            else:
                alpha = float(saved(self.node, "alpha"))
                self.factor[j] = alpha if name == "AddBackward0" else -alpha

    def _jacobian(self, slot: int) -> Tensor:
        shape = self.layer.shapes[slot]
        assert shape is not None
        return self.sel(reduce_to(self.delta[0] * self.factor[slot], self.layer.outs[0], self.B, shape))


#: node name → its closed-form rule (every other layer is served by :class:`Generic`)
DEDICATED: dict[str, type[Rule]] = {
    "AddmmBackward0": Linear,
    "MmBackward0": Linear,
    "ConvolutionBackward0": Conv,
    "EmbeddingBackward0": Embedding,
    "NativeLayerNormBackward0": Norm,
    "NativeGroupNormBackward0": Norm,
    "NativeBatchNormBackward0": Norm,
    "AddBackward0": Broadcast,
    "SubBackward0": Broadcast,
    "ExpandBackward0": Broadcast,
    "MulBackward0": Broadcast,
}
