"""Building a PermSpec from an inference result: atoms become groups with contexts and names.

Every free leaf atom that moves a parameter is a group. A group's context (the outer
groups it is indexed by) must precede it in the product structure of every parameter
axis containing it and co-occur with it in every tensor of the graph; otherwise the
group is shared across the candidate. A within-head group whose heads are fixed but keep their
identity (ALiBi) becomes one group per head (``_contexts``). Names come from module paths
plus a role.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Iterator, Mapping

from permgraph.ir import AxisTree, Cat, Fixed, G, Prod
from permgraph.spec import FixedAxis, Group, PermSpec


def build_spec(result, param_shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str],
               info: Mapping[str, Any], with_nodes: bool = False, outputs: Mapping[str, str] | None = None):
    """Turn atoms into groups: every free leaf that moves a parameter is a group.

    With ``with_nodes``, also return the axis trees of every single-tensor graph
    node (``node name -> one tree per dim``), for data-based solvers. ``outputs``: output name ->
    its node, for the outputs left free; their trees go to ``spec.outputs`` (a free leaf that moves
    no parameter is not permuted: ``Fixed`` there).
    """
    store = result.store
    _propagate_fixed(store)

    def is_free(leaf: int) -> bool:
        return not store.reasons(leaf) and store.size(leaf) > 1

    atoms = {r for ty in result.param_axes.values() for a in ty for r in store.leaves(a)}
    carried = _carried(store, result.carriers, is_free)
    atom_ctx, per_head = _contexts(store, *_placement(store, result.param_axes, result.tensor_types, atoms, carried),
                                   is_free)
    split_at: dict[int, set[int]] = {}
    for x, f in per_head.items():
        split_at.setdefault(f, set()).add(x)

    def tree(atom: int, head: Mapping[int, int] = {}) -> AxisTree:  # noqa: B006 - read only
        r = store.find(atom)
        k = store.kind(r)
        if k is None:
            return (G((r, head[r]) if r in head else r) if is_free(r) else Fixed(store.size(r)))
        kids = store.flat(r, k)
        subs = None
        if k == "prod":
            for i, c in enumerate(kids):
                xs = split_at.get(c, set()) & {x for d in kids[i + 1:] for x in store.leaves(d)}
                if xs:  # heads fixed but distinct: one within-head group per head (split id (x, h))
                    segs = tuple(_prod([tree(d, {**head, **{x: h for x in xs}}) for d in kids[i + 1:]])
                                 for h in range(store.size(c)))
                    subs = tuple(tree(d, head) for d in kids[:i]) + (Cat(segs),)
                    break
        subs = subs if subs is not None else tuple(tree(c, head) for c in kids)
        if all(isinstance(s, Fixed) for s in subs):
            return Fixed(store.size(r))
        return _prod(list(subs)) if k == "prod" else Cat(subs)

    raw_axes = {p: [tree(a) for a in ty] for p, ty in result.param_axes.items()}
    leaves = list(dict.fromkeys(g for trees in raw_axes.values() for t in trees for g in t.groups()))
    groups = set(leaves)  # a head's copy (x, h) of a split group has no context (its heads are fixed)
    ctx = {x: [c for c in atom_ctx.get(x, []) if c in groups] if isinstance(x, int) else [] for x in leaves}
    banks = _banks(store, raw_axes, ctx)
    names = _name_groups(store, leaves, raw_axes, ctx, banks)
    order = _outer_first(leaves, ctx)
    groups = {names[x]: Group(names[x], store.size(_atom(x)), tuple(names[c] for c in ctx[x]),
                              _role(store, x, ctx, banks)) for x in order}
    axes = {p: [t.rename(lambda x: G(names[x])) for t in trees] for p, trees in raw_axes.items()}
    layouts = {}
    for p, trees in list(axes.items()):
        layout = _layout(trees, groups)
        if layout is not None:
            layouts[p] = layout
            axes[p] = [_prod([trees[d] for d in part]) for part in layout]
    fixed = _fixed_axes(store, result.param_axes, axes, layouts, is_free)
    unknown = {k: len(v) for k, v in result.unknown_ops.items()}
    spec = PermSpec(groups, axes, dict(param_shapes), fixed, dict(aliases), unknown, dict(info), layouts=layouts)

    def named(t: AxisTree) -> AxisTree:
        match t:
            case G(x):
                return G(names[x]) if x in names else Fixed(store.size(x))
            case Prod(parts) | Cat(parts):
                subs = tuple(named(s) for s in parts)
                if all(isinstance(s, Fixed) for s in subs):
                    return Fixed(math.prod(s.n for s in subs) if isinstance(t, Prod) else sum(s.n for s in subs))
                return type(t)(subs)
        return t

    def trees_of(node: str) -> list[AxisTree] | None:
        ty = result.node_types.get(node)
        return [named(tree(a)) for a in ty] if isinstance(ty, list) and all(isinstance(a, int) for a in ty) else None

    spec.outputs = {o: trees for o, node in (outputs or {}).items() if (trees := trees_of(node)) is not None}
    if not with_nodes:
        return spec
    node_trees = {n: trees for n in result.node_types if (trees := trees_of(n)) is not None}
    return spec, node_trees


_SINGLE_POSITIONS = ("cut into single positions (read or built one position at a time: size-1 slices, selects or "
                     "pieces of a cat; a Python loop over a ModuleList of experts reads its router's outputs so)")


def _fixed_axes(store, param_axes, axes, layouts, is_free) -> list[FixedAxis]:
    """The (view) axes that are fixed in whole or part, with the reasons of their fixed atoms."""
    fixed = []
    for p, ty in param_axes.items():
        for d, part in enumerate(layouts.get(p, [(i,) for i in range(len(ty))])):
            parts = _fixed_parts(axes[p][d])
            if parts:
                fl = [x for i in part for x in store.leaves(ty[i]) if not is_free(x) and store.size(x) > 1]
                reasons = tuple(dict.fromkeys(str(r) for x in fl for r in store.reasons(x)))
                if not fl:  # every leaf has size 1: nothing is left to move
                    reasons = (_SINGLE_POSITIONS,)
                fixed.append(FixedAxis(p, d, parts, reasons))
    return fixed


def _prod(parts: list[AxisTree]) -> AxisTree:
    """The mixed radix of ``parts`` (nested products flattened, outer first)."""
    flat = tuple(q for t in parts for q in (t.parts if isinstance(t, Prod) else (t,)))
    return flat[0] if len(flat) == 1 else Prod(flat)


def _layout(trees: list[AxisTree], groups: Mapping[str, Group]) -> tuple[tuple[int, ...], ...] | None:
    """How a parameter is viewed so that every group's contexts are outer factors on its axis: a
    dim holding a group whose context is on another dim made of groups (``G(c)``, or a product of
    them: an expert's hidden units, indexed by the expert dim) is merged after that dim. None when
    no dim needs it."""
    whole = {g: d for d, t in enumerate(trees)
             if isinstance(t, G) or (isinstance(t, Prod) and all(isinstance(q, (G, Fixed)) for q in t.parts))
             for g in t.groups()}
    after: dict[int, set[int]] = {d: set() for d in range(len(trees))}
    for d, t in enumerate(trees):
        for g in dict.fromkeys(t.groups()):
            for c in groups[g].ctx:
                if c not in _outer(t, g) and whole.get(c, d) != d:
                    after[d].add(whole[c])
    if not any(after.values()):
        return None
    part_of = list(range(len(trees)))

    def find(d: int) -> int:
        while part_of[d] != d:
            d = part_of[d]
        return d

    for d, cs in after.items():
        for c in cs:
            part_of[find(d)] = find(c)
    parts: dict[int, list[int]] = {}
    for d in range(len(trees)):
        parts.setdefault(find(d), []).append(d)
    out = []
    for dims in sorted(parts.values()):
        order: list[int] = []
        while len(order) < len(dims):  # contexts first (a cycle of dims, never seen, is left to check_spec)
            order.append(next((d for d in dims if d not in order and after[d] <= set(order)),
                              next(d for d in dims if d not in order)))
        out.append(tuple(order))
    return tuple(out)


def _outer(t: AxisTree, g: str) -> set[str]:
    """The groups that are outer factors of ``g`` in tree ``t`` (its contexts on this axis)."""
    match t:
        case Prod(parts):
            seen: set[str] = set()
            for s in parts:
                if g in s.groups():
                    return seen | _outer(s, g)
                seen |= set(s.groups())
        case Cat(parts):
            return next((_outer(s, g) for s in parts if g in s.groups()), set())
    return set()


def _atom(x) -> int:
    """The atom of a group id: an atom, or ``(atom, head)`` for one head's copy of a within-head group."""
    return x[0] if isinstance(x, tuple) else x


# fixed for these reasons, an axis keeps each position's identity through the graph: per-position
# constants (ALiBi's slopes), positions read one at a time, the model's outputs. An op that mixes or
# reorders positions (cumsum, flip, a mask, a reshape that conflicts) fixes with another reason.
_POSITIONAL = ("values vary along the axis", "indexed by select", "indexed by unbind", "model output",
               "model input", "constant buffer", "embedding lookup")


def _placement(store, param_axes, tensor_types, atoms: set[int], carried: Mapping[int, int]
               ) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[int, set[int]]]:
    """Where each leaf atom of ``atoms`` lies: ``before[x]``, the leaf atoms preceding it in the
    product structure of *every* parameter axis containing it; ``near[x]``, those that in every
    parameter containing it precede it on its axis or are another whole dim (an expert's hidden
    units beside the expert dim); and ``along[x]``, the atoms of ``atoms`` co-occurring with it in
    *every* tensor and parameter of the graph, where an axis whose rows were selected by positions
    along an atom (``carried``) stands for that atom."""
    before: dict[int, list[int]] = {}
    near: dict[int, list[int]] = {}

    def walk(atom: int, pre: list[int], beside: list[int]) -> None:
        r = store.find(atom)
        k = store.kind(r)
        if k is None:
            if r in atoms:
                before[r] = [c for c in before[r] if c in pre] if r in before else list(pre)
                here = beside + [c for c in pre if c not in beside]
                near[r] = [c for c in near[r] if c in here] if r in near else here
            return
        acc = list(pre)
        for c in store.flat(r, k):
            walk(c, acc if k == "prod" else pre, beside)
            if k == "prod" and store.kind(c) is None:
                acc = acc + [c]

    for ty in param_axes.values():
        dims = [_prod_leaves(store, a) for a in ty]
        for d, a in enumerate(ty):
            walk(a, [], [x for i, xs in enumerate(dims) if i != d for x in xs or ()])
    along: dict[int, set[int]] = {}
    for ty in list(tensor_types) + list(param_axes.values()):
        present = {x for a in ty if isinstance(a, int) for x in store.leaves(a)} & atoms
        present |= {x for a in ty if isinstance(a, int) for r in _nodes(store, a) for x in carried.get(r, ())}
        for x in present:
            along[x] = along[x] & present if x in along else set(present)
    return before, near, along


def _nodes(store, a: int) -> Iterator[int]:
    """The roots of ``a``'s structure: itself and every part, at every depth."""
    r = store.find(a)
    yield r
    if store.kind(r) is not None:
        for c in store.children(r):
            yield from _nodes(store, c)


def _prod_leaves(store, a: int) -> tuple[int, ...] | None:
    """The leaves of an axis that is a leaf or a product of leaves (experts refined as groups x
    experts per group by grouped routing); None for any other structure."""
    r = store.find(a)
    parts = store.flat(r, "prod") if store.kind(r) == "prod" else [r]
    return tuple(parts) if all(store.kind(x) is None for x in parts) else None


def _carried(store, carriers, is_free) -> dict[int, tuple[int, ...]]:
    """Axis root -> the leaves of the axis whose positions named its rows, where that is
    unambiguous: every record for the axis names the same atom through the same index tensor, that
    atom is a leaf or a product of leaves apart from the axis, and the axis is free or fixed only
    for reasons that keep each position's identity (a fixed axis that an op reordered, a flip say,
    keeps its atom, and its rows then belong to other positions)."""
    seen: dict[int, set[tuple[int, Any]]] = {}
    for axis, v, node in carriers:
        seen.setdefault(store.find(axis), set()).add((store.find(v), node))
    out = {}
    for r, srcs in seen.items():
        (v, _), *more = srcs
        leaves = _prod_leaves(store, v)
        if (not more and leaves and not set(leaves) & set(store.leaves(r))
                and (is_free(r) or _keeps_positions(store, r))):
            out[r] = leaves
    return out


def _contexts(store, before, near, along, is_free) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Contexts of the groups: ``x -> [c, ...]``, the free groups that precede ``x`` in every
    parameter axis containing it, or are another whole dim of those parameters (so the index map
    is per axis, or per view of a parameter: ``permgraph.ir`` layouts), and co-occur with it in
    every tensor (so every op treats ``x``'s axis batch-wise along ``c``'s); otherwise ``x`` is
    shared across ``c``. Contexts never form a cycle (a pair of dims that index each other is
    shared both ways). And the within-head groups (roles qk, vo) whose nearest such candidate in
    the axis is a *fixed* head atom that keeps each head's identity (ALiBi: each head has its own
    slope): ``x -> f``; each head may then permute its units on its own, ``Prod(f, x)`` becoming
    ``Cat(x_0, ..., x_{H-1})``. Atoms with eight or more reasons (the store keeps eight) never qualify."""
    ctx: dict[int, list[int]] = {}
    per_head: dict[int, int] = {}
    for x, cs in near.items():
        if not is_free(x):
            continue
        ctx[x] = [c for c in cs if c in along.get(x, set()) and c != x and is_free(c)]
        ok = [c for c in before.get(x, []) if c in along.get(x, set()) and c != x]
        if ok and not [c for c in ok if is_free(c)] and {"qk", "vo"} & set(store.roles(x)) \
                and _keeps_positions(store, ok[0]):
            per_head[x] = ok[0]
    _acyclic(ctx)
    return ctx, per_head


def _acyclic(ctx: dict[int, list[int]]) -> None:
    """Drop the context edges that close a cycle (in a stable order)."""
    kept: dict[int, list[int]] = {}

    def reaches(a: int, b: int) -> bool:
        todo, seen = [a], set()
        while todo:
            y = todo.pop()
            if y == b:
                return True
            if y not in seen:
                seen.add(y)
                todo.extend(kept.get(y, []))
        return False

    for x in ctx:
        kept[x] = []
        for c in ctx[x]:
            if not reaches(c, x):
                kept[x].append(c)
    ctx.update(kept)


def _keeps_positions(store, c: int) -> bool:
    why = store.reasons(c)
    return store.size(c) > 1 and 0 < len(why) < 8 and all(w.message.startswith(_POSITIONAL) for w in why)


def _fixed_parts(t: AxisTree, where: str = "whole axis") -> str:
    """Which parts of an axis are fixed: 'whole axis', 'segment of 16', 'factor of 3', ..."""
    match t:
        case Fixed(n):
            return where if n > 1 else ""
        case Prod(parts) | Cat(parts):
            label = "segment" if isinstance(t, Cat) else "factor"
            subs = [_fixed_parts(s, f"{label} of {s.n if isinstance(s, Fixed) else '?'}") for s in parts]
            return ", ".join(dict.fromkeys(p for p in subs if p))
    return ""


def _propagate_fixed(store) -> None:
    """A fixed axis fixes every part of it, also where the fixed atom is no tensor's axis (a
    reshape's merged run whose split conflicts: its input parts are fixed through it). Parents
    are made after their parts, so newest first reaches most parts in one pass; repeat until stable."""
    roots = sorted({store.find(a) for a in range(len(store))}, reverse=True)
    changed = True
    while changed:
        changed = False
        for r in roots:
            if store.reasons(r) and store.kind(r):
                for c in store.children(r):
                    if not store.reasons(c):
                        for why in store.reasons(r):
                            store.fix(c, why)
                        changed = True


def _outer_first(leaves: list[int], ctx: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    done: set[int] = set()

    def visit(x: int) -> None:
        if x in done:
            return
        done.add(x)
        for c in ctx[x]:
            visit(c)
        out.append(x)

    for x in leaves:
        visit(x)
    return out


def _banks(store, raw_axes, ctx: dict[int, list[int]]) -> set[int]:
    """Context groups that are the whole leading dim of a parameter and index a group without an attention role
    on a later dim: the experts of banks ``(E, I, H)``, whatever routes them (a top-k names them too; PhiMoE's
    sparse mixer does not). A grouped convolution's groups are a factor of its leading dim, not experts."""
    out: set[int] = set()
    for trees in raw_axes.values():
        lead = trees[0].groups() if trees and isinstance(trees[0], G) else []
        out.update(c for t in trees[1:] for g in t.groups() if not store.roles(_atom(g))
                   for c in ctx.get(g, []) if c in lead)
    return out


def _role(store, x: int, ctx: dict[int, list[int]], banks: set[int]) -> str:
    roles = store.roles(_atom(x))
    if "qk" in roles and "vo" in roles:
        return "qkvo"
    if roles:
        return roles[0]
    expert_ctx = [cs for cs in ctx.values() if any("experts" in store.roles(_atom(c)) or c in banks for c in cs)]
    if x in banks or any(x in cs for cs in expert_ctx):
        return "experts"  # a bank's experts; experts per group of experts (grouped routing)
    if any(x in cs for cs in ctx.values()):
        return "heads"
    if ctx[x] in expert_ctx:
        return "units"  # each expert's hidden units
    return "within" if ctx[x] else ""


_LAYER = re.compile(r"\.\d+(?=\.|$)")


def _name_groups(store, leaves: list[int], raw_axes, ctx, banks: set[int]) -> dict[int, str]:
    """Names from module paths: the members' common module prefix plus a role."""
    members: dict[int, list[str]] = {x: [] for x in leaves}
    for p, trees in raw_axes.items():
        for t in trees:
            for g in dict.fromkeys(t.groups()):
                members[g].append(p)
    names: dict[int, str] = {}
    bases: dict[int, tuple[str, str]] = {}
    used: Counter = Counter()
    for x in leaves:
        mods = [m.rsplit(".", 1)[0] if "." in m else "" for m in members[x]]
        prefix = _common_prefix(mods)
        role = _role(store, x, ctx, banks)
        layers = {tuple(_LAYER.findall(m)) for m in members[x]}
        if not role and len(layers) > 1 and not ctx[x] and not _LAYER.search(prefix):
            prefix = "residual"  # a flat group spanning several layers (not inside one): the residual stream
        elif not prefix:
            prefix = "+".join(sorted({m.split(".")[0] for m in members[x]})) or "root"
        base = f"{prefix}.{role}" if role else prefix
        bases[x] = (base, Counter(m.split(".")[0] for m in members[x]).most_common(1)[0][0])
    counts = Counter(b for x, (b, _) in bases.items() if not isinstance(x, tuple) or x[1] == 0)
    for x in leaves:
        base, top = bases[x]
        if isinstance(x, tuple):  # one head's copy of a within-head group: numbered like its twins
            if x[1] == 0:
                used[base] += 1
            n = used[base]
            names[x] = f"{base if n == 1 else f'{base}#{n}'}.head{x[1]}"
            continue
        if counts[base] > 1 and base == "residual":
            base = f"residual[{top}]"
        used[base] += 1
        names[x] = base if used[base] == 1 else f"{base}#{used[base]}"
    return names


def _common_prefix(mods: list[str]) -> str:
    parts = [m.split(".") if m else [] for m in mods]
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return ".".join(out)
