"""Elementwise ops (broadcasting), softmax-like normalizations and dropout."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType, norm_dim
from permgraph.infer.registry import family, passes_values, register
from permgraph.infer.rules.indexing import positions_of_true

aten = torch.ops.aten


def elementwise(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Broadcast operands: axes aligned with a full-size output axis are unified."""
    out = cx.out_shape()
    ty: list[int | None] = [None] * len(out)
    varying: set[int] = set()
    for x in a.values():
        for y in x if isinstance(x, (list, tuple)) else [x]:
            tx = cx.t(y)
            if tx is None:
                continue
            off = len(out) - len(tx)
            uni = cx.uniform_dims(y)
            for j, atom in enumerate(tx):
                i = j + off
                if i < 0 or cx.store.size(atom) != out[i] or out[i] == 1 or j in uni:
                    continue
                varying.add(i)
                if ty[i] is None:
                    ty[i] = atom
                else:
                    cx.unify(ty[i], atom)
    cx.set_uniform(set(range(len(out))) - varying)
    return [t if t is not None else cx.store.new(s) for t, s in zip(ty, out)]


def_elementwise = family(elementwise)


@register(aten.where)
def where(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``where(cond, x, y)`` is elementwise; ``where(cond)`` alone is ``nonzero(cond, as_tuple=True)``."""
    if a.get("self") is None and a.get("other") is None:
        return positions_of_true(cx, node, a)
    return elementwise(cx, node, a)


@register(aten.isin)
def isin(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``isin(x, S)[i] = x[i] in set(S)``: elementwise in ``x``; a set has no order, so ``S``'s axes are
    neither constrained nor passed on."""
    if not isinstance(a.get("elements"), fx.Node):  # ``isin(scalar, S)``: one answer
        return [cx.store.new(s) for s in cx.out_shape()]
    return list(a.t("elements"))

def_elementwise(  # arithmetic and comparisons
    aten.add, aten.sub, aten.rsub, aten.mul, aten.multiply, aten.div, aten.true_divide, aten.floor_divide,
    aten.remainder, aten.fmod, aten.pow, aten.maximum, aten.minimum, aten.masked_fill,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
    aten.logical_and, aten.logical_or, aten.logical_not, aten.logical_xor,
    aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.bitwise_xor, aten.__and__, aten.__or__, aten.__xor__,
    aten.__iand__, aten.__ior__, aten.__ixor__,  # in place (``mask |= other``), packets of their own
    aten.clamp, aten.clamp_min, aten.clamp_max, aten.clip, aten.lerp, aten.addcmul, aten.addcdiv,
    aten.copysign, aten.atan2, aten.hypot, aten.xlogy,
)
def_elementwise(  # unary math and activations
    aten.neg, aten.abs, aten.sign, aten.exp, aten.exp2, aten.expm1, aten.log, aten.log1p, aten.log2,
    aten.sqrt, aten.rsqrt, aten.reciprocal, aten.square, aten.sin, aten.cos, aten.tan, aten.acos, aten.tanh,
    aten.asin, aten.atan, aten.sinh, aten.cosh, aten.asinh, aten.acosh, aten.atanh, aten.sgn, aten.log10,
    aten.sinc, aten.deg2rad, aten.rad2deg, aten.i0, aten.lgamma, aten.digamma, aten.sigmoid,
    aten.relu, aten.relu6, aten.gelu, aten.silu, aten.mish, aten.elu, aten.selu, aten.celu, aten.leaky_relu,
    aten.hardtanh, aten.hardsigmoid, aten.hardswish, aten.softplus, aten.erf, aten.erfc, aten.erfinv,
    aten.logit, aten.isnan, aten.isinf, aten.isfinite, aten.nan_to_num,
    aten.floor, aten.ceil, aten.round, aten.trunc, aten.frac, aten.threshold, aten.log_sigmoid,
    aten._prelu_kernel,  # PReLU with its slopes already shaped to broadcast
)
def_elementwise(  # complex numbers (RoPE as complex rotations: Llama 4, DeepSeek-V2)
    aten.polar, aten.complex, aten.real, aten.imag, aten.conj, aten.conj_physical, aten.angle, aten._conj,
    aten.resolve_conj, aten.resolve_neg,
)
def_elementwise(  # dropout and fills
    aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.fill, aten.zero,
)


@passes_values
def copy(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Copies, casts and identities: elementwise, and index values pass through."""
    return elementwise(cx, node, a)


family(copy)(aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.detach,
             aten.lift_fresh_copy)


@register(aten.native_dropout)
def native_dropout(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Output and mask both have the input's type."""
    t = a.t("input")
    return [list(t), list(t)]


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Equivariant under any permutation of the normalized axis."""
    return list(a.t("self"))


@register(aten.copy)
def copy_into(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``copy_(dst, src)``: ``dst`` takes ``src``'s values (broadcast), so their axes unify like an
    elementwise op's; the engine marks the written buffer as no longer constant."""
    dst, src = a.t("self"), a.t("src")
    uni = cx.uniform_dims(a["src"])
    off = len(dst) - len(src)
    for j, x in enumerate(src):
        if j not in uni and cx.store.size(x) == cx.store.size(dst[j + off]) and cx.store.size(x) != 1:
            cx.unify(x, dst[j + off])
    return list(dst)


@register(aten.prelu)
def prelu(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``max(0, x) + w * min(0, x)`` with one slope per channel (dim 1; dim 0 of a vector), or one for all:
    the slopes move with the channel axis, the others pass."""
    t, w = list(a.t("self")), a.t("weight")
    if len(w) == 1 and cx.store.size(w[0]) > 1:
        cx.unify(w[0], t[1 if len(t) > 1 else 0])
    return t


@register(aten.glu)
def glu(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``a * sigmoid(b)`` for the halves ``a | b`` of ``dim`` (conformers' convolution module): the
    axis is ``Cat(u, u)``, one permutation of the units for both halves, and the result's axis is ``u``."""
    t = list(a.t("self"))
    dim = norm_dim(a.get("dim", -1), len(t))
    half = cx.store.new(cx.store.size(t[dim]) // 2)
    cx.unify(t[dim], cx.store.make("cat", [half, half]))
    t[dim] = half
    return t
