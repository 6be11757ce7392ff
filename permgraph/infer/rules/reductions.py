"""Reductions (invariant over permuted axes) and order-dependent ops (which fix the axis)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType, norm_dim
from permgraph.infer.registry import family
from permgraph.infer.rules.shape import reshape_type

aten = torch.ops.aten


def reduction(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Reducing over a permuted axis is invariant; kept axes pass through."""
    t = a.t("self")
    dims = a.get("dim")
    if dims is None:
        dims = list(range(len(t)))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, len(t)) for d in dims} if len(t) else set()
    keep = bool(a.get("keepdim"))
    out = [(cx.store.new(1) if keep else None) if i in dims else x for i, x in enumerate(t)]
    out = [x for x in out if x is not None]
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [list(out) for _ in val]
    return out


def order_dependent(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Results depend on positions along the axis: that axis is fixed."""
    t = a.t("self")
    dims = _order_dims(a.get("dim", a.get("dims")), len(t))
    for d in dims:
        cx.fix(t[d], f"order-dependent op {node.target}")
    val = node.meta["val"]
    res = [_order_result(cx, t, dims, tuple(int(s) for s in v.shape))
           for v in (val if isinstance(val, (list, tuple)) else [val])]
    return res if isinstance(val, (list, tuple)) else res[0]


def _order_dims(dim: Any, ndim: int) -> list[int]:
    if isinstance(dim, (list, tuple)):
        return [norm_dim(d, ndim) for d in dim]
    return list(range(ndim)) if dim is None else [norm_dim(dim, ndim)]


def _order_result(cx: RuleContext, t: TType, dims: list[int], shape: tuple[int, ...]) -> TType:
    """One result: the input's type, its kept axes, or a reshape of those."""
    if shape == tuple(cx.store.size(x) for x in t):
        return list(t)
    kept = [x for i, x in enumerate(t) if i not in dims]
    if len(kept) == len(shape):
        return kept
    if math.prod(shape) == math.prod(cx.store.size(x) for x in kept):
        return reshape_type(cx, kept, shape)
    return cx.fresh(shape, "order-dependent result")


def_reduction = family(reduction)
def_order_dependent = family(order_dependent)

def_reduction(
    aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm, aten.norm,
    aten.logsumexp, aten.prod, aten.all, aten.any, aten.var_mean, aten.std_mean, aten.nansum, aten.nanmean,
)
def_order_dependent(
    aten.max, aten.min, aten.argmax, aten.argmin, aten.sort, aten.topk, aten.kthvalue, aten.median, aten.mode,
    aten.cumsum, aten.cumprod, aten.cummax, aten.cummin, aten.flip, aten.roll, aten.argsort, aten.diff,
)
