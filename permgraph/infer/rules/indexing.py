"""Indexing by tensors: indexed axes are fixed, the rest pass through."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType, norm_dim
from permgraph.infer.registry import register

aten = torch.ops.aten


@register(aten.index)
def index(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Advanced indexing: indexed axes are fixed; the rest pass through."""
    t = a.t("self")
    pos = [i for i, x in enumerate(a["indices"]) if x is not None]
    for i in pos:
        cx.fix(t[i], "indexed by a tensor")
    out = cx.out_shape()
    rest = [x for i, x in enumerate(t) if i not in pos]
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    before = list(t[: pos[0]]) if adjacent else []
    mid = cx.fresh(out[len(before): len(before) + len(out) - len(rest)], "index values")
    return before + mid + (list(t[pos[-1] + 1:]) if adjacent else rest)


@register(aten.index_select, aten.gather, aten.take_along_dim)
def index_select(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """The indexed axis is fixed; axes whose size changed carry index values (fixed)."""
    t = a.t("self")
    dim = norm_dim(a["dim"], len(t))
    cx.fix(t[dim], f"indexed by {node.target}")
    out = cx.out_shape()
    res = []
    for i, s in enumerate(out):
        if i != dim and cx.store.size(t[i]) == s:
            res.append(t[i])
        else:
            res.append(cx.store.new(s, None))
            cx.fix(res[-1], "index values")
    return res


@register(aten.embedding)
def embedding(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Rows of the table are looked up by index: vocabulary fixed, features free."""
    w, idx = a.t("weight"), a.t("indices")
    cx.fix(w[0], "embedding lookup (vocabulary / positions)")
    return list(idx) + [w[1]]
