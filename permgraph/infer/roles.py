"""Attention roles, named after unification: heads, q/k and v/o within-head axes.

Shape rules only unify and refine axes. This pass runs once inference is done,
reads the final axis structure at every attention op (SDPA and its backend
variants, and the batched products of eager attention), and tags atoms with
roles through ``AxisStore.add_role``; ``permgraph.spec`` names groups by them:

- ``heads``: the head axis (the kv-head axis under GQA);
- ``q_per_kv``: query heads nested inside a kv head (GQA);
- ``qk``: the within-head axis contracted by ``q @ k^T``;
- ``vo``: v's within-head axis, carried out of the attention.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from permgraph.axes import AxisStore
from permgraph.infer.context import Args
from permgraph.infer.registry import rule_key
from permgraph.infer.rules.linalg import einsum_labels as _einsum_labels

aten = torch.ops.aten

RoleRule = Callable[[AxisStore, Args, Any], None]

# ops that only reshape, select or copy a tensor: an operand reached through them is still that tensor
_PASS_THROUGH = {aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.t,
                 aten.expand, aten.unsqueeze, aten.squeeze, aten.index, aten.index_select, aten.select,
                 aten.slice, aten.contiguous, aten.clone, aten._to_copy, aten.to, aten.alias, aten.detach}


def assign_roles(graph: fx.Graph, store: AxisStore, node_types: Mapping[str, Any],
                 weights: set[str] = frozenset()) -> None:
    """Tag the atoms of every attention op in ``graph`` with their roles, in graph order.

    ``weights``: names of the placeholders that are parameters (or state): a product with one
    of them (reshaped or indexed, like MoE's batched experts) is a layer, not attention.
    """
    types = {n: node_types.get(n.name) for n in graph.nodes}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        key = rule_key(node.target)
        fn = _ROLE_RULES.get(key)
        if fn is None:
            continue
        if fn in _PRODUCTS and any(_is_weight(x, weights) for x in node.all_input_nodes):
            continue
        fn(store, Args(node, types), types.get(node))


def _is_weight(node: fx.Node, weights: set[str], depth: int = 8) -> bool:
    """Whether ``node`` is a parameter seen through reshapes, selections and copies."""
    for _ in range(depth):
        if node.op == "placeholder":
            return node.name in weights
        if node.op != "call_function" or rule_key(node.target) not in _PASS_THROUGH or not node.all_input_nodes:
            return False
        node = node.all_input_nodes[0]
    return False


def _sdpa_roles(store: AxisStore, a: Args, out: Any) -> None:
    """q/k share ``qk``; v carries ``vo``; the head axes are ``heads`` (and ``q_per_kv``)."""
    q, k, v = a.t("query"), a.t("key"), a.t("value")
    per = _query_per_kv(store, q[-3], k[-3])
    if per is not None:
        store.add_role(per, "q_per_kv")
    store.add_role(k[-3], "heads")
    _tag_heads(store, q[-3])
    store.add_role(q[-1], "qk")
    store.add_role(v[-1], "vo")


def _matmul_roles(store: AxisStore, a: Args, out: Any) -> None:
    """A batched product of activations is eager attention: ``q @ k^T`` or ``attn @ v``."""
    x, y = a.t("self"), a.t("mat2" if "mat2" in a else "other")
    if len(x) < 3 or len(y) < 3:
        return
    store.add_role(x[-1], "qk")  # q @ k^T contracts the q/k within-head axis
    store.add_role(out[-1], "vo")  # attn @ v carries v's within-head axis out
    if len(x) >= 4:
        _tag_heads(store, x[-3])


def _baddbmm_roles(store: AxisStore, a: Args, out: Any) -> None:
    """``bias + q @ k^T`` as one batched product (Bloom's ALiBi scores): ``batch1``'s last axis is ``qk``."""
    x = a.t("batch1")
    if x is not None and len(x) >= 3:
        store.add_role(x[-1], "qk")


def _einsum_roles(store: AxisStore, a: Args, out: Any) -> None:
    """A two-operand einsum of activations is eager attention written as ``bind,bjnd->bnij`` (or
    ``bnij,bjnd->bind``): the contracted letters are ``qk``, the second operand's letters carried
    to the result are ``vo``, and with both, the free letters shared by operands and result are
    ``heads`` (the batch letter is fixed by the input)."""
    nodes = list(a["tensors"])
    types = [a.type_of(x) for x in nodes]
    if len(types) != 2 or any(t is None or len(t) < 3 for t in types):
        return
    (lx, ly), lo = _einsum_labels(a["equation"], [len(t) for t in types])
    x = types[0]
    contracted = [c for c in dict.fromkeys(lx) if c in ly and c not in lo]
    carried = [c for c in dict.fromkeys(ly) if c in lo and c not in lx]
    shared = [c for c in dict.fromkeys(lx) if c in ly and c in lo]
    if not contracted or not carried:
        return
    for c in contracted:
        store.add_role(x[lx.index(c)], "qk")
    for c in carried:
        store.add_role(out[lo.index(c)], "vo")
    for c in shared:
        if not store.reasons(x[lx.index(c)]):
            _tag_heads(store, x[lx.index(c)])


def _query_per_kv(store: AxisStore, hq: int, hk: int) -> int | None:
    """Under GQA, the factor of the query-head axis that counts queries per kv head."""
    nq, nk = store.size(hq), store.size(hk)
    if nq == nk:
        return None
    factors = store.flat(hq, "prod")
    for i in range(len(factors)):
        if math.prod(store.size(f) for f in factors[i:]) == nq // nk:
            return factors[i] if i == len(factors) - 1 else None
    return None


def _tag_heads(store: AxisStore, heads: int) -> None:
    """Name the head axis; query heads nested in kv heads (GQA) get their own role. The kv heads are
    outer (``repeat_interleave``, ``expand``) unless the outer factor counts copies and the inner does
    not: ``k.repeat(1, g, 1, 1)`` makes the head axis ``(g, kv)`` (JetMoE's attention experts)."""
    nested = store.flat(heads, "prod")
    if len(nested) == 2:
        kv, per = nested
        if store.is_copies(kv) and not store.is_copies(per):
            kv, per = per, kv
        store.add_role(kv, "heads")
        store.add_role(per, "q_per_kv")
    else:
        store.add_role(heads, "heads")


def _router_roles(store: AxisStore, a: Args, out: Any) -> None:
    """A top-k over an axis picks experts (MoE routing): that axis is the expert axis."""
    t = a.t("self")
    if t:
        store.add_role(t[a["dim"] % len(t)], "experts")


_ROLE_RULES: dict[Any, RoleRule] = {
    aten.topk: _router_roles,
    aten.scaled_dot_product_attention: _sdpa_roles,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_roles,
    aten._scaled_dot_product_efficient_attention: _sdpa_roles,
    aten._scaled_dot_product_flash_attention: _sdpa_roles,
    aten._scaled_dot_product_cudnn_attention: _sdpa_roles,
    aten.mm: _matmul_roles,
    aten.bmm: _matmul_roles,
    aten.matmul: _matmul_roles,
    aten.baddbmm: _baddbmm_roles,
    aten.einsum: _einsum_roles,
}

_PRODUCTS = (_matmul_roles, _baddbmm_roles, _einsum_roles)  # skipped where an operand is a weight (a layer)
