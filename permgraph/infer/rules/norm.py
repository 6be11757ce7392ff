"""Normalization layers: statistics over the normalized axes are permutation invariant."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType
from permgraph.infer.registry import register
from permgraph.infer.rules.linalg import broadcast_into

aten = torch.ops.aten


@register(aten.layer_norm, aten.rms_norm)
def layer_norm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Statistics over the normalized axes are invariant; weight and bias join them."""
    x = a.t("input")
    k = len(a["normalized_shape"])
    for p in ("weight", "bias"):
        w = a.t(p)
        if w is not None:
            for xi, wi in zip(x[-k:], w):
                cx.unify(xi, wi)
    return list(x)


@register(aten.native_layer_norm)
def native_layer_norm(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Like ``layer_norm``, plus mean and rstd with unit normalized axes."""
    out = layer_norm(cx, node, a)
    k = len(a["normalized_shape"])
    stats = list(out[:-k]) + [cx.store.new(1) for _ in range(k)]
    return [out, stats, list(stats)]


@register(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.native_batch_norm, aten.instance_norm)
def batch_norm(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Per-channel statistics and affine: weight, bias and the running stats (state buffers that move
    with their channel) join the channel axis (dim 1). Extra results (saved stats) are per channel."""
    x = a.t("input")
    for p in ("weight", "bias", "running_mean", "running_var"):
        w = a.t(p)
        if w is not None:
            cx.unify(w[0], x[1])
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [list(x)] + [[x[1]] if hasattr(v, "shape") and tuple(v.shape) == (cx.store.size(x[1]),)
                            else cx.fresh(tuple(int(s) for s in v.shape), "batch-norm statistics")
                            for v in val[1:]]
    return list(x)


@register(aten.group_norm)
def group_norm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Statistics per group of channels: channels are ``(groups, per group)``; weight and bias join."""
    x = a.t("input")
    g = a["num_groups"]
    c = cx.store.size(x[1])
    if 1 < g < c:
        cx.store.split(x[1], "prod", [g, c // g], cx.where)
    for p in ("weight", "bias"):
        w = a.t(p)
        if w is not None:
            cx.unify(w[0], x[1])
    return list(x)


@register(aten._weight_norm)
def weight_norm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``w = v * g / ||v||``, the norm over every dim of ``v`` but ``dim`` (over all of them when
    ``dim == -1``, not the last): a norm is invariant under permutations of the axes it reduces,
    so ``v``'s axes pass to ``w``; ``g`` broadcasts into ``v`` (shape ``(1, .., n, .., 1)``: its
    ``dim`` axis is ``v``'s, the unit axes constrain nothing)."""
    v, g = a.t("v"), a.t("g")
    if g is None or len(g) > len(v) or tuple(cx.store.size(x) for x in v) != cx.out_shape():
        cx.fix_all([v, g], "weight norm with a gain that does not broadcast into the weight")
        return cx.fresh(cx.out_shape(), "weight norm with a gain that does not broadcast into the weight")
    broadcast_into(cx, g, v, cx.uniform_dims(a["g"]))
    return list(v)
