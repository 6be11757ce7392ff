"""Residual shortcuts: the additions ``x + f(x)`` whose branch ``f`` passes through a layer.

TransFusion's residual step (App. A.3) lets every residual addend keep its own
permutation: the shortcut ``x`` then enters the sum through ``P_out P_in^T``
instead of the identity. Inference models that by not unifying the shortcut
operand with the sum (``permgraph.infer.engine``, ``untie``): the sum takes the
branch's axes, the shortcut keeps its own. A shortcut is the operand of an
``add`` that is an ancestor of the other operand through a contraction (a matrix
product, convolution or attention), with the sum's shape; additions inside an
activation (``x + 0.044715 x^3``) or of independent terms (token + position
embeddings) are not shortcuts.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import concrete

aten = torch.ops.aten

_ADDS = {aten.add.Tensor}
_CONTRACTIONS = {
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "einsum", "_grouped_mm",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
}


def _is_contraction(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and getattr(packet, "__name__", "") in _CONTRACTIONS


def residual_shortcuts(graph: fx.Graph) -> dict[fx.Node, int]:
    """``add`` node -> the position of its shortcut operand, for every residual addition."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    out: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) < 2:
            continue
        x, y = node.args[0], node.args[1]
        if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)) or not _same_shape(node, x, y):
            continue
        if _through_contraction(x, y, order):
            out[node] = 0
        elif _through_contraction(y, x, order):
            out[node] = 1
    return out


def _same_shape(node: fx.Node, *args: fx.Node) -> bool:
    """Equal shapes, data-dependent sizes compared by their expression (no guard on their values)."""
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in (node, *args)]
    if any(s is None for s in shapes):
        return False
    sizes = [tuple(concrete(d) for d in s) for s in shapes]
    return all(s == sizes[0] for s in sizes)


def _through_contraction(src: fx.Node, dst: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``dst`` depends on ``src`` along a path through a contraction (nodes before ``src``
    in graph order cannot lie on a path from it, so the search stays local)."""
    lo = order[src]
    seen: set[tuple[fx.Node, bool]] = set()
    stack = [(dst, _is_contraction(dst))]
    while stack:
        n, through = stack.pop()
        for m in n.all_input_nodes:
            if m is src:
                if through:
                    return True
                continue
            if order[m] < lo:
                continue
            key = (m, through or _is_contraction(m))
            if key not in seen:
                seen.add(key)
                stack.append(key)
    return False
