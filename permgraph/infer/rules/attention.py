"""Scaled dot-product attention: heads shared by q, k, v; q/k and v/o within-head axes apart.

Only axes are unified and refined here; which groups are heads, q/k or v/o is
named after inference by ``permgraph.infer.roles``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType
from permgraph.infer.registry import register
from permgraph.infer.rules.linalg import broadcast_into

aten = torch.ops.aten


@register(aten.scaled_dot_product_attention)
def sdpa(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """q, k, v share the head axis; q and k share the contracted axis; v's passes out.

    With ``enable_gqa`` the query heads nest inside the key/value heads.
    """
    q, k, v = a.t("query"), a.t("key"), a.t("value")
    cx.unify(k[-3], v[-3])
    cx.unify(k[-2], v[-2])
    cx.unify(q[-1], k[-1])
    for i in range(len(q) - 3):
        if cx.store.size(q[i]) == cx.store.size(k[i]) and cx.store.size(q[i]) != 1:
            cx.unify(q[i], k[i])
    _unify_heads(cx, q[-3], k[-3])
    mask = a.t("attn_mask")
    if mask is not None:
        scores = list(q[:-1]) + [k[-2]]
        broadcast_into(cx, mask, scores, cx.uniform_dims(a.get("attn_mask")))
    return list(q[:-1]) + [v[-1]]


def _unify_heads(cx: RuleContext, hq: int, hk: int) -> None:
    """Equal head counts unify; otherwise query heads are (kv heads, queries per kv head)."""
    nq, nk = cx.store.size(hq), cx.store.size(hk)
    if nq == nk:
        cx.unify(hq, hk)
    else:
        kv, _ = cx.store.split(hq, "prod", [nk, nq // nk], cx.where)
        cx.unify(kv, hk)


@register(aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
          aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention)
def sdpa_lowered(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Backend variants: the attention output plus statistics (fresh axes)."""
    out = sdpa(cx, node, a)
    rest = [cx.fresh(tuple(int(s) for s in v.shape), "attention statistics") if hasattr(v, "shape") else None
            for v in node.meta["val"][1:]]
    return [out] + rest
