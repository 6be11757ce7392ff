"""Linear algebra: linear layers, matrix products and convolutions."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.axes import Reason
from permgraph.infer.context import Args, RuleContext, TType
from permgraph.infer.registry import register

aten = torch.ops.aten


@register(aten.linear)
def linear(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """W's in axis is x's last axis; W's out axis (and the bias) is the output's. A vector ``W`` ``(in,)``
    contracts x's last axis away (a scalar score per row: D-FINE's); its scalar bias has no axis."""
    x, w, b = a.t("input"), a.t("weight"), a.t("bias")
    cx.unify(x[-1], w[-1])
    if len(w) == 1:
        return list(x[:-1])
    if b is not None:
        cx.unify(b[0], w[0])
    return list(x[:-1]) + [w[0]]


@register(aten.addmm)
def addmm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``self + mat1 @ mat2`` (GPT-2's Conv1D): a product plus a broadcast bias."""
    out = matmul_type(cx, a.t("mat1"), a.t("mat2"))
    broadcast_into(cx, a.t("self"), out)
    return out


@register(aten.mm, aten.bmm, aten.matmul)
def matmul(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Matrix product (eager attention's ``q @ k^T`` and ``attn @ v`` too)."""
    return matmul_type(cx, a.t("self"), a.t("mat2" if "mat2" in a else "other"))


@register(aten._grouped_mm)
def grouped_mm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``torch._grouped_mm``: a MoE's experts over tokens sorted by expert.

    ``(T, K) x (E, K, N)`` with ``offs``: row ``t`` is multiplied by ``b[g(t)]``, ``g`` given by the
    offsets, so ``out[t, n] = sum_k a[t, k] b[g(t), k, n]``. The contracted ``k`` unifies; ``n``
    passes to the result, one permutation for every group; the rows and the groups (whose order
    the offsets fix) are fixed. Without offsets, ``(E, T, K) x (E, K, N)`` is a batched product.
    Other layouts (offsets along ``K``, a 3-D ``a``) fix every axis.
    """
    x, w, b = a.t("self"), a.t("mat2"), a.t("bias")
    if a.get("offs") is None and len(x) == 3 and len(w) == 3:
        out = matmul_type(cx, x, w)
    elif a.get("offs") is not None and len(x) == 2 and len(w) == 3:
        cx.unify(x[1], w[1])
        cx.fix(x[0], "rows grouped by offsets (torch._grouped_mm)")
        cx.fix(w[0], "groups selected by offsets (torch._grouped_mm)")
        out = [x[0], w[2]]
    else:
        for ty in (x, w, b):
            cx.fix_all(ty, "torch._grouped_mm with offsets along this layout")
        return cx.fresh(cx.out_shape(), "torch._grouped_mm with offsets along this layout")
    if b is not None:  # (E, N): one bias row per group
        cx.fix_all(b[:-1], "groups selected by offsets (torch._grouped_mm)")
        cx.unify(b[-1], out[-1])
    return out


@register(aten.outer, aten.ger)
def outer(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Outer product: the two vectors' axes side by side."""
    return [a.t("self")[0], a.t("vec2")[0]]


@register(aten.baddbmm)
def baddbmm(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``self + batch1 @ batch2``."""
    out = matmul_type(cx, a.t("batch1"), a.t("batch2"))
    broadcast_into(cx, a.t("self"), out)
    return out


@register(aten.einsum)
def einsum(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Einstein summation: every dim labelled by one letter is one axis, across operands and output.

    Permuting a letter's axis the same way in every operand permutes the output along it (or leaves
    a sum over it unchanged), so all its dims unify; a dim of size 1 (broadcast) or along which the
    operand is constant constrains nothing. A repeated letter (a diagonal) unifies its dims too.
    """
    nodes = list(a["tensors"])
    types = [cx.t(x) for x in nodes]
    if any(t is None for t in types):
        return cx.fresh(cx.out_shape(), "einsum of a non-tensor")
    ins, outs = einsum_labels(a["equation"], [len(t) for t in types])
    dims: dict[str, list[int]] = {}
    uniform_only: dict[str, int] = {}
    for x, t, labels in zip(nodes, types, ins):
        uni = cx.uniform_dims(x)
        for d, (atom, lab) in enumerate(zip(t, labels)):
            size = cx.store.size(atom)
            if size == 1:
                continue
            if d in uni:
                uniform_only.setdefault(lab, size)
            else:
                dims.setdefault(lab, []).append(atom)
    for atoms in dims.values():
        for other in atoms[1:]:
            cx.unify(atoms[0], other)
    shape = cx.out_shape()
    res, uniform = [], set()
    for i, lab in enumerate(outs):
        atoms = dims.get(lab)
        if atoms and cx.store.size(atoms[0]) == shape[i]:
            res.append(atoms[0])
        elif atoms:
            res.append(cx.store.new(shape[i], Reason("einsum result size differs from its operands", cx.where)))
        else:
            res.append(cx.store.new(shape[i]))  # size 1, or constant along it in every operand
            uniform.add(i)
    cx.set_uniform(uniform)
    return res


def einsum_labels(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """One label per dim of each operand and of the result; an ellipsis's dims get labels
    ``"...k"`` aligned from the right (they broadcast like batch dims)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(f"einsum equation {equation!r} has {len(terms)} operands, got {len(ndims)}")
    ell = max((n - len(t.replace("...", "")) for t, n in zip(terms, ndims) if "..." in t), default=0)

    def expand(term: str, n: int) -> list[str]:
        head, dots, tail = term.partition("...")
        k = n - len(head) - len(tail) if dots else 0
        return list(head) + [f"...{j}" for j in range(ell - k, ell)] + list(tail)

    ins = [expand(t, n) for t, n in zip(terms, ndims)]
    if arrow:
        out = expand(rhs, len(rhs.replace("...", "")) + ell)
    else:
        counts: dict[str, int] = {}
        for t in terms:
            for c in t.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        out = [f"...{j}" for j in range(ell)] + sorted(c for c, k in counts.items() if k == 1)
    return ins, out


@register(aten.cdist, aten._cdist_forward)
def cdist(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Pairwise p-norm distances ``(..., P, M), (..., R, M) -> (..., P, R)`` (a quantizer's distances to its
    codebook): the compared features are one axis (a permutation of it leaves every distance), the rows of
    each operand pass, batch axes broadcast."""
    x, y = a.t("x1"), a.t("x2")
    cx.unify(x[-1], y[-1])
    return _batch_axes(cx, list(x[:-2]), list(y[:-2])) + [x[-2], y[-2]]


def matmul_type(cx: RuleContext, x: TType, y: TType) -> TType:
    """Batched matrix product: batch axes broadcast, the contracted axes unify."""
    xv, yv = len(x) == 1, len(y) == 1
    x2 = [cx.store.new(1)] + list(x) if xv else list(x)
    y2 = list(y) + [cx.store.new(1)] if yv else list(y)
    cx.unify(x2[-1], y2[-2])
    out = _batch_axes(cx, x2[:-2], y2[:-2]) + [x2[-2], y2[-1]]
    if xv:
        out.pop(-2)
    if yv:
        out.pop(-1)
    return out


def _batch_axes(cx: RuleContext, bx: list[int], by: list[int]) -> list[int]:
    """Broadcast two lists of batch axes: equal non-unit sizes unify."""
    n = max(len(bx), len(by))
    px: list[int | None] = [None] * (n - len(bx)) + bx
    py: list[int | None] = [None] * (n - len(by)) + by
    batch = []
    for p, q in zip(px, py):
        sp = cx.store.size(p) if p is not None else 1
        sq = cx.store.size(q) if q is not None else 1
        if sp == sq and sp != 1:
            cx.unify(p, q)
            batch.append(p)
        elif sp >= sq:
            batch.append(p if p is not None else cx.store.new(1))
        else:
            batch.append(q)
    return batch


def broadcast_into(cx: RuleContext, src: TType | None, dst: TType, uniform: frozenset[int] = frozenset()) -> None:
    """Unify ``src``'s axes with the full-size axes of ``dst`` they broadcast to."""
    if src is None:
        return
    off = len(dst) - len(src)
    for j, atom in enumerate(src):
        if j not in uniform and cx.store.size(atom) == cx.store.size(dst[j + off]) and cx.store.size(atom) != 1:
            cx.unify(atom, dst[j + off])


@register(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution, aten.conv_transpose1d,
          aten.conv_transpose2d, aten.conv_transpose3d)
def conv(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Channels behave like a linear layer's features; kernel and spatial axes are fixed.

    With ``groups`` the channel axes are ``(groups, per group)``: the groups factor of the input
    channels, of the output channels and of the weight's output axis is one axis (whole groups move
    together, so depthwise channels stay free); the weight's per-group input axis is the input's
    per-group factor, one permutation shared by all groups. Transposed weights are ``(in, out/groups)``.
    """
    x, w, b = a.t("input"), a.t("weight"), a.t("bias")
    groups = a.get("groups") or 1
    transposed = bool(a.get("transposed")) or "conv_transpose" in str(node.target)
    for k in w[2:]:
        cx.fix(k, "convolution kernel")
    if transposed:
        cx.unify(x[1], w[0])
        out_ch = w[1] if groups == 1 else cx.store.make(
            "prod", [cx.store.split(x[1], "prod", [groups, cx.store.size(x[1]) // groups], cx.where)[0], w[1]])
    elif groups == 1:
        cx.unify(x[1], w[1])
        out_ch = w[0]
    else:
        cin, cout = cx.store.size(x[1]), cx.store.size(w[0])
        g_in, per_in = cx.store.split(x[1], "prod", [groups, cin // groups], cx.where)
        g_out, _ = cx.store.split(w[0], "prod", [groups, cout // groups], cx.where)
        if cin // groups > 1:
            cx.unify(per_in, w[1])
        if groups > 1:
            cx.unify(g_in, g_out)
        out_ch = w[0]
    if b is not None:
        cx.unify(b[0], out_ch)
    out = cx.out_shape()
    return [x[0], out_ch] + cx.fresh(out[2:], "spatial positions")


@register(aten.im2col)
def im2col(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``unfold``: ``(N, C, H, W) -> (N, C * kh * kw, L)``, row ``c * kh * kw + k`` holding channel
    ``c`` at kernel offset ``k`` of each of the ``L`` blocks. The batch axis passes; the columns are
    ``(channels, kernel positions)``: channels stay free, kernel positions and the spatial axes
    (and so the blocks) are fixed."""
    t = a.t("self")
    kh, kw = a["kernel_size"]
    batch, ch = list(t[:-3]), t[-3]
    for x in t[-2:]:
        cx.fix(x, "spatial positions (im2col)")
    kernel = cx.store.new(kh * kw, Reason("kernel positions (im2col)", cx.where))
    blocks = cx.fresh(cx.out_shape()[-1:], "sliding blocks (im2col)")
    return batch + [cx.store.make("prod", [ch, kernel])] + blocks


@register(aten.col2im)
def col2im(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``fold``, the inverse layout of ``im2col``: ``(N, C * kh * kw, L) -> (N, C, H, W)``, summing
    the blocks' values at each position. The batch axis passes; the columns are ``(channels, kernel
    positions)``, channels passing to the result; kernel positions, blocks and the result's
    spatial axes are fixed."""
    t = a.t("self")
    kh, kw = a["kernel_size"]
    batch, cols, blocks = list(t[:-2]), t[-2], t[-1]
    cx.fix(blocks, "sliding blocks (col2im)")
    n = cx.store.size(cols)
    ch, kernel = cx.store.split(cols, "prod", [n // (kh * kw), kh * kw], cx.where)
    if kh * kw > 1:
        cx.fix(kernel, "kernel positions (col2im)")
    return batch + [ch] + cx.fresh(cx.out_shape()[-2:], "spatial positions (col2im)")
