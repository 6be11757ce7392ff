"""Same-function rewrites of an exported graph, made before inference so that the op rules type it more freely.

Each rewrite replaces calls by calls that compute the same tensors (the program still runs, and gives the
same outputs): dead code dropped, a constant index of consecutive positions read as a slice, and a fused
projection reshaped by its segment count then unbound read as a split into its segments.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["constant_ranges_as_slices", "drop_dead_code", "fused_segments_as_splits"]


def drop_dead_code(ep) -> None:
    """Remove calls whose results nothing uses (BART's ``inputs_embeds[:, :, -1]``, read only for its
    shape): they constrain nothing, and left in they would fix what they index. Calls with side
    effects (in-place writes, asserts) stay (``torch.fx.Node.is_impure``), and so does dead work that
    reads weights (a pooler whose output a task head drops): it keeps those weights moving with
    their layer instead of leaving them fixed as unused."""
    sig = ep.graph_signature
    weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    live: set = set()
    for node in reversed(ep.graph.nodes):
        if node.op in ("placeholder", "output") or any(u in live for u in node.users):
            live.add(node)
            continue
        try:
            if node.is_impure() or _functorch_level(node):
                live.add(node)
        except Exception:  # noqa: BLE001 - purity unknown: keep it
            live.add(node)
    reads_weights: set = set()
    for node in reversed(ep.graph.nodes):
        if node not in live and (any(a.name in weights for a in node.all_input_nodes if a.op == "placeholder")
                                 or any(u in reads_weights for u in node.users)):
            reads_weights.add(node)
    dead = [n for n in reversed(ep.graph.nodes) if n not in live and n not in reads_weights]
    for node in dead:
        ep.graph.erase_node(node)
    if dead:
        ep.graph_module.recompile()


def _functorch_level(node) -> bool:
    """functorch's ``_vmap_increment_nesting`` / ``_vmap_decrement_nesting`` (``torch.vmap`` inside a
    forward: transformers' mask functions): their results go unused, but the graph's batched calls need the
    levels they open, so they stay (dropped, the exported graph no longer runs)."""
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and name.endswith("_nesting") and "functorch" in str(
        getattr(node.target, "__module__", ""))


_VALUE_KEEPING = ("lift_fresh_copy", "clone", "_to_copy", "to", "alias", "detach")


def constant_ranges_as_slices(ep) -> None:
    """``x[..., [k, k+1, ...], ...]`` with a constant index of consecutive positions is the slice
    ``x[..., k:k+m, ...]`` (Falcon's multi-query ``fused_qkv[..., [-2], :]``): rewritten so that the
    slice rule keeps the other positions free instead of the index rule fixing the whole axis."""
    from torch.export.graph_signature import InputKind

    consts = {}
    names = {s.arg.name: s.target for s in ep.graph_signature.input_specs
             if s.kind == InputKind.CONSTANT_TENSOR and getattr(s.arg, "name", None)}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names and names[node.name] in ep.constants:
            consts[node] = ep.constants[names[node.name]]
        elif (node.op == "call_function" and node.args and node.args[0] in consts
              and getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in _VALUE_KEEPING):
            consts[node] = consts[node.args[0]]
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        x, idxs = node.args[0], node.args[1]
        pos = [i for i, v in enumerate(idxs) if v is not None]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if len(pos) != 1 or idxs[pos[0]] not in consts or not isinstance(val, torch.Tensor):
            continue
        dim, idx = pos[0], consts[idxs[pos[0]]]
        try:
            n = int(val.shape[dim])
        except Exception:  # noqa: BLE001 - a size known only at run time
            continue
        if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
            continue
        v = [int(i) % n for i in idx.tolist()]
        if v != list(range(v[0], v[0] + len(v))):
            continue
        with ep.graph.inserting_before(node):
            new = ep.graph.call_function(aten.slice.Tensor, (x, dim, v[0], v[0] + len(v), 1))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
        changed = True
    if changed:
        for node in reversed(consts):  # the constant's copies the index read, now unused
            if node.op == "call_function" and not node.users:
                ep.graph.erase_node(node)
        ep.graph_module.recompile()


# -- fused segments ---------------------------------------------------------------------------------------

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SAME_DIMS = (aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
              aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


@dataclass(frozen=True)
class _Step:
    """A call on the way from the reshape to the reads of the segments: the segment axis is at ``pos`` in its input
    (-1: the reshape that cuts it) and at ``out`` in its output (None: it ends there, read by an unbind, a
    select or a slice of it)."""
    node: fx.Node
    pos: int
    out: int | None
    reads: tuple[tuple[int, int, fx.Node], ...] = ()  # at an end: the ranges it picks (``_read``)


@dataclass(frozen=True)
class _Cut:
    """Axis ``c`` of the reshape's input cut at output dim ``p`` into ``(P, k, R)``: ``k`` positions, each a
    block of ``R`` elements, repeated ``P`` times (``P > 1``: the segments interleave, Bloom's
    ``(heads, 3, head_dim)``); ``segments`` the ``(start, length)`` ranges of ``[0, k)`` the reads pick."""
    c: int
    p: int
    outer: int
    inner: int
    segments: tuple[tuple[int, int], ...]


def fused_segments_as_splits(ep) -> int:
    """``y = x.reshape(..., P, k, R, ...)`` that cuts one axis of ``x`` into ``k`` positions of ``R`` elements
    (repeated ``P`` times), followed (through permutes, transposes, (un)squeezes, copies and reshapes that keep
    the position axis whole) by reads that pick ranges of it (``unbind``, ``select``, a slice of step 1), is
    the split of that axis into those segments, each reshaped alike: rewritten so (where ``P > 1``, the axis
    viewed as ``(P, k * R)`` and split along the second). Fused ``q|k|v`` projections (timm's ViT,
    ``nn.MultiheadAttention``, Qwen-VL's and SAM's vision towers, Bloom's and Persimmon's per-head
    ``(heads, 3, head_dim)``, Falcon's multi-query ``(heads + 2, head_dim)``) then give their segments separate
    axes, as a split does (GPT-2's ``c_attn``): queries and keys get their own within-head permutation and
    values theirs, where before the three shared one (the segment factor of the reshaped axis indexed).
    Returns how many reshapes were rewritten."""
    count = 0
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target not in (*_VIEWS, aten.unflatten.int) or node.graph is None:
            continue
        found = _segment_view(node)
        if found is not None and _rewrite(ep.graph, node, *found):
            count += 1
    if count:
        ep.graph.lint()
        ep.graph_module.recompile()
    return count


def _shape(node: Any) -> tuple[int, ...] | None:
    """The node's static shape (None: not a tensor, or a size known only at run time)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except Exception:  # noqa: BLE001 - symbolic size
        return None


def _segment_view(node: fx.Node) -> tuple[_Cut, list[_Step]] | None:
    """For a reshape that cuts an axis ``c`` of its input into ``(P, k, R)`` at output dim ``p`` and whose every
    use ends in reads of ranges of that dim: the cut and the steps."""
    x = node.args[0]
    xs, ys = _shape(x), _shape(node)
    if xs is None or ys is None:
        return None
    for p, k in enumerate(ys):
        if k < 2:
            continue
        for c, n in enumerate(xs):
            if node.target is aten.unflatten.int and c != node.args[1] % len(xs):
                continue
            first = next((q for q in range(p + 1) if math.prod(ys[:q]) == math.prod(xs[:c])), None)
            if first is None or n <= k or math.prod(xs[:c + 1]) % math.prod(ys[:p + 1]):
                continue
            outer = math.prod(ys[first:p])
            if n % (outer * k):
                continue
            steps = _uses(node, p)
            segments = _segments(steps, k) if steps is not None else None
            if segments is not None:
                return _Cut(c, p, outer, n // (outer * k), segments), [_Step(node, -1, p), *steps]
    return None


def _uses(node: fx.Node, pos: int) -> list[_Step] | None:
    """The calls from ``node`` (segment axis at ``pos``) to the reads that end every path."""
    out: list[_Step] = []
    if not node.users:
        return None
    for u in node.users:
        q = _follow(u, node, pos)
        if q is None:
            return None
        if q < 0:
            out.append(_Step(u, pos, None, tuple(_read(u, len(_shape(node)), _shape(node)[pos]))))
            continue
        rest = _uses(u, q)
        if rest is None:
            return None
        out += [_Step(u, pos, q), *rest]
    return out


def _follow(u: fx.Node, x: fx.Node, pos: int) -> int | None:
    """Where call ``u`` (reading ``x`` with the segment axis at ``pos``) puts that axis: its output dim, -1 where
    ``u`` reads a range of it (the end), None where ``u`` does anything else with it (no rewrite)."""
    if u.op != "call_function" or not u.args or u.args[0] is not x or any(a is x for a in u.args[1:]):
        return None
    xs, ys = _shape(x), _shape(u)
    r = len(xs) if xs is not None else 0
    t, a = u.target, u.args
    if t in (aten.unbind.int, aten.select.int, aten.slice.Tensor):
        return -1 if _read(u, r, xs[pos] if xs is not None else 0) is not None and _dim(
            a[1] if len(a) > 1 else u.kwargs.get("dim", 0), r) == pos else None
    if ys is None or xs is None:
        return None
    if t in _SAME_DIMS:
        return pos
    if t in (aten.permute.default, aten.transpose.int):
        return _perm(u, r).index(pos)
    if t is aten.unsqueeze.default:
        d = _dim(a[1], r + 1)
        return pos + (d <= pos)
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        ds = {_dim(d, r) for d in (a[1] if isinstance(a[1], (list, tuple)) else [a[1]])}
        return None if pos in ds else pos - sum(d < pos for d in ds)
    if t in _VIEWS:
        before, k = math.prod(xs[:pos]), xs[pos]
        return next((q for q in range(len(ys)) if ys[q] == k and math.prod(ys[:q]) == before), None)
    return None


def _read(u: fx.Node, rank: int, k: int) -> list[tuple[int, int, fx.Node]] | None:
    """The ranges ``(start, stop, node)`` of the segment axis (size ``k``) that read ``u`` picks: an unbind's
    getitems (its only users), a select's position, a slice of step 1; None for any other read."""
    t, a = u.target, u.args
    if not rank or not k:
        return None
    if t is aten.unbind.int:
        if not all(g.op == "call_function" and g.target is operator.getitem and isinstance(g.args[1], int)
                   for g in u.users):
            return None
        return [(g.args[1] % k, g.args[1] % k + 1, g) for g in u.users]
    if t is aten.select.int:
        return [(a[2] % k, a[2] % k + 1, u)] if isinstance(a[2], int) and -k <= a[2] < k else None
    start, stop, step = (a[i] if len(a) > i else u.kwargs.get(n, v)
                         for i, n, v in ((2, "start", None), (3, "end", None), (4, "step", 1)))
    if step != 1 or not all(v is None or isinstance(v, int) for v in (start, stop)):
        return None
    lo, hi, _ = slice(start, stop).indices(k)
    return [(lo, hi, u)] if lo < hi else None


def _segments(steps: list[_Step], k: int) -> tuple[tuple[int, int], ...] | None:
    """The ranges the reads pick, with the gaps between them (unread), as ``(start, length)`` tiling ``[0, k)``;
    None where two reads overlap without being equal, or one read takes the whole axis."""
    ranges = {(lo, hi) for step in steps for lo, hi, _ in step.reads}
    cuts = sorted({0, k} | {b for r in ranges for b in r})
    tiles = list(zip(cuts, cuts[1:]))
    if len(tiles) < 2 or not ranges <= set(tiles):
        return None
    return tuple((lo, hi - lo) for lo, hi in tiles)


def _dim(d: Any, rank: int) -> int | None:
    return d % rank if isinstance(d, int) and rank else None


def _perm(u: fx.Node, r: int) -> list[int]:
    """Input dim of each output dim of a permute or transpose."""
    if u.target is aten.permute.default:
        return [d % r for d in u.args[1]]
    i, j = u.args[1] % r, u.args[2] % r
    perm = list(range(r))
    perm[i], perm[j] = j, i
    return perm


def _without(seq: Any, i: int) -> list:
    return [s for j, s in enumerate(seq) if j != i]


def _sized(seq: Any, i: int, n: int) -> list:
    return [n if j == i else s for j, s in enumerate(seq)]


def _slice_args(step: _Step, x: fx.Node, cut: _Cut, length: int | None) -> tuple[Any, tuple, dict]:
    """The call ``step`` makes for one segment: target, args, kwargs. ``length`` None: the segment is one
    position, read by select/unbind, and its axis is dropped; else the segment axis is kept with that size."""
    u, t, a, pos = step.node, step.node.target, step.node.args, step.pos
    if pos < 0:  # the reshape that cut the axis: its sizes without the segment count, or with the segment's
        sizes = _without(_shape(u), step.out) if length is None else _sized(_shape(u), step.out, length)
        if t is aten.unflatten.int or cut.outer > 1:
            return aten.reshape.default, (x, sizes), {}
        return t, (x, _without(a[1], step.out) if length is None else _sized(a[1], step.out, length)), {}
    r = len(_shape(a[0]))
    if t in _SAME_DIMS:
        return t, (x, *a[1:]), dict(u.kwargs)
    if length is not None:
        if t in _VIEWS:
            return t, (x, _sized(a[1], step.out, length)), {}
        return t, (x, *a[1:]), dict(u.kwargs)
    if t in (aten.permute.default, aten.transpose.int):
        return aten.permute.default, (x, [d - (d > pos) for d in _perm(u, r) if d != pos]), {}
    if t is aten.unsqueeze.default:
        d = _dim(a[1], r + 1)
        return t, (x, d - (d > step.out)), {}
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        ds = [_dim(d, r) for d in (a[1] if isinstance(a[1], (list, tuple)) else [a[1]])]
        return aten.squeeze.dims, (x, [d - (d > pos) for d in ds]), {}
    return t, (x, _without(a[1], step.out)), {}  # a reshape keeping the segment axis whole


def _fake_value(target: Any, args: tuple, kwargs: dict, like: torch.Tensor) -> Any:
    mode = getattr(like, "fake_mode", None)
    vals = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
    with mode if mode is not None else contextlib.nullcontext():
        return target(*vals[0], **vals[1])


def _rewrite(graph: fx.Graph, view: fx.Node, cut: _Cut, steps: list[_Step]) -> bool:
    x = view.args[0]
    xs = _shape(x)
    like = x.meta["val"]
    new_nodes: list[fx.Node] = []
    # a segment keeps its axis (sized) where it is longer than one position or a slice reads it; one position
    # read only by select/unbind drops it
    sliced = {lo for s in steps if s.node.target is aten.slice.Tensor for lo, _, _ in s.reads}
    kept = [n if n > 1 or lo in sliced else None for lo, n in cut.segments]

    def call(target, args, kwargs, meta_from: fx.Node, val=None) -> fx.Node:
        n = graph.call_function(target, args, kwargs)
        n.meta.update({m: meta_from.meta[m] for m in _META if m in meta_from.meta})
        n.meta["val"] = val if val is not None else _fake_value(target, args, kwargs, like)
        new_nodes.append(n)
        return n

    try:
        with graph.inserting_before(view):
            src, dim = x, cut.c
            if cut.outer > 1:
                src = call(aten.reshape.default, (x, [*xs[:cut.c], cut.outer, xs[cut.c] // cut.outer,
                                                      *xs[cut.c + 1:]]), {}, view)
                dim += 1
            sizes = [n * cut.inner for _, n in cut.segments]
            if len(set(sizes)) == 1:
                split = call(aten.split.Tensor, (src, sizes[0], dim), {}, view)
            else:
                split = call(aten.split_with_sizes.default, (src, sizes, dim), {}, view)
            parts = [call(operator.getitem, (split, i), {}, view, split.meta["val"][i]) for i in range(len(sizes))]
        made: dict[fx.Node, list[fx.Node]] = {x: parts}
        ends: list[tuple[_Step, list[fx.Node]]] = []
        for step in steps:  # in order: each step's input is made before it
            src_parts = made[step.node.args[0]]
            if step.out is None:
                ends.append((step, src_parts))
                continue
            with graph.inserting_before(step.node):
                made[step.node] = [call(*_slice_args(step, s, cut, n), step.node)
                                   for s, n in zip(src_parts, kept)]
        index = {lo: i for i, (lo, _) in enumerate(cut.segments)}
        swaps: list[tuple[fx.Node, fx.Node]] = []
        for end, segs in ends:
            for lo, _, node in end.reads:
                seg = segs[index[lo]]
                if kept[index[lo]] is not None and node.target is not aten.slice.Tensor:
                    with graph.inserting_before(node):
                        seg = call(aten.squeeze.dims, (seg, [end.pos]), {}, node)
                swaps.append((node, seg))
    except Exception:  # noqa: BLE001 - a form the fake values reject: leave the graph as it was
        for n in reversed(new_nodes):
            graph.erase_node(n)
        return False
    old: list[fx.Node] = [s.node for s in steps]
    for node, seg in swaps:
        old.append(node)
        node.replace_all_uses_with(seg)
    for n in sorted(set(old), key=_order(graph), reverse=True):
        graph.erase_node(n)
    for n in reversed(new_nodes):  # segments nothing reads (a select of one of them, a gap)
        if not n.users:
            graph.erase_node(n)
    return True


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__
