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
    """A call on the way from the reshape to the unbind: the segment axis is at ``pos`` in its input (-1: the
    reshape that cuts it) and at ``out`` in its output (None: it ends there, indexed by an unbind or a select)."""
    node: fx.Node
    pos: int
    out: int | None


def fused_segments_as_splits(ep) -> int:
    """``y = x.reshape(..., k, *rest)`` that cuts one axis of ``x`` into ``k`` equal segments, followed (through
    permutes, transposes, (un)squeezes, copies and reshapes that keep the segment axis whole) by ``unbind`` or
    ``select`` of the segment axis, is the split of that axis into its ``k`` segments, each reshaped alike:
    rewritten so. Fused ``q|k|v`` projections (timm's ViT, ``nn.MultiheadAttention``, Qwen-VL's and SAM's
    vision towers) then give their segments separate axes, as a split does (GPT-2's ``c_attn``): queries and
    keys get their own within-head permutation and values theirs, where before the three shared one (the
    segment factor of the reshaped axis indexed). Returns how many reshapes were rewritten."""
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


def _segment_view(node: fx.Node) -> tuple[int, int, list[_Step]] | None:
    """For a reshape that cuts an axis ``c`` of its input into ``(k, rest)`` at output dim ``p`` and whose
    every use ends in an unbind/select of that dim: ``(c, p, steps)``."""
    x = node.args[0]
    xs, ys = _shape(x), _shape(node)
    if xs is None or ys is None:
        return None
    for p, k in enumerate(ys):
        if k < 2:
            continue
        before = math.prod(ys[:p])
        for c, n in enumerate(xs):
            if node.target is aten.unflatten.int and c != node.args[1] % len(xs):
                continue
            if math.prod(xs[:c]) == before and n > k and n % k == 0:
                steps = _uses(node, p)
                if steps is not None:
                    return c, p, [_Step(node, -1, p), *steps]
    return None


def _uses(node: fx.Node, pos: int) -> list[_Step] | None:
    """The calls from ``node`` (segment axis at ``pos``) to the unbinds/selects that end every path."""
    out: list[_Step] = []
    if not node.users:
        return None
    for u in node.users:
        q = _follow(u, node, pos)
        if q is None:
            return None
        out.append(_Step(u, pos, q if q >= 0 else None))
        if q >= 0:
            rest = _uses(u, q)
            if rest is None:
                return None
            out.extend(rest)
    return out


def _follow(u: fx.Node, x: fx.Node, pos: int) -> int | None:
    """Where call ``u`` (reading ``x`` with the segment axis at ``pos``) puts that axis: its output dim, -1 where
    ``u`` indexes it (the end), None where ``u`` does anything else with it (no rewrite)."""
    if u.op != "call_function" or not u.args or u.args[0] is not x or any(a is x for a in u.args[1:]):
        return None
    xs, ys = _shape(x), _shape(u)
    r = len(xs) if xs is not None else 0
    t, a = u.target, u.args
    if t is aten.unbind.int:  # read only by picking its parts: ``q, k, v = x.unbind(0)``
        ok = all(g.op == "call_function" and g.target is operator.getitem and isinstance(g.args[1], int)
                 for g in u.users)
        return -1 if ok and _dim(a[1] if len(a) > 1 else u.kwargs.get("dim", 0), r) == pos else None
    if t is aten.select.int:
        return -1 if _dim(a[1], r) == pos and isinstance(a[2], int) else None
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


def _slice_args(step: _Step, x: fx.Node) -> tuple[Any, tuple, dict]:
    """The call ``step`` makes, for one segment (the segment axis gone): target, args, kwargs."""
    u, t, a, pos = step.node, step.node.target, step.node.args, step.pos
    if pos < 0:  # the reshape that cut the axis: its sizes without the segment count
        if t is aten.unflatten.int:
            d = a[1] % len(_shape(a[0]))
            return t, (x, d, _without(a[2], step.out - d)), {}
        return t, (x, _without(a[1], step.out)), {}
    r = len(_shape(a[0]))
    if t in _SAME_DIMS:
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


def _rewrite(graph: fx.Graph, view: fx.Node, c: int, p: int, steps: list[_Step]) -> bool:
    x = view.args[0]
    xs, k = _shape(x), _shape(view)[p]
    like = x.meta["val"]
    new_nodes: list[fx.Node] = []

    def call(target, args, kwargs, meta_from: fx.Node, val=None) -> fx.Node:
        n = graph.call_function(target, args, kwargs)
        n.meta.update({m: meta_from.meta[m] for m in _META if m in meta_from.meta})
        n.meta["val"] = val if val is not None else _fake_value(target, args, kwargs, like)
        new_nodes.append(n)
        return n

    try:
        with graph.inserting_before(view):
            split = call(aten.split.Tensor, (x, xs[c] // k, c), {}, view)
            parts = [call(operator.getitem, (split, i), {}, view, split.meta["val"][i]) for i in range(k)]
        made: dict[fx.Node, list[fx.Node]] = {x: parts}
        ends: list[tuple[fx.Node, list[fx.Node]]] = []
        for step in steps:  # in order: each step's input is made before it
            src = made[step.node.args[0]]
            if step.out is None:
                ends.append((step.node, src))
                continue
            with graph.inserting_before(step.node):
                made[step.node] = [call(*_slice_args(step, s), step.node) for s in src]
    except Exception:  # noqa: BLE001 - a form the fake values reject: leave the graph as it was
        for n in reversed(new_nodes):
            graph.erase_node(n)
        return False
    old: list[fx.Node] = [s.node for s in steps]
    for end, segs in ends:
        if end.target is aten.select.int:
            end.replace_all_uses_with(segs[end.args[2] % k])
            continue
        for g in list(end.users):  # unbind: its getitems
            old.append(g)
            g.replace_all_uses_with(segs[g.args[1]])
    for n in sorted(set(old), key=_order(graph), reverse=True):
        graph.erase_node(n)
    for n in reversed(new_nodes):  # segments nothing reads (a select of one of them)
        if not n.users:
            graph.erase_node(n)
    return True


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__
