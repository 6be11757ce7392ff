"""Shape ops: reshape, transpose, broadcast, split and concatenate move axis types around."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from permgraph.axes import Reason
from permgraph.infer.context import RUN_TIME, Args, RuleContext, TType, concrete, norm_dim
from permgraph.infer.registry import passes_values, reads_values, register

aten = torch.ops.aten


@passes_values
@register(aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten, aten.view_as, aten.reshape_as)
def reshape(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Merged and split axes become products of their parts."""
    return reshape_type(cx, a.t("self"), cx.out_shape())


def reshape_type(cx: RuleContext, src: TType, out: tuple[int, ...]) -> TType:
    """Match runs of input dims to runs of output dims with equal products. Sizes known only at run
    time (data-dependent: unique placeholder sizes) leave runs that never match: only the block the
    known trailing sizes share moves (``_reshape_known_tail``), everything else is fixed."""
    try:
        return _reshape_runs(cx, src, out)
    except _NoRuns:
        res = _reshape_known_tail(cx, src, out)
        if res is None:
            res = _reshape_known_head(cx, src, out)
        if res is not None:
            return res
        cx.fix_all(src, "reshape of sizes known only at run time")
        return cx.fresh(out, "reshape of sizes known only at run time")


def _reshape_known_tail(cx: RuleContext, src: TType, out: tuple[int, ...]) -> TType | None:
    """A reshape whose leading sizes are known only at run time but whose trailing sizes are known
    (merging 4 audio frames of width 64: ``(n, 64) -> (n/4, 256)``). The known tails, of sizes ``Pa``
    and ``Pb``, both end the flat index, so its last ``g = gcd(Pa, Pb)`` values are a block that the
    input's and the output's tails share: ``g`` unifies, the rest is fixed. None when there is no
    such block (no known tail on a side, or ``g`` is 1)."""
    sizes = [cx.store.size(x) for x in src]

    def tail(ss: list[int] | tuple[int, ...]) -> int | None:  # where the known tail starts
        at_run_time = [k for k, x in enumerate(ss) if x > RUN_TIME]
        return at_run_time[-1] + 1 if at_run_time else None

    ia, ib = tail(sizes), tail(out)
    if ia is None and ib is None:
        return None
    ia, ib = ia or 0, ib or 0
    pa, pb = math.prod(sizes[ia:]), math.prod(out[ib:])
    g = math.gcd(pa, pb)
    if g == 1 or not pa or not pb:  # no shared block, or an empty tensor
        return None
    why = "reshape of sizes known only at run time"
    cx.fix_all(src[:ia], why)
    res = cx.fresh(out[:ib], why) + [cx.store.new(s) for s in out[ib:]]
    a_outer, a_inner = cx.store.split(cx.store.make("prod", src[ia:]), "prod", [pa // g, g], cx.where)
    b_outer, b_inner = cx.store.split(cx.store.make("prod", res[ib:]), "prod", [pb // g, g], cx.where)
    for outer in (a_outer, b_outer):
        if cx.store.size(outer) > 1:
            cx.fix(outer, why)
    cx.unify(a_inner, b_inner)
    return res


def _reshape_known_head(cx: RuleContext, src: TType, out: tuple[int, ...]) -> TType | None:
    """A reshape whose leading sizes are known and whose trailing ones are known only at run time
    (SigLIP 2's resized position table: ``(1, 64, h, w) -> (64, h * w)``). With ``N`` elements and
    known heads of products ``Pa`` and ``Pb``, for ``g = gcd(Pa, Pb)`` the flat index divided by
    ``N / g`` is the outer ``g``-digit of both heads: that block unifies, the rest is fixed. None
    when there is no such block (no known head on a side, or ``g`` is 1)."""
    sizes = [cx.store.size(x) for x in src]

    def head(ss: list[int] | tuple[int, ...]) -> int:  # where the known head ends
        return next((k for k, x in enumerate(ss) if x > RUN_TIME), len(ss))

    ia, ib = head(sizes), head(out)
    if ia == len(sizes) or ib == len(out):  # no size known only at run time on a side: not this case
        return None
    pa, pb = math.prod(sizes[:ia]), math.prod(out[:ib])
    g = math.gcd(pa, pb)
    if g == 1 or not pa or not pb:
        return None
    why = "reshape of sizes known only at run time"
    cx.fix_all(src[ia:], why)
    res = [cx.store.new(s) for s in out[:ib]] + cx.fresh(out[ib:], why)
    a_outer, a_inner = cx.store.split(cx.store.make("prod", src[:ia]), "prod", [g, pa // g], cx.where)
    b_outer, b_inner = cx.store.split(cx.store.make("prod", res[:ib]), "prod", [g, pb // g], cx.where)
    for inner in (a_inner, b_inner):
        if cx.store.size(inner) > 1:
            cx.fix(inner, why)
    cx.unify(a_outer, b_outer)
    return res


class _NoRuns(Exception):
    pass


def _reshape_runs(cx: RuleContext, src: TType, out: tuple[int, ...]) -> TType:
    sizes = [cx.store.size(x) for x in src]
    if math.prod(sizes) != math.prod(out):
        raise _NoRuns
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
            raise _NoRuns
        i0, j0, pa, pb = i, j, sizes[i], out[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if i >= len(sizes) and pa < pb or j >= len(out) and pb < pa:
                raise _NoRuns  # zero-size runs
            if pa < pb:
                pa *= sizes[i]
                i += 1
            else:
                pb *= out[j]
                j += 1
        _reshape_run(cx, [src[k] for k in range(i0, i) if sizes[k] != 1], out, j0, j, res)
    return [r if r is not None else cx.store.new(1) for r in res]


def _reshape_run(cx: RuleContext, ins: list[int], out: tuple[int, ...], j0: int, j: int,
                 res: list[int | None]) -> None:
    """Input atoms ``ins`` (one run) become output dims ``j0:j`` of ``res``."""
    merged = cx.store.make("prod", ins)
    outs = [k for k in range(j0, j) if out[k] != 1]
    parts = cx.store.split(merged, "prod", [out[k] for k in outs], cx.where)
    for k, p in zip(outs, parts):
        res[k] = p
    for k in range(j0, j):
        if res[k] is None:
            res[k] = cx.store.new(1)


@passes_values
@register(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Two axes swap places."""
    t = list(a.t("self"))
    d0, d1 = norm_dim(a.first("dim0", "axis0"), len(t)), norm_dim(a.first("dim1", "axis1"), len(t))
    t[d0], t[d1] = t[d1], t[d0]
    swap = {d0: d1, d1: d0}
    cx.set_uniform({swap.get(d, d) for d in cx.uniform_dims(a["self"])})
    return t


@passes_values
@register(aten.t, aten.numpy_T)
def t_(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Axes in reverse order."""
    return list(reversed(a.t("self")))


@passes_values
@register(aten.permute)
def permute(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Axes reordered."""
    return _reordered(cx, a, [norm_dim(d, len(a.t("self"))) for d in a["dims"]])


def _reordered(cx: RuleContext, a: Args, dims: list[int]) -> TType:
    """``self``'s axes in the order ``dims`` (uniform ones stay uniform)."""
    uni = cx.uniform_dims(a["self"])
    cx.set_uniform({i for i, d in enumerate(dims) if d in uni})
    return [a.t("self")[d] for d in dims]


@passes_values
@register(aten.movedim)
def movedim(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Axes ``source`` moved to ``destination`` (one dim or lists), the others in order: a permute."""
    t = a.t("self")
    src, dst = a["source"], a["destination"]
    src = [norm_dim(d, len(t)) for d in (src if isinstance(src, (list, tuple)) else [src])]
    dst = [norm_dim(d, len(t)) for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
    order: list[int | None] = [None] * len(t)
    for s_, d_ in zip(src, dst):
        order[d_] = s_
    rest = iter(d for d in range(len(t)) if d not in src)
    return _reordered(cx, a, [d if d is not None else next(rest) for d in order])


@passes_values
@register(aten.unsqueeze)
def unsqueeze(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """A new unit axis."""
    t = list(a.t("self"))
    d = norm_dim(a["dim"], len(t) + 1)
    t.insert(d, cx.store.new(1))
    cx.set_uniform({u + (u >= d) for u in cx.uniform_dims(a["self"])})
    return t


@passes_values
@register(aten.squeeze)
def squeeze(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Unit axes dropped (a reshape)."""
    return reshape_type(cx, a.t("self"), cx.out_shape())


@passes_values
@register(aten.broadcast_tensors)
def broadcast_tensors(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Each result is its operand broadcast to the common shape (an ``expand`` each): an axis the
    operand has passes, a broadcast one is fresh; the results share no axes through this op."""
    res = []
    for i, x in enumerate(a["tensors"]):
        t, out = cx.t(x) or [], cx.out_shape(i)
        off = len(out) - len(t)
        res.append([t[k - off] if k >= off and cx.store.size(t[k - off]) == n else cx.store.new(n)
                    for k, n in enumerate(out)])
    return res


@register(aten.unfold)
def unfold(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Sliding windows along ``dimension`` (overlapping: the windows and the positions within them
    are fixed, and so is the axis they slide along); every other axis passes."""
    t, out = list(a.t("self")), cx.out_shape()
    why = "sliding windows (unfold)"
    d = norm_dim(a["dimension"], len(t)) if t else 0
    if t:
        cx.fix(t[d], why)
        t[d] = cx.store.new(out[d], Reason(why, cx.where))
    return t + [cx.store.new(out[-1], Reason(why, cx.where))]


@register(aten.expand, aten.expand_as, aten.broadcast_to)
def expand(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Broadcast axes (size 1 -> n) are constant along n: fresh, free atoms."""
    t = a.t("self")
    out = cx.out_shape()
    off = len(out) - len(t)
    uni = cx.uniform_dims(a["self"])
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


@passes_values
@register(aten.repeat)
def repeat(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Tiling makes an axis of identical segments."""
    return repeat_type(cx, a.t("self"), list(a["repeats"]))


@passes_values
@register(aten.tile)
def tile(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``repeat`` after left-padding ``dims`` with 1s to the input's rank."""
    t, dims = a.t("self"), list(a["dims"])
    return repeat_type(cx, t, [1] * (len(t) - len(dims)) + dims)


def repeat_type(cx: RuleContext, t: TType, reps: list) -> TType:
    """``t`` repeated ``reps[i]`` times along axis ``i`` (new leading axes where ``reps`` is longer): a
    repeated axis is ``(copies, axis)`` with a fresh atom for the copies. Any order of the copies gives the
    same tensor, so the copies may move with whatever they meet (Llama 4's ``x.repeat(E, 1)`` viewed as
    ``(experts, tokens, hidden)``: the experts' order), as ``repeat_interleave``'s do."""
    off = len(reps) - len(t)
    res = []
    for i, r in enumerate(reps):
        j = i - off
        if not isinstance(r, int):  # a count known only at run time: that axis is fixed
            why = "repeat with a count known only at run time"
            if j >= 0:
                cx.fix(t[j], why)
            res.append(cx.fresh((cx.out_shape()[i],), why)[0])
        elif j < 0:
            res.append(cx.store.new(r))
        elif r == 1:
            res.append(t[j])
        elif cx.store.size(t[j]) == 1:
            res.append(cx.store.new(r))
        else:
            res.append(cx.store.make("prod", [cx.store.new(r, copies=True), t[j]]))
    return res


@passes_values
@register(aten.repeat_interleave)
def repeat_interleave(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Each position repeated ``r`` times in place: the axis becomes ``(axis, r)``, the copies constant.

    Repeats given as a tensor (different counts per position) fix the axis.
    """
    t = a.t("self")
    out = cx.out_shape()
    reps = a.get("repeats")
    if t is None or not isinstance(reps, int):
        for x in (a.get("self"), reps):
            cx.fix_all(cx.t(x), "repeat_interleave with per-position counts")
        return cx.fresh(out, "repeat_interleave with per-position counts")
    dim = a.get("dim")
    if dim is None:  # flattened first
        flat = reshape_type(cx, t, (max(1, int(torch.tensor([cx.store.size(x) for x in t]).prod())),))
        t, dim = flat, 0
    dim = norm_dim(dim, len(t))
    res = list(t)
    copies = cx.store.new(reps)
    res[dim] = cx.store.make("prod", [t[dim], copies]) if cx.store.size(t[dim]) > 1 else copies
    cx.set_uniform({i for i, x in enumerate(res) if i in cx.uniform_dims(a["self"]) and i != dim})
    return res


def _segments(cx: RuleContext, atom: int, sizes: list[int]) -> list[int]:
    return cx.store.split(atom, "cat", sizes, cx.where)


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unsafe_split)
def split(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """The split axis becomes a concatenation of the pieces' axes."""
    t = a.t("self")
    dim = norm_dim(a.get("dim", 0) or 0, len(t))
    sizes = [concrete(o.shape[dim]) for o in node.meta["val"]]
    if sum(sizes) != cx.store.size(t[dim]) or max(sizes, default=0) > RUN_TIME:  # sizes known at run time
        cx.fix(t[dim], "split into sizes known only at run time")
        return [t[:dim] + cx.fresh((n,), "split into sizes known only at run time") + t[dim + 1:] for n in sizes]
    parts = _segments(cx, t[dim], sizes)
    return [t[:dim] + [p] + t[dim + 1:] for p in parts]


@register(aten.unbind)
def unbind(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """The unbound axis is indexed: fixed."""
    t = a.t("self")
    dim = norm_dim(a["dim"], len(t))
    cx.fix(t[dim], "indexed by unbind")
    return [t[:dim] + t[dim + 1:] for _ in range(cx.store.size(t[dim]))]


@passes_values
@register(aten.select)
def select(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """The selected axis is indexed: fixed."""
    t = a.t("self")
    dim = norm_dim(a["dim"], len(t))
    if cx.store.size(t[dim]) > 1:
        cx.fix(t[dim], "indexed by select")
    return t[:dim] + t[dim + 1:]


@passes_values
@register(aten.slice, aten.narrow)
def slice_(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """A contiguous slice is a segment of the axis; a strided one fixes it."""
    t = a.t("self")
    dim = norm_dim(a.get("dim", 0) or 0, len(t))
    n = cx.store.size(t[dim])
    if "length" in a:  # narrow
        start, step, length = a["start"], 1, a["length"]
        end = start + length if isinstance(start, int) and isinstance(length, int) else length
    else:
        start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
    if not all(x is None or isinstance(x, int) for x in (start, end, step)):  # bounds known only at run time
        cx.fix(t[dim], "slice with bounds known only at run time")
        out = list(t)
        out[dim] = cx.fresh((cx.out_shape()[dim],), "slice with bounds known only at run time")[0]
        return out
    start, end, _ = slice(start, end, step).indices(n)
    if start == 0 and end >= n and step == 1:
        return list(t)
    out = list(t)
    if step != 1:
        m = cx.out_shape()[dim]
        if n % step == 0 and start < step and m == n // step:  # one of every `step`: (n/step, step)[:, start]
            outer, inner = cx.store.split(t[dim], "prod", [n // step, step], cx.where)
            cx.fix(inner, f"strided slice (step {step}) picks one of every {step}")
            out[dim] = outer
        else:
            cx.fix(t[dim], f"strided slice (step {step})")
            out[dim] = cx.store.new(m, Reason(f"strided slice (step {step})", cx.where))
        return out
    parts = _segments(cx, t[dim], [start, max(end - start, 0), n - max(end, start)])
    out[dim] = parts[1]
    return out


@reads_values
@register(aten.cat, aten.concat, aten.concatenate)
def cat(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Other axes unify; the joined axis is a concatenation of segments. Index values along one
    axis in every part (PhiMoE's top-1 and top-2 experts) stay index values along it; other index
    values fix the axis they index."""
    ts = [cx.t(x) for x in a["tensors"]]
    ts = [t for t in ts if t is not None and not (len(t) == 1 and cx.store.size(t[0]) == 0)]
    dim = norm_dim(a.get("dim", 0) or 0, len(ts[0]))
    for t in ts[1:]:
        for i in range(len(t)):
            if i != dim:
                cx.unify(ts[0][i], t[i])
    out = list(ts[0])
    out[dim] = cx.store.make("cat", [t[dim] for t in ts])
    vals = [cx.value_atom(x) for x in a["tensors"] if cx.t(x) is not None]
    if vals and all(v is not None for v in vals) and len({cx.store.find(v) for v in vals}) == 1:
        cx.set_values(vals[0])
    else:
        for v in vals:
            if v is not None:
                cx.fix(v, f"index values used by {node.target}")
    return out


@register(aten.meshgrid)
def meshgrid(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """Result ``k`` holds input ``k``'s values along its own axis (constant along the others): every
    result has one axis per input, input ``i``'s axis at ``i`` (``indexing="xy"``: the first two
    swapped). Permuting the inputs permutes every result alike."""
    axes = []
    for x in a["tensors"]:
        t = cx.t(x)
        axes.append(t[0] if t else cx.store.new(1))  # a 0-d input counts as one element
    if a.get("indexing") == "xy" and len(axes) > 1:
        axes[0], axes[1] = axes[1], axes[0]
    shapes = [tuple(concrete(s) for s in v.shape) for v in node.meta["val"]]
    if any(s != tuple(cx.store.size(x) for x in axes) for s in shapes):  # not the layout above
        for x in a["tensors"]:
            cx.fix_all(cx.t(x), "meshgrid with an unexpected result shape")
        return [cx.fresh(s, "meshgrid with an unexpected result shape") for s in shapes]
    return [list(axes) for _ in shapes]


@register(aten.stack)
def stack(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Stacked tensors unify; the new axis indexes them: fixed."""
    ts = [cx.t(x) for x in a["tensors"]]
    for t in ts[1:]:
        for x, y in zip(ts[0], t):
            cx.unify(x, y)
    dim = norm_dim(a.get("dim", 0) or 0, len(ts[0]) + 1)
    out = list(ts[0])
    out.insert(dim, cx.store.new(len(ts), None))
    cx.fix(out[dim], "stacked tensors")
    return out


@register(aten.pad, aten.constant_pad_nd)
def pad(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Constant padding makes an axis ``cat(pad, axis, pad)`` (a constant segment permutes freely);
    cropping (negative pads), reflect/replicate/circular padding and pads known only at run time (a
    causal convolution's, from the input's length) fix the padded axes."""
    t = list(a.t("self"))
    pads = list(a["pad"])
    mode = a.get("mode") or "constant"
    for k in range(len(pads) // 2):
        d = len(t) - 1 - k
        lo, hi = pads[2 * k], pads[2 * k + 1]
        known = isinstance(lo, int) and isinstance(hi, int)
        if known and lo == hi == 0:
            continue
        if mode != "constant" or not known or lo < 0 or hi < 0:
            cx.fix(t[d], f"{mode} padding" if mode != "constant" else
                   "padded by an amount known at run time" if not known else "cropped by a negative pad")
            t[d] = cx.store.new(cx.out_shape()[d], Reason("padded axis", cx.where))
            continue
        t[d] = cx.store.make("cat", [x for x in (cx.store.new(lo), t[d], cx.store.new(hi)) if cx.store.size(x)])
    return t


@register(aten.view_as_complex)
def view_as_complex(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """(..., 2) real -> (...) complex: the trailing (real, imaginary) pair is fixed, the other axes pass."""
    t = list(a.t("self"))
    cx.fix(t[-1], "real and imaginary parts (view_as_complex)")
    cx.set_uniform({u for u in cx.uniform_dims(a["self"]) if u < len(t) - 1})
    return t[:-1]


@register(aten.view_as_real)
def view_as_real(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """(...) complex -> (..., 2) real: the axes pass, a new fixed trailing (real, imaginary) axis."""
    t = list(a.t("self"))
    cx.set_uniform(set(cx.uniform_dims(a["self"])))
    return t + cx.fresh((2,), "real and imaginary parts (view_as_real)")


@register(aten.as_strided)
def as_strided(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """A strided view of the input's memory (Longformer's overlapping chunks). An output dim keeps an
    input dim's atom when it walks that dim alone: same size and stride, and every other output dim
    (and the offset) only moves whole blocks of it or stays below one step of it, so the input index
    along that dim is the output index. Every other input and output axis is fixed; an input that is
    not dense in its memory, or a view that reads outside it, fixes every axis."""
    t = a.t("self")
    why = "as_strided view that overlaps or reorders positions"
    carried = _strided_carry(a["self"].meta.get("val"), a["size"], a["stride"], a.get("storage_offset"))
    if t is None or carried is None:
        cx.fix_all(t, why)
        return cx.fresh(cx.out_shape(), why)
    out = []
    for dim, n in enumerate(cx.out_shape()):
        k = carried.get(dim)
        out.append(t[k] if k is not None else cx.store.new(n, Reason(why, cx.where) if n > 1 else None))
    kept = set(carried.values())
    for k, x in enumerate(t):
        if k not in kept and cx.store.size(x) > 1:
            cx.fix(x, why)
    return out


def _strided_carry(val: object, size: list, stride: list, offset: object) -> dict[int, int] | None:
    """Output dim -> the input dim whose index it is, for ``as_strided(val, size, stride, offset)``.

    The input's dims (size > 1), ordered by stride, must tile its memory exactly (strides 1, n1,
    n1 * n2, ...): a memory position is then a mixed-radix number whose digit ``k`` is the index
    along input dim ``k``. The output reads position ``off + sum_l j_l * t_l``. Output dim ``l``
    carries input dim ``k`` when ``t_l = s_k``, ``n_l = n_k``, and the rest of the sum is a multiple
    of ``s_k * n_k`` plus less than ``s_k`` for every value of the other indices: then digit ``k`` is
    ``j_l`` and no other digit depends on ``j_l``. None when the layout is not such (fix everything).
    """
    if not isinstance(val, torch.Tensor):
        return None
    try:
        in_size = [int(s) for s in val.shape]
        in_stride = [int(s) for s in val.stride()]
        base = int(val.storage_offset())
        size = [int(s) for s in size]
        stride = [int(s) for s in stride]
        off = base if offset is None else int(offset)
    except Exception:  # noqa: BLE001 - sizes or strides known only at run time
        return None
    if len(size) != len(stride) or min(in_size + size, default=1) < 1 or min(stride, default=0) < 0:
        return None
    dims = sorted((k for k in range(len(in_size)) if in_size[k] > 1), key=lambda k: in_stride[k])
    numel = 1
    for k in dims:  # dense: each stride is the product of the sizes below it
        if in_stride[k] != numel:
            return None
        numel *= in_size[k]
    rel = off - base
    if rel < 0 or rel + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        return None  # reads memory outside the input
    carried: dict[int, int] = {}
    for dim, (n, s) in enumerate(zip(size, stride)):
        k = next((k for k in dims if in_stride[k] == s and in_size[k] == n), None)
        if n == 1 or k is None:
            continue
        block = s * n
        low = rel % block + sum((m - 1) * u for d, (m, u) in enumerate(zip(size, stride))
                                if d != dim and m > 1 and u % block)
        if low < s:
            carried[dim] = k
    return carried


# ``torch.vmap`` inside a forward (transformers' mask functions), as pre-dispatch export records it:
# ``_add_batch_dim(x, dim, level)`` ... per-sample ops ... ``_remove_batch_dim(y, level, n, out_dim)``
_VMAP = torch._functorch.predispatch


@passes_values
@register(_VMAP._add_batch_dim)
def vmap_in(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Inside ``vmap``, ``x`` without its mapped axis ``dim``. ``vmap(f)(x, y)[i] = f(x[i], y[i])``
    commutes with one permutation of ``i``: the mapped axes of one level are zipped, so unified."""
    t, level = list(a.t("arg0")), a["arg2"]
    mapped = t.pop(norm_dim(a["arg1"], len(t)))
    if level in cx.vmapped:
        cx.unify(cx.vmapped[level], mapped)
    else:
        cx.vmapped[level] = mapped
    return t


@passes_values
@register(_VMAP._remove_batch_dim)
def vmap_out(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """The level's mapped axis comes back at ``out_dim`` of the per-sample result."""
    t, level = list(a.t("arg0")), a["arg1"]
    out = cx.out_shape()
    dim = norm_dim(a["arg3"], len(out))
    mapped = cx.vmapped.get(level)
    if mapped is None or cx.store.size(mapped) != out[dim]:
        mapped = cx.store.new(out[dim], Reason("vmap level without a mapped input", cx.where))
    t.insert(dim, mapped)
    return t


@register(_VMAP._vmap_decrement_nesting)
def vmap_close(cx: RuleContext, node: fx.Node, a: Args) -> None:
    """The innermost open level closes (a later ``vmap`` may reuse its number for other axes)."""
    if cx.vmapped:
        del cx.vmapped[max(cx.vmapped)]
