"""Normalization layers: statistics over the normalized axes are permutation invariant."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType
from permgraph.infer.registry import register

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
