"""The rules of layers for :mod:`impartial._sample_ops` (matrix products, attention, convolutions and pooling, norms,
embeddings, losses) and the table of every rule by node name, which :mod:`impartial._samples` walks."""

from __future__ import annotations

from torch.autograd.graph import Node

from ._sample_ops import (
    SUM,
    Lay,
    Refuse,
    Rule,
    Shape,
    State,
    _along,
    _broadcast,
    _out,
    _permute,
    _reduce,
    _select,
    _split,
    _view,
    lay,
)
from ._torch_compat import saved

__all__ = ["RULES", "REINDEX"]


def _leading(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    """Batched matrix products and attention (samples in a leading dim of every input) and matrix products
    (samples in the rows; the right factor and a bias broadcast over them)."""
    d, a, f = _out(node, outs, oshapes, B)
    name, S = node.name(), oshapes[0]
    if name in ("AddmmBackward0", "MmBackward0"):
        if d != 0:
            raise Refuse(f"{name}: the samples are in the columns of a matrix product")
        left = 1 if name == "AddmmBackward0" else 0
        res: list[State] = []
        for j, s in enumerate(ishapes):
            if s is None:
                res.append(None)
            elif j == left:
                res.append(lay(s, 0, a, f))
            elif j == left + 1:
                res.append(SUM)
            else:  # addmm's added term: broadcast like an elementwise op
                res.append(_broadcast(node, outs, oshapes, [s], B)[0])
        return res
    if d >= len(S) - 2:
        raise Refuse(f"{name}: the samples are in a matrix dim of a batched product")
    if name == "BaddbmmBackward0":
        return _broadcast(node, outs, oshapes, ishapes[:1], B) + [
            None if s is None else lay(s, d, a, f) for s in ishapes[1:]
        ]
    if len(ishapes) > 3 and any(s is not None for s in ishapes[3:]):
        raise Refuse(f"{name}: a mask or bias that requires grad")
    for s in ishapes:
        if s is not None and (len(s) != len(S) or s[d] != S[d]):
            raise Refuse(f"{name}: an input broadcast over the samples")
    return [None if s is None else lay(s, d, a, f) for s in ishapes]


def _spatial(n: int, first: bool = False) -> Rule:
    """Ops over the last ``n`` dims (pooling, layer norm) or, with ``first``, over everything but dim 0 and the
    channels (convolution, group norm: the samples must be in dim 0): parameters are broadcast over the samples."""

    def rule(
        node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
    ) -> list[State]:
        d, a, f = _out(node, outs, oshapes, B)
        rank = len(oshapes[0])
        k = len(saved(node, "normalized_shape")) if node.name() == "NativeLayerNormBackward0" else n
        if (first and d != 0) or d >= rank - k:
            raise Refuse(f"{node.name()} mixes the dim that holds the samples")
        return [None if s is None else lay(s, d, a, f) if j == 0 else SUM for j, s in enumerate(ishapes)]

    return rule


def _batch_norm(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    if saved(node, "training"):
        raise Refuse(
            "a BatchNorm in training mode couples the samples through the batch statistics (every loss "
            "depends on every sample); in eval mode, or with GroupNorm / LayerNorm, each sample is its own"
        )
    d, a, f = _out(node, outs, oshapes, B)
    if d == 1:
        raise Refuse("NativeBatchNormBackward0: the samples are in the channel dim")
    return [None if s is None else lay(s, d, a, f) if j == 0 else SUM for j, s in enumerate(ishapes)]


def _embedding(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    d, _, _ = _out(node, outs, oshapes, B)
    if d == len(oshapes[0]) - 1:
        raise Refuse("EmbeddingBackward0: the samples are in the embedding dim")
    if saved(node, "sparse"):
        raise Refuse("nn.Embedding(sparse=True): its gradient is sparse")
    return [SUM for _ in ishapes]


def _activation_then_params(
    node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int
) -> list[State]:
    """An elementwise op on its first input whose other inputs are parameters broadcast over every position
    (``prelu``'s per-channel slope)."""
    d, a, f = _out(node, outs, oshapes, B)
    s = ishapes[0]
    if s is not None and s != oshapes[0]:
        raise Refuse(f"{node.name()}: input {list(s)} is not elementwise to {list(oshapes[0])}")
    return [None if t is None else lay(t, d, a, f) if j == 0 else SUM for j, t in enumerate(ishapes)]


def _nll(node: Node, outs: dict[int, Lay], oshapes: list[Shape], ishapes: list[Shape | None], B: int) -> list[State]:
    """``nll_loss(reduction='none')``: ``[N, C] → [N]`` (2-D: ``[N, C, H, W] → [N, H, W]``)."""
    d, a, f = _out(node, outs, oshapes, B)
    s = ishapes[0]
    assert s is not None
    return [lay(s, d + (d >= 1), a, f)] + [None if t is None else SUM for t in ishapes[1:]]


_ELEMENTWISE = (
    "AbsBackward0 AddBackward0 AliasBackward0 Atan2Backward0 AtanBackward0 BinaryCrossEntropyBackward0 "
    "BinaryCrossEntropyWithLogitsBackward0 CeluBackward0 ClampBackward0 ClampBackward1 ClampMaxBackward1 "
    "ClampMinBackward1 CloneBackward0 CosBackward0 DivBackward0 DivBackward2 EluBackward0 ErfBackward0 "
    "Exp2Backward0 ExpBackward0 ExpandBackward0 Expm1Backward0 GeluBackward0 HardsigmoidBackward0 "
    "HardswishBackward0 HardtanhBackward0 HuberLossBackward0 LeakyReluBackward0 Log1PBackward0 LogBackward0 "
    "LogSigmoidBackward0 MaskedFillBackward0 MaskedFillBackward1 MaximumBackward0 MinimumBackward0 MishBackward0 "
    "MseLossBackward0 MulBackward0 NativeDropoutBackward0 NegBackward0 PowBackward0 PowBackward1 PowBackward2 "
    "ReciprocalBackward0 ReluBackward0 RsqrtBackward0 RsubBackward0 RsubBackward1 SigmoidBackward0 SiluBackward0 "
    "SinBackward0 SmoothL1LossBackward0 SoftplusBackward0 SqrtBackward0 SubBackward0 TanhBackward0 "
    "ThresholdBackward0 ToCopyBackward0 WhereBackward0"
).split()
_VIEWS = (
    "ViewBackward0 UnsafeViewBackward0 ReshapeAliasBackward0 SqueezeBackward0 SqueezeBackward1 "
    "SqueezeBackward2 SqueezeBackward4 UnsqueezeBackward0"
).split()
_REDUCTIONS = (
    "SumBackward1 MeanBackward1 AmaxBackward0 AminBackward0 LogsumexpBackward0 LinalgVectorNormBackward0 "
    "VarBackward0 StdBackward0 MaxBackward0 MinBackward0"
).split()
_ATTENTION = (
    "ScaledDotProductFlashAttentionForCpuBackward0 ScaledDotProductEfficientAttentionBackward0 "
    "ScaledDotProductFlashAttentionBackward0 ScaledDotProductCudnnAttentionBackward0"
).split()

#: node name → rule (every node type the proof knows; any other node on a task's path to a shared parameter
#: refuses the proof, by name)
RULES: dict[str, Rule] = {
    **dict.fromkeys(_ELEMENTWISE, _broadcast),
    **dict.fromkeys(_VIEWS, _view),
    **dict.fromkeys(("TBackward0", "TransposeBackward0", "PermuteBackward0"), _permute),
    **dict.fromkeys(_REDUCTIONS, _reduce),
    **dict.fromkeys(
        ("SoftmaxBackward0", "LogSoftmaxBackward0", "CumsumBackward0", "SliceBackward0", "CatBackward0"),
        _along(["dim"]),
    ),
    **dict.fromkeys(("FlipBackward0", "RollBackward0"), _along(["dims"])),
    **dict.fromkeys(("SelectBackward0", "StackBackward0"), _select),
    **dict.fromkeys(("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0"), _split),
    **dict.fromkeys(("AddmmBackward0", "MmBackward0", "BmmBackward0", "BaddbmmBackward0", *_ATTENTION), _leading),
    "ConvolutionBackward0": _spatial(0, first=True),
    "NativeGroupNormBackward0": _spatial(0, first=True),
    "NativeLayerNormBackward0": _spatial(0),
    **{f"{kind}Pool{n}DBackward0": _spatial(n) for kind in ("Avg", "AdaptiveAvg", "AdaptiveMax") for n in (2, 3)},
    **{f"MaxPool{n}DWithIndicesBackward0": _spatial(n) for n in (2, 3)},
    "NativeBatchNormBackward0": _batch_norm,
    "EmbeddingBackward0": _embedding,
    "PreluKernelBackward0": _activation_then_params,
    "NllLossBackward0": _nll,
    "NllLoss2DBackward0": _nll,
}

#: parameter-side nodes that only re-index a parameter (the Gram of its per-sample gradients is unchanged)
REINDEX = frozenset(_VIEWS) | {
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "AliasBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
}
