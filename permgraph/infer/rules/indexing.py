"""Indexing by tensors: an indexed axis is fixed, unless the index values are positions along an
axis of the same kind (topk/argmax indices), which then unifies with it. Other axes pass through."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.axes import Reason
from permgraph.infer.context import Args, RuleContext, TType, norm_dim
from permgraph.infer.registry import reads_values, register

aten = torch.ops.aten


@reads_values
@register(aten.index)
def index(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Advanced indexing: indexed axes are fixed (or unified with the index values' axis); the rest pass.

    The result's index axes are the (broadcast) axes of the index tensors.
    """
    t = a.t("self")
    idxs = a["indices"]
    pos = [i for i, x in enumerate(idxs) if x is not None]
    named = [cx.index_with(idxs[i], t[i], "indexed by a tensor") for i in pos]
    out = cx.out_shape()
    rest = [x for i, x in enumerate(t) if i not in pos]
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    before = list(t[: pos[0]]) if adjacent else []
    n_mid = len(out) - len(rest)
    mid = _index_axes(cx, [idxs[i] for i in pos], out[len(before): len(before) + n_mid])
    if named == [True] and len(mid) == 1 and mid == list(cx.t(idxs[pos[0]])):
        cx.carry(idxs[pos[0]], mid[0])  # rows selected by positions along the indexed axis
    return before + mid + (list(t[pos[-1] + 1:]) if adjacent else rest)


def _index_axes(cx: RuleContext, idxs: list, shape: tuple[int, ...]) -> TType:
    """The broadcast axes of index tensors: a single full-shaped index passes its axes; else fixed."""
    tys = [cx.t(x) for x in idxs]
    if len(tys) == 1 and tys[0] is not None and [cx.store.size(x) for x in tys[0]] == list(shape):
        return list(tys[0])
    for ty in tys:
        cx.fix_all(ty, "broadcast index tensors")
    return cx.fresh(shape, "index values")


@reads_values
@register(aten.index_select)
def index_select(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """The indexed axis is fixed (or unified with the index values' axis); the result's is the index's."""
    t, idx = a.t("self"), a.t("index")
    dim = norm_dim(a["dim"], len(t))
    if cx.index_with(a["index"], t[dim], f"indexed by {node.target}") and idx:
        cx.carry(a["index"], idx[0])
    out = list(t)
    out[dim] = idx[0] if idx else cx.store.new(1)
    return out


@reads_values
@register(aten.gather, aten.take_along_dim)
def gather(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``out[..i..] = self[..index[..i..]..]`` along ``dim``: the result has the index's axes.

    Along ``dim`` the index values are positions (fixed, or unified with their axis). Along every
    other axis the index and ``self`` are read at the same position: equal sizes unify, a
    broadcast index axis takes ``self``'s, other sizes fix both.
    """
    t, idx = a.t("self"), a.t("indices" if "indices" in a else "index")
    dim = a.get("dim")
    if dim is None:  # take_along_dim without dim: flattened
        cx.fix_all(t, f"indexed by {node.target}")
        cx.fix_all(idx, f"indexed by {node.target}")
        return cx.fresh(cx.out_shape(), "index values")
    dim = norm_dim(dim, len(t))
    cx.index_with(a["indices" if "indices" in a else "index"], t[dim], f"indexed by {node.target}")
    out = cx.out_shape()
    uni = cx.uniform_dims(a.get("indices", a.get("index")))
    res = []
    for i, s in enumerate(out):
        ti, xi = t[i], idx[i]
        if i == dim:
            res.append(xi)
        elif cx.store.size(ti) == s and cx.store.size(xi) == s:
            cx.unify(ti, xi)
            res.append(ti)
        elif cx.store.size(ti) == s and (cx.store.size(xi) == 1 or i in uni):
            res.append(ti)
        else:
            cx.fix(ti, f"{node.target} takes part of the axis")
            cx.fix(xi, f"{node.target} takes part of the axis")
            res.append(cx.store.new(s, Reason(f"{node.target} takes part of the axis", cx.where)))
    return res


@reads_values
@register(aten.embedding)
def embedding(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Rows of the table are looked up by index: vocabulary fixed, features free."""
    w, idx = a.t("weight"), a.t("indices")
    cx.index_with(a["indices"], w[0], "embedding lookup (vocabulary / positions)")
    return list(idx) + [w[1]]


@register(aten.embedding_bag, aten._embedding_bag)
def embedding_bag(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Bags of table rows summed, averaged or maxed (weighted per index: Kimi-K2.5's resampled position
    table): the vocabulary is looked up (fixed), the features pass; the bags are the index rows of 2-D
    indices, else (offsets) an axis of their own, fixed; the bookkeeping results are fixed."""
    w, idx = a.t("weight"), a.t("indices")
    cx.index_with(a["indices"], w[0], "embedding lookup (vocabulary / positions)")
    weights = a.t("per_sample_weights")  # one weight per index: its axes are the indices'
    if weights is not None and len(weights) == len(idx):
        for x, y in zip(weights, idx):
            cx.unify(x, y)
    bags = idx[0] if len(idx) == 2 else cx.fresh(cx.out_shape(0)[:1], "bags of an embedding_bag (offsets)")[0]
    rest = [cx.fresh(cx.out_shape(i), "embedding_bag bookkeeping") for i in (1, 2, 3)]
    return [[bags, w[1]], *rest]


@reads_values
@register(aten.one_hot)
def one_hot(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """The class axis is the index values' axis (when they are positions along one), else fixed."""
    idx = a.t("self")
    n = cx.out_shape()[-1]
    v = cx.value_atom(a["self"])
    if v is not None and cx.store.size(v) == n:
        return list(idx) + [v]
    return list(idx) + [cx.store.new(n, Reason("one_hot classes", cx.where))]


@reads_values
@register(aten.bincount)
def bincount(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``counts[c] = #{i : self[i] = c}`` (weighted by ``weights[i]``): the class axis is the index
    values' axis when they are positions along one of the result's size (tokens per expert), else
    fixed; the counted axis is summed away (``weights`` runs along it)."""
    x, w = a.t("self"), a.t("weights")
    if w is not None:
        cx.unify(x[0], w[0])
    n = cx.out_shape()[0]
    v = cx.value_atom(a["self"])
    if v is not None and cx.store.size(v) == n:
        return [v]
    if v is not None:
        cx.fix(v, "bincount classes")
    return [cx.store.new(n, Reason("bincount classes", cx.where))]


@reads_values
@register(aten.index_put)
def index_put(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``self[indices] = values``: indexed axes as in ``index``; ``values`` broadcast into the axes
    the indexing keeps (leading adjacent indices), or everything is fixed. A boolean mask among the
    indices covers as many axes as it has dims (``x[mask] = v``: ``v``'s rows are written at the mask's
    true places in order): those axes are fixed."""
    t, v = a.t("self"), a.t("values")
    idxs = a["indices"]
    if any(_is_mask(x) for x in idxs):
        if not all(_is_mask(x) and cx.t(x) is not None for x in idxs):
            cx.fix_all(t, "index_put with mixed indices")
            cx.fix_all(v, "index_put with mixed indices")
            return list(t)
        k = sum(len(cx.t(x)) for x in idxs)
        for x in t[:k]:
            cx.fix(x, "written at the places of a boolean mask (index_put)")
        for x in idxs:
            cx.fix_all(cx.t(x), "index_put mask")
        pos = list(range(k))
        idxs = [None] * k
    else:
        pos = [i for i, x in enumerate(idxs) if x is not None]
        for i in pos:
            cx.index_with(idxs[i], t[i], "written at tensor indices (index_put)")
        for i in pos:
            cx.fix_all(cx.t(idxs[i]), "index_put indices")
    k = len(idxs)
    if pos != list(range(k)) or v is None:
        cx.fix_all(t, "index_put with non-leading indices")
        cx.fix_all(v, "index_put with non-leading indices")
        return list(t)
    rest = t[k:]
    uni = cx.uniform_dims(a["values"])
    for j, x in enumerate(v[len(v) - min(len(v), len(rest)):]):
        d = len(rest) - min(len(v), len(rest)) + j
        jj = len(v) - min(len(v), len(rest)) + j
        if jj not in uni and cx.store.size(x) == cx.store.size(rest[d]) and cx.store.size(x) != 1:
            cx.unify(x, rest[d])
    for x in v[: len(v) - len(rest)]:  # axes of values along the indexed positions: fixed
        cx.fix(x, "index_put positions")
    return list(t)


def _is_mask(x) -> bool:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8)


@register(aten.masked_scatter)
def masked_scatter(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``self`` with the places where ``mask`` is true overwritten by ``source``'s elements in order (a
    VLM's image features written into the token embeddings at the image tokens).

    Along trailing axes where the mask is constant (broadcast, or expanded from size 1), every selected
    place takes one whole trailing block of ``source``, in order: where ``source``'s trailing axes have
    the same sizes they unify with ``self``'s. The other axes say which places are written and in
    which order the rows of ``source`` are read: fixed.
    """
    t, m, src = a.t("self"), a.t("mask"), a.t("source")
    uni = cx.uniform_dims(a["mask"])
    off = len(t) - len(m)
    k = 0
    while k < min(len(t), len(src)):
        d, md = len(t) - 1 - k, len(t) - 1 - k - off
        constant = md < 0 or md in uni or cx.store.size(m[md]) == 1
        if not constant or cx.store.size(src[len(src) - 1 - k]) != cx.store.size(t[d]):
            break
        k += 1
    for x, y in zip(t[len(t) - k:], src[len(src) - k:]):
        cx.unify(x, y)
    for x in list(t[: len(t) - k]) + list(src[: len(src) - k]):
        cx.fix(x, "masked_scatter positions")
    for md, x in enumerate(m):
        if md + off < len(t) - k and md not in uni:
            cx.fix(x, "masked_scatter positions")
    return list(t)


@reads_values
@register(aten.scatter, aten.scatter_add, aten.scatter_reduce)
def scatter(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``out[..., index[..., j, ...], ...] = src[..., j, ...]`` (or a scalar) along ``dim``.

    The written axis of ``self`` is named by the index values: unified with their axis when they are
    positions along one (top-k experts), fixed otherwise. Along every other axis the op is
    elementwise: ``self``, ``index`` and ``src`` unify where their sizes agree (an index smaller than
    ``self`` touches a prefix: fixed). ``src`` runs along the index's own axis at ``dim``.
    """
    t, idx, src = a.t("self"), a.t("index"), a.t("src")
    dim = norm_dim(a["dim"], len(t))
    cx.index_with(a["index"], t[dim], f"written at tensor indices ({node.target})")
    for d in range(len(t)):
        if d != dim:
            _unify_or_fix(cx, t[d], idx[d], f"{node.target} over part of an axis")
    if src is not None:
        for d in range(len(src)):
            _unify_or_fix(cx, src[d], idx[d], f"{node.target} from part of an axis")
    return list(t)


@reads_values
@register(aten.index_add, aten.index_copy)
def index_add(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``out.index_select(dim, index) += source`` (MoE's combine of expert outputs; ``index_copy``
    writes ``= source``, a MoE's unsort of tokens sorted by expert): the written axis is
    named by the index values (unified with their axis, else fixed); ``source``'s axis there is the
    index's own axis; every other axis is elementwise."""
    t, idx, src = a.t("self"), a.t("index"), a.t("source")
    dim = norm_dim(a["dim"], len(t))
    cx.index_with(a["index"], t[dim], f"written at tensor indices ({node.target})")
    if idx:
        _unify_or_fix(cx, src[dim], idx[0], f"{node.target} from part of an axis")
    for d in range(len(t)):
        if d != dim:
            _unify_or_fix(cx, t[d], src[d], f"{node.target} over part of an axis")
    return list(t)


def _unify_or_fix(cx: RuleContext, x: int, y: int, reason: str) -> None:
    if cx.store.size(x) == cx.store.size(y):
        cx.unify(x, y)
    else:
        cx.fix(x, reason)
        cx.fix(y, reason)


@register(aten.bucketize, aten.searchsorted)
def bucketize(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Each element of ``self`` is replaced by its position in the sorted ``boundaries``
    (``searchsorted``: ``sorted_sequence``): elementwise over ``self`` (its axes pass, constant where
    it is), while the result's values depend on the order of the boundaries, whose axes are fixed;
    ``searchsorted``'s N-D sequence searches row by row, so ``self``'s leading axes are fixed too."""
    bounds = a.t("boundaries" if "boundaries" in a else "sorted_sequence")
    cx.fix_all(bounds, f"sorted boundaries ({node.target.overloadpacket.__name__})")
    cx.fix_all(a.t("sorter"), f"sorted boundaries ({node.target.overloadpacket.__name__})")
    t = a.t("self")
    if t is None:  # a Scalar overload: a 0-d result
        return []
    for x in t[: max(len(bounds or []) - 1, 0)]:
        cx.fix(x, f"rows searched in order ({node.target.overloadpacket.__name__})")
    cx.set_uniform(cx.uniform_dims(a["self"]))
    return list(t)


@register(aten.unique_consecutive, aten.unique_dim, aten._unique2)
def unique(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Distinct values (and where each element went, and how often): results of sizes known only at
    run time, every axis of ``self`` fixed (which values repeat depends on their order)."""
    why = f"unique values ({node.target.overloadpacket.__name__})"
    cx.fix_all(a.t("self"), why)
    return [cx.fresh(cx.out_shape(i), why) for i in range(len(node.meta["val"]))]


@reads_values
@register(aten.nonzero, aten.argwhere, aten.nonzero_static)
def positions_of_true(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Positions of the true entries (``nonzero``, ``where(cond)``): positions become values, so the
    condition's axes are fixed; the results' axes are fresh (a count known only at run time)."""
    why = f"positions read as values ({node.target})"
    cx.fix_all(a.t("condition" if "condition" in a else "self"), why)
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [cx.fresh(cx.out_shape(i), why) for i in range(len(val))]
    return cx.fresh(cx.out_shape(), why)

