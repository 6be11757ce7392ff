"""Op rules: how each aten op constrains the axes of its inputs and outputs.

A rule gets the context, the node and its arguments bound by schema name, and
returns the output's type (one atom per dimension, or a list of those for ops
with several outputs). Rules are grouped by family; ``RULES`` maps aten op
names to them. An op missing here fixes every axis it touches.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch.fx as fx

from permgraph.infer.engine import RuleContext, TType

Rule = Callable[[RuleContext, fx.Node, dict[str, Any]], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# -- identity and elementwise ----------------------------------------------------

ELEMENTWISE = (
    "add sub rsub mul div true_divide floor_divide remainder fmod pow maximum minimum "
    "where masked_fill eq ne lt le gt ge logical_and logical_or logical_not logical_xor "
    "bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ __invert__ "
    "clamp clamp_min clamp_max clip lerp addcmul addcdiv copysign atan2 hypot "
    "neg abs sign exp exp2 expm1 log log1p log2 sqrt rsqrt reciprocal square sin cos tan "
    "tanh sigmoid relu relu6 gelu silu mish elu selu celu leaky_relu hardtanh hardsigmoid "
    "hardswish softplus softsign erf erfc erfinv logit glu_jvp isnan isinf isfinite nan_to_num "
    "floor ceil round trunc frac to _to_copy type_as clone contiguous alias detach dropout "
    "feature_dropout alpha_dropout lift_fresh_copy fill zero quick_gelu threshold "
    "_to_dim_order_copy log_sigmoid"
).split()


@rule(*ELEMENTWISE)
def elementwise(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Broadcast operands: axes aligned with a full-size output axis are unified."""
    out = cx.out_shape()
    ty: list[int | None] = [None] * len(out)
    varying: set[int] = set()
    for x in a.values():
        xs = x if isinstance(x, (list, tuple)) else [x]
        for y in xs:
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


@rule("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_size", "sym_numel", "sym_stride",
      "sym_constrain_range", "sym_constrain_range_for_size", "_assert_tensor_metadata_default")
def no_op(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> None:
    """Checks and symbolic sizes: no tensor result, no constraint."""
    return None


@rule("native_dropout")
def native_dropout(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> list[TType]:
    t = cx.t(a["input"])
    return [list(t), list(t)]


@rule("getitem")
def getitem(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> Any:
    src, idx = node.args
    ty = cx.types.get(src)
    return ty[idx] if isinstance(ty, (list, tuple)) and not _is_flat(ty) else None


def _is_flat(ty: Any) -> bool:
    return all(isinstance(i, int) for i in ty)


@rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def softmax(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Equivariant under any permutation of the normalized axis."""
    return list(cx.t(a.get("self", a.get("input"))))


# -- factories -------------------------------------------------------------------

@rule("full", "zeros", "ones", "empty", "new_ones", "new_zeros", "new_full", "new_empty",
      "zeros_like", "ones_like", "full_like", "empty_like", "scalar_tensor", "empty_strided")
def constant_factory(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """A constant tensor is invariant under every permutation: fresh, free axes."""
    out = cx.out_shape()
    cx.set_uniform(range(len(out)))
    return cx.fresh(out)


@rule("arange", "rand", "randn", "randint", "rand_like", "randn_like", "linspace", "tril_indices", "triu_indices")
def varying_factory(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    return cx.fresh(cx.out_shape(), f"values vary along the axis ({node.target})")


# -- shape ops -------------------------------------------------------------------

@rule("view", "reshape", "_unsafe_view", "unflatten", "flatten", "view_as", "reshape_as")
def reshape(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    return reshape_type(cx, cx.t(node.args[0]), cx.out_shape())


def reshape_type(cx: RuleContext, src: TType, out: tuple[int, ...]) -> TType:
    """Match runs of input dims to runs of output dims with equal products."""
    sizes = [cx.store.size(x) for x in src]
    res: list[int | None] = [None] * len(out)
    i = j = 0
    while i < len(sizes) or j < len(out):
        if i < len(sizes) and sizes[i] == 1:
            i += 1
            continue
        if j < len(out) and out[j] == 1:
            res[j] = cx.store.new(1)
            j += 1
            continue
        if i >= len(sizes) or j >= len(out):
            raise ValueError(f"internal: reshape mismatch at {cx.where}")
        i0, j0, pa, pb = i, j, sizes[i], out[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= sizes[i]
                i += 1
            else:
                pb *= out[j]
                j += 1
        ins = [src[k] for k in range(i0, i) if sizes[k] != 1]
        merged = cx.store.make("prod", ins)
        outs = [k for k in range(j0, j) if out[k] != 1]
        parts = cx.store.split(merged, "prod", [out[k] for k in outs], cx.where)
        for k, p in zip(outs, parts):
            res[k] = p
        for k in range(j0, j):
            if res[k] is None:
                res[k] = cx.store.new(1)
    return [r if r is not None else cx.store.new(1) for r in res]


@rule("transpose", "swapaxes", "swapdims")
def transpose(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = list(cx.t(node.args[0]))
    d0, d1 = _dim(node.args[1], len(t)), _dim(node.args[2], len(t))
    t[d0], t[d1] = t[d1], t[d0]
    swap = {d0: d1, d1: d0}
    cx.set_uniform({swap.get(d, d) for d in cx.uniform_dims(node.args[0])})
    return t


@rule("t", "numpy_T")
def t_(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    return list(reversed(cx.t(node.args[0])))


@rule("permute")
def permute(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = cx.t(a["self"])
    dims = [_dim(d, len(t)) for d in a["dims"]]
    uni = cx.uniform_dims(a["self"])
    cx.set_uniform({i for i, d in enumerate(dims) if d in uni})
    return [t[d] for d in dims]


@rule("unsqueeze")
def unsqueeze(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = list(cx.t(a["self"]))
    d = _dim(a["dim"], len(t) + 1)
    t.insert(d, cx.store.new(1))
    cx.set_uniform({u + (u >= d) for u in cx.uniform_dims(a["self"])})
    return t


@rule("squeeze")
def squeeze(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    return reshape_type(cx, cx.t(node.args[0]), cx.out_shape())


@rule("expand", "expand_as", "broadcast_to")
def expand(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Broadcast axes (size 1 -> n) are constant along n: fresh, free atoms."""
    t = cx.t(node.args[0])
    out = cx.out_shape()
    off = len(out) - len(t)
    uni = cx.uniform_dims(node.args[0])
    res, uniform = [], set()
    for i, s in enumerate(out):
        j = i - off
        if j >= 0 and cx.store.size(t[j]) == s:
            res.append(t[j])
            if j in uni:
                uniform.add(i)
        else:
            res.append(cx.store.new(s))
            uniform.add(i)
    cx.set_uniform(uniform)
    return res


@rule("repeat")
def repeat(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Tiling makes an axis of identical segments."""
    t = cx.t(a["self"])
    reps = list(a["repeats"])
    off = len(reps) - len(t)
    res = []
    for i, r in enumerate(reps):
        j = i - off
        if j < 0:
            res.append(cx.store.new(r))
        elif r == 1:
            res.append(t[j])
        elif cx.store.size(t[j]) == 1:
            res.append(cx.store.new(r))
        else:
            res.append(cx.store.make("cat", [t[j]] * r))
    return res


def _segments(cx: RuleContext, atom: int, sizes: list[int]) -> list[int]:
    return cx.store.split(atom, "cat", sizes, cx.where)


@rule("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split")
def split(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> list[TType]:
    t = cx.t(node.args[0])
    outs = node.meta["val"]
    dim = _dim(a.get("dim", 0) or 0, len(t))
    sizes = [int(o.shape[dim]) for o in outs]
    parts = _segments(cx, t[dim], sizes)
    return [t[:dim] + [p] + t[dim + 1:] for p in parts]


@rule("unbind")
def unbind(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> list[TType]:
    t = cx.t(a["self"])
    dim = _dim(a["dim"], len(t))
    cx.fix(t[dim], "indexed by unbind")
    return [t[:dim] + t[dim + 1:] for _ in range(cx.store.size(t[dim]))]


@rule("select")
def select(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = cx.t(a["self"])
    dim = _dim(a["dim"], len(t))
    if cx.store.size(t[dim]) > 1:
        cx.fix(t[dim], "indexed by select")
    return t[:dim] + t[dim + 1:]


@rule("slice", "narrow")
def slice_(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = cx.t(node.args[0])
    dim = _dim(a.get("dim", 0) or 0, len(t))
    n = cx.store.size(t[dim])
    if "length" in a:  # narrow
        start, step = a["start"], 1
        end = start + a["length"]
    else:
        start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
    start, end, _ = slice(start, end, step).indices(n)
    if start == 0 and end >= n and step == 1:
        return list(t)
    out = list(t)
    if step != 1:
        cx.fix(t[dim], f"strided slice (step {step})")
        out[dim] = cx.store.new(cx.out_shape()[dim], None)
        return out
    parts = _segments(cx, t[dim], [start, max(end - start, 0), n - max(end, start)])
    out[dim] = parts[1]
    return out


@rule("cat", "concat", "concatenate")
def cat(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    ts = [cx.t(x) for x in a["tensors"]]
    ts = [t for t in ts if t is not None and not (len(t) == 1 and cx.store.size(t[0]) == 0)]
    dim = _dim(a.get("dim", 0) or 0, len(ts[0]))
    for t in ts[1:]:
        for i in range(len(t)):
            if i != dim:
                cx.unify(ts[0][i], t[i])
    out = list(ts[0])
    out[dim] = cx.store.make("cat", [t[dim] for t in ts])
    return out


@rule("stack")
def stack(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    ts = [cx.t(x) for x in a["tensors"]]
    for t in ts[1:]:
        for x, y in zip(ts[0], t):
            cx.unify(x, y)
    dim = _dim(a.get("dim", 0) or 0, len(ts[0]) + 1)
    out = list(ts[0])
    out.insert(dim, cx.store.new(len(ts), None))
    cx.fix(out[dim], "stacked tensors")
    return out


# -- indexing --------------------------------------------------------------------

@rule("index")
def index(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Advanced indexing: indexed axes are fixed; the rest pass through."""
    t = cx.t(a["self"])
    pos = [i for i, x in enumerate(a["indices"]) if x is not None]
    for i in pos:
        cx.fix(t[i], "indexed by a tensor")
    out = cx.out_shape()
    rest = [x for i, x in enumerate(t) if i not in pos]
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    before = list(t[: pos[0]]) if adjacent else []
    mid = cx.fresh(out[len(before): len(before) + len(out) - len(rest)], "index values")
    return before + mid + (list(t[pos[-1] + 1:]) if adjacent else rest)


@rule("index_select", "gather", "take_along_dim")
def index_select(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    t = cx.t(a["self"])
    dim = _dim(a["dim"], len(t))
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


@rule("embedding")
def embedding(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Rows of the table are looked up by index: vocabulary fixed, features free."""
    w, idx = cx.t(a["weight"]), cx.t(a["indices"])
    cx.fix(w[0], "embedding lookup (vocabulary / positions)")
    return list(idx) + [w[1]]


# -- reductions ------------------------------------------------------------------

@rule("mean", "sum", "amax", "amin", "var", "std", "linalg_vector_norm", "norm", "logsumexp",
      "prod", "all", "any", "var_mean", "std_mean", "nansum", "nanmean")
def reduction(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> Any:
    """Reducing over a permuted axis is invariant; kept axes pass through."""
    t = cx.t(node.args[0])
    dims = a.get("dim")
    if dims is None:
        dims = list(range(len(t)))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {_dim(d, len(t)) for d in dims} if len(t) else set()
    keep = bool(a.get("keepdim"))
    out = [(cx.store.new(1) if keep else None) if i in dims else x for i, x in enumerate(t)]
    out = [x for x in out if x is not None]
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [list(out) for _ in val]
    return out


@rule("max", "min", "argmax", "argmin", "sort", "topk", "kthvalue", "median", "mode",
      "cumsum", "cumprod", "cummax", "cummin", "flip", "roll", "argsort", "diff")
def order_dependent(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> Any:
    """Results depend on positions along the axis: that axis is fixed."""
    t = cx.t(node.args[0])
    dim = a.get("dim", a.get("dims"))
    if isinstance(dim, (list, tuple)):
        dims = [_dim(d, len(t)) for d in dim]
    elif dim is None:
        dims = list(range(len(t)))
    else:
        dims = [_dim(dim, len(t))]
    for d in dims:
        cx.fix(t[d], f"order-dependent op {node.target}")
    val = node.meta["val"]
    vals = val if isinstance(val, (list, tuple)) else [val]
    res = []
    for v in vals:
        shape = tuple(int(s) for s in v.shape)
        if shape == tuple(cx.store.size(x) for x in t):
            res.append(list(t))
        else:
            kept = [x for i, x in enumerate(t) if i not in dims]
            if len(kept) == len(shape):
                res.append(kept)
            else:
                res.append(reshape_type(cx, kept, shape) if math.prod(shape) == math.prod(cx.store.size(x) for x in kept) else cx.fresh(shape, "order-dependent result"))
    return res if isinstance(val, (list, tuple)) else res[0]


# -- linear algebra --------------------------------------------------------------

@rule("linear")
def linear(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    x, w, b = cx.t(a["input"]), cx.t(a["weight"]), cx.t(a["bias"])
    cx.unify(x[-1], w[1])
    if b is not None:
        cx.unify(b[0], w[0])
    return list(x[:-1]) + [w[0]]


@rule("addmm")
def addmm(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    out = _matmul(cx, cx.t(a["mat1"]), cx.t(a["mat2"]))
    _broadcast_into(cx, cx.t(a["self"]), out)
    return out


@rule("mm", "bmm", "matmul")
def matmul(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    x, y = cx.t(node.args[0]), cx.t(node.args[1])
    out = _matmul(cx, x, y)
    if len(x) >= 3 and len(y) >= 3:  # batched product of activations: eager attention
        cx.store.add_role(x[-1], "qk")  # q @ k^T contracts the q/k within-head axis
        cx.store.add_role(out[-1], "vo")  # attn @ v carries v's within-head axis out
        if len(x) >= 4:
            _tag_heads(cx, x[-3])
    return out


def _tag_heads(cx: RuleContext, heads: int) -> None:
    """Name the head axis; query heads nested in kv heads (GQA) get their own role."""
    nested = cx.store.flat(heads, "prod")
    if len(nested) == 2:
        cx.store.add_role(nested[0], "heads")
        cx.store.add_role(nested[1], "q_per_kv")
    else:
        cx.store.add_role(heads, "heads")


@rule("outer", "ger")
def outer(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    return [cx.t(node.args[0])[0], cx.t(node.args[1])[0]]


@rule("baddbmm")
def baddbmm(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    out = _matmul(cx, cx.t(a["batch1"]), cx.t(a["batch2"]))
    _broadcast_into(cx, cx.t(a["self"]), out)
    return out


def _matmul(cx: RuleContext, x: TType, y: TType) -> TType:
    """Batched matrix product: batch axes broadcast, the contracted axes unify."""
    xv, yv = len(x) == 1, len(y) == 1
    x2 = [cx.store.new(1)] + list(x) if xv else list(x)
    y2 = list(y) + [cx.store.new(1)] if yv else list(y)
    cx.unify(x2[-1], y2[-2])
    bx, by = x2[:-2], y2[:-2]
    n = max(len(bx), len(by))
    bx = [None] * (n - len(bx)) + bx
    by = [None] * (n - len(by)) + by
    batch = []
    for p, q in zip(bx, by):
        sp = cx.store.size(p) if p is not None else 1
        sq = cx.store.size(q) if q is not None else 1
        if sp == sq and sp != 1:
            cx.unify(p, q)
            batch.append(p)
        elif sp >= sq:
            batch.append(p if p is not None else cx.store.new(1))
        else:
            batch.append(q)
    out = batch + [x2[-2], y2[-1]]
    if xv:
        out.pop(-2)
    if yv:
        out.pop(-1)
    return out


def _broadcast_into(cx: RuleContext, src: TType | None, dst: TType, uniform: frozenset[int] = frozenset()) -> None:
    if src is None:
        return
    off = len(dst) - len(src)
    for j, atom in enumerate(src):
        if j not in uniform and cx.store.size(atom) == cx.store.size(dst[j + off]) and cx.store.size(atom) != 1:
            cx.unify(atom, dst[j + off])


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def conv(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Channels behave like a linear layer's features; kernel and spatial axes are fixed."""
    x, w, b = cx.t(a["input"]), cx.t(a["weight"]), cx.t(a["bias"])
    groups = a.get("groups") or 1
    if a.get("transposed"):
        groups = -1
    if groups == 1:
        cx.unify(x[1], w[1])
        out_ch = w[0]
    else:
        cx.fix(x[1], "grouped or transposed convolution")
        cx.fix(w[0], "grouped or transposed convolution")
        out_ch = w[0]
    for k in w[2:]:
        cx.fix(k, "convolution kernel")
    if b is not None:
        cx.unify(b[0], w[0])
    out = cx.out_shape()
    return [x[0], out_ch] + cx.fresh(out[2:], "spatial positions")


# -- normalization -----------------------------------------------------------------

@rule("layer_norm", "rms_norm")
def layer_norm(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """Statistics over the normalized axes are invariant; weight and bias join them."""
    x = cx.t(a["input"])
    k = len(a["normalized_shape"])
    for p in ("weight", "bias"):
        w = cx.t(a.get(p))
        if w is not None:
            for xi, wi in zip(x[-k:], w):
                cx.unify(xi, wi)
    return list(x)


@rule("native_layer_norm")
def native_layer_norm(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> list[TType]:
    out = layer_norm(cx, node, a)
    k = len(a["normalized_shape"])
    stats = list(out[:-k]) + [cx.store.new(1) for _ in range(k)]
    return [out, stats, list(stats)]


# -- attention -------------------------------------------------------------------

@rule("scaled_dot_product_attention")
def sdpa(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> TType:
    """q, k, v share the head axis; q and k share the contracted axis; v's passes out.

    With ``enable_gqa`` the query heads nest inside the key/value heads.
    """
    q, k, v = cx.t(a["query"]), cx.t(a["key"]), cx.t(a["value"])
    hq, hk = q[-3], k[-3]
    cx.unify(k[-3], v[-3])
    cx.unify(k[-2], v[-2])
    cx.unify(q[-1], k[-1])
    for i in range(len(q) - 3):
        if cx.store.size(q[i]) == cx.store.size(k[i]) and cx.store.size(q[i]) != 1:
            cx.unify(q[i], k[i])
    nq, nk = cx.store.size(hq), cx.store.size(hk)
    if nq == nk:
        cx.unify(hq, hk)
    else:
        kv, per = cx.store.split(hq, "prod", [nk, nq // nk], cx.where)
        cx.unify(kv, hk)
        cx.store.add_role(per, "q_per_kv")
    cx.store.add_role(hk, "heads")
    _tag_heads(cx, hq)
    cx.store.add_role(q[-1], "qk")
    cx.store.add_role(v[-1], "vo")
    out = list(q[:-1]) + [v[-1]]
    mask = cx.t(a.get("attn_mask"))
    if mask is not None:
        scores = list(q[:-1]) + [k[-2]]
        _broadcast_into(cx, mask, scores, cx.uniform_dims(a.get("attn_mask")))
    return out


@rule("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
      "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention")
def sdpa_lowered(cx: RuleContext, node: fx.Node, a: dict[str, Any]) -> list[TType]:
    out = sdpa(cx, node, a)
    val = node.meta["val"]
    rest = [cx.fresh(tuple(int(s) for s in v.shape), "attention statistics") if hasattr(v, "shape") else None
            for v in val[1:]]
    return [out] + rest
