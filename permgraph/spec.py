"""PermSpec: the permutation groups of a model, their members, and fixed axes.

Built from an inference result (``permgraph.infer``); serializable to JSON, so
solvers and the command line work from a spec without tracing again.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from permgraph.errors import FormatError, InputError
from permgraph.permutation import AxisTree, Permutation, tree_groups, tree_size

SPEC_VERSION = 1


@dataclass(frozen=True)
class Group:
    """One permutation variable.

    ``ctx``: outer groups this group is indexed by; one permutation of ``size``
    per combination of their indices (a within-head group has the head group as
    context, so every head gets its own within-head permutation).
    """

    name: str
    size: int
    ctx: tuple[str, ...] = ()
    role: str = ""

    @property
    def kind(self) -> str:
        return "blocked" if self.ctx else "flat"


@dataclass(frozen=True)
class Member:
    param: str
    axis: int


@dataclass(frozen=True)
class FixedAxis:
    """A parameter axis (or part of one) that no permutation may move, and why."""

    param: str
    axis: int
    part: str  # "whole axis", or the fixed segments / factors of a structured axis
    reasons: tuple[str, ...]


@dataclass
class PermSpec:
    groups: dict[str, Group]
    axes: dict[str, list[AxisTree]]
    shapes: dict[str, tuple[int, ...]]
    fixed: list[FixedAxis] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> canonical name
    unknown_ops: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # -- lookups -----------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups.values()}

    @property
    def ctx(self) -> dict[str, tuple[str, ...]]:
        return {g.name: g.ctx for g in self.groups.values()}

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def names_of(self, name: str) -> list[str]:
        """A parameter's canonical name followed by the names tied to it."""
        return [name] + [a for a, c in self.aliases.items() if c == name]

    def axes_of(self, name: str) -> list[AxisTree] | None:
        return self.axes.get(self.canonical(name))

    def perm_shape(self, group: str) -> tuple[int, ...]:
        g = self.groups[group]
        return tuple(self.groups[c].size for c in g.ctx) + (g.size,)

    def members(self, group: str) -> list[Member]:
        return [Member(p, d) for p, trees in self.axes.items() for d, t in enumerate(trees)
                if group in tree_groups(t)]

    def member_map(self) -> dict[str, list[Member]]:
        out: dict[str, list[Member]] = {g: [] for g in self.groups}
        for p, trees in self.axes.items():
            for d, t in enumerate(trees):
                for g in dict.fromkeys(tree_groups(t)):
                    out[g].append(Member(p, d))
        return out

    def covered_fraction(self) -> float:
        """Fraction of parameter entries that some group moves."""
        total = moved = 0
        for p, shape in self.shapes.items():
            n = math.prod(shape)
            total += n
            if any(tree_groups(t) for t in self.axes.get(p, [])):
                moved += n
        return moved / total if total else 0.0

    # -- permutations ------------------------------------------------------------
    def identity(self) -> Permutation:
        return Permutation({g: torch.arange(self.groups[g].size).expand(self.perm_shape(g)).clone()
                            for g in self.groups})

    def random_permutation(self, seed: int = 0) -> Permutation:
        gen = torch.Generator().manual_seed(int(seed))
        return Permutation({g: torch.rand(self.perm_shape(g), generator=gen).argsort(dim=-1)
                            for g in self.groups})

    # -- serialization -------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "version": SPEC_VERSION,
            "groups": [{"name": g.name, "size": g.size, "ctx": list(g.ctx), "role": g.role}
                       for g in self.groups.values()],
            "axes": self.axes,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "fixed": [{"param": f.param, "axis": f.axis, "part": f.part, "reasons": list(f.reasons)}
                      for f in self.fixed],
            "aliases": self.aliases,
            "unknown_ops": self.unknown_ops,
            "info": self.info,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PermSpec":
        """Parse and validate a spec written by ``to_json``; ``FormatError`` names what is wrong."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"not a permgraph spec (invalid JSON: {e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "PermSpec":
        if not isinstance(d, dict) or "groups" not in d or "axes" not in d:
            raise FormatError("not a permgraph spec (write one with 'permgraph compile --out')")
        if d.get("version") != SPEC_VERSION:
            raise FormatError(f"permgraph spec of version {d.get('version')!r}; this permgraph reads version "
                              f"{SPEC_VERSION}: compile the spec again")
        try:
            groups = {}
            for g in d["groups"]:
                grp = Group(_str(g["name"]), _int(g["size"]), tuple(_str(c) for c in g["ctx"]), _str(g.get("role", "")))
                if grp.name in groups:
                    raise FormatError(f"group '{grp.name}' appears twice")
                groups[grp.name] = grp
            spec = cls(groups=groups, axes={_str(k): list(v) for k, v in d["axes"].items()},
                       shapes={_str(k): tuple(_int(n, 0) for n in v) for k, v in d["shapes"].items()},
                       fixed=[FixedAxis(_str(f["param"]), _int(f["axis"], 0), _str(f["part"]),
                                        tuple(_str(r) for r in f["reasons"])) for f in d.get("fixed", [])],
                       aliases={_str(k): _str(v) for k, v in d.get("aliases", {}).items()},
                       unknown_ops=dict(d.get("unknown_ops", {})), info=dict(d.get("info", {})))
        except FormatError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise FormatError(f"malformed permgraph spec: {type(e).__name__} {e}") from None
        check_spec(spec)
        return spec

    def to_networkx(self):
        """Groups and parameter axes as a bipartite graph (nodes 'group:NAME', 'axis:PARAM:DIM')."""
        import networkx as nx

        graph = nx.Graph()
        for g in self.groups.values():
            graph.add_node(f"group:{g.name}", kind="group", size=g.size, role=g.role, ctx=g.ctx)
            for c in g.ctx:
                graph.add_edge(f"group:{g.name}", f"group:{c}", kind="context")
        for p, trees in self.axes.items():
            for d, t in enumerate(trees):
                node = f"axis:{p}:{d}"
                graph.add_node(node, kind="axis", param=p, axis=d, size=self.shapes[p][d])
                for g in dict.fromkeys(tree_groups(t)):
                    graph.add_edge(node, f"group:{g}", kind="member")
        return graph

    # -- derived specs ---------------------------------------------------------------
    def with_trees(self, axes: dict[str, list[AxisTree]], groups: dict[str, Group], **info: Any) -> "PermSpec":
        return PermSpec(groups, axes, dict(self.shapes), list(self.fixed), dict(self.aliases),
                        dict(self.unknown_ops), {**self.info, **info})

    def merged(self, names: list[str], new_name: str) -> "PermSpec":
        """The spec with groups ``names`` forced to share one permutation (sound: a subgroup)."""
        first = self.groups[names[0]]
        if any((self.groups[n].size, self.groups[n].ctx) != (first.size, first.ctx) for n in names):
            raise InputError(f"cannot merge groups of different sizes or contexts: {names}")
        ren = {n: new_name for n in names}
        groups = {}
        for g in self.groups.values():
            name = ren.get(g.name, g.name)
            if name not in groups:
                groups[name] = Group(name, g.size, tuple(ren.get(c, c) for c in g.ctx),
                                     "+".join(dict.fromkeys(self.groups[n].role for n in names)) if name == new_name else g.role)
        axes = {p: [_rename(t, ren) for t in trees] for p, trees in self.axes.items()}
        return self.with_trees(axes, groups)

    def flattened_heads(self) -> "PermSpec":
        """Heads and their within-head groups merged into flat groups (the head-contaminating baseline).

        Every product of groups on an axis becomes one flat group over the whole
        product. The result is NOT function-preserving: for ablations only.
        """
        groups: dict[str, Group] = {}

        def flat(t: AxisTree) -> AxisTree:
            if t[0] in ("g", "id"):
                return t
            subs = [flat(s) for s in t[1]]
            if t[0] == "prod" and any(s[0] == "g" for s in subs):
                names = [s[1] if s[0] == "g" else f"fixed{s[1]}" for s in subs]
                name = "*".join(names)
                size = math.prod(self.groups[s[1]].size if s[0] == "g" else s[1] for s in subs)
                groups.setdefault(name, Group(name, size, (), "flat-heads"))
                return ["g", name]
            return [t[0], subs]

        axes = {p: [flat(t) for t in trees] for p, trees in self.axes.items()}
        used = {g for trees in axes.values() for t in trees for g in tree_groups(t)}
        for g in self.groups.values():
            if g.name in used and not g.ctx:
                groups.setdefault(g.name, g)
        return self.with_trees(axes, {k: v for k, v in groups.items() if k in used}, function_preserving=False)

    def explain(self) -> str:
        from permgraph.explain import explain_spec

        return explain_spec(self)

    def __repr__(self) -> str:
        return (f"PermSpec({len(self.groups)} groups, {len(self.axes)} parameters, "
                f"{self.covered_fraction():.1%} of entries permuted)")


# -- validation ---------------------------------------------------------------------

def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise FormatError(f"expected a string, got {x!r}")
    return x


def _int(x: Any, least: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < least:
        raise FormatError(f"expected an integer >= {least}, got {x!r}")
    return x


def check_spec(spec: PermSpec) -> None:
    """Every group, context, axis tree, shape and alias is consistent; ``FormatError`` otherwise."""
    for g in spec.groups.values():
        bad = [c for c in g.ctx if c not in spec.groups or c == g.name]
        if bad:
            raise FormatError(f"group '{g.name}' has unknown context groups {bad}")
    for p, trees in spec.axes.items():
        if p not in spec.shapes:
            raise FormatError(f"axes given for '{p}', which has no shape")
        if len(trees) != len(spec.shapes[p]):
            raise FormatError(f"'{p}' has {len(spec.shapes[p])} dims but {len(trees)} axis trees")
        for d, t in enumerate(trees):
            where = f"'{p}' axis {d}"
            size = _check_tree(t, spec, where, set())
            if size != spec.shapes[p][d]:
                raise FormatError(f"{where}: the axis tree covers {size} entries, the shape says {spec.shapes[p][d]}")
    for alias, target in spec.aliases.items():
        if target not in spec.shapes:
            raise FormatError(f"alias '{alias}' points to unknown parameter '{target}'")


def _check_tree(t: Any, spec: PermSpec, where: str, outer: set[str]) -> int:
    """The size of a well-formed tree; a group's contexts must be outer factors of a product."""
    if not (isinstance(t, list) and len(t) == 2 and t[0] in ("g", "id", "prod", "cat")):
        raise FormatError(f"{where}: malformed axis tree {str(t)[:80]}")
    kind, arg = t
    if kind == "id":
        return _int(arg)
    if kind == "g":
        if arg not in spec.groups:
            raise FormatError(f"{where}: unknown group {arg!r}")
        missing = [c for c in spec.groups[arg].ctx if c not in outer]
        if missing:
            raise FormatError(f"{where}: group '{arg}' is used without its context groups {missing} outside it")
        return spec.groups[arg].size
    if not isinstance(arg, list) or not arg:
        raise FormatError(f"{where}: malformed axis tree {str(t)[:80]}")
    if kind == "cat":
        return sum(_check_tree(s, spec, where, outer) for s in arg)
    size, seen = 1, set(outer)
    for s in arg:
        size *= _check_tree(s, spec, where, seen)
        seen |= set(tree_groups(s))
    return size


# -- building a spec from an inference result ----------------------------------------

def build_spec(result, param_shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str],
               info: Mapping[str, Any], with_nodes: bool = False):
    """Turn atoms into groups: every free leaf that moves a parameter is a group.

    With ``with_nodes``, also return the axis trees of every single-tensor graph
    node (``node name -> one tree per dim``), for data-based solvers.
    """
    store = result.store
    _propagate_fixed(store, result)

    def is_free(leaf: int) -> bool:
        return not store.reasons(leaf) and store.size(leaf) > 1

    def tree(atom: int) -> AxisTree:
        r = store.find(atom)
        k = store.kind(r)
        if k is None:
            return ["g", r] if is_free(r) else ["id", store.size(r)]
        subs = [tree(c) for c in store.flat(r, k)]
        if all(s[0] == "id" for s in subs):
            return ["id", store.size(r)]
        return [k, subs]

    raw_axes = {p: [tree(a) for a in ty] for p, ty in result.param_axes.items()}
    leaves = list(dict.fromkeys(g for trees in raw_axes.values() for t in trees for g in tree_groups(t)))
    ctx = _contexts(store, raw_axes, result.tensor_types, set(leaves))
    names = _name_groups(store, leaves, raw_axes, ctx)
    order = _outer_first(leaves, ctx)
    groups = {names[x]: Group(names[x], store.size(x), tuple(names[c] for c in ctx[x]), _role(store, x, ctx))
              for x in order}
    axes = {p: [_rename(t, names) for t in trees] for p, trees in raw_axes.items()}
    fixed = []
    for p, ty in result.param_axes.items():
        for d, a in enumerate(ty):
            parts = _fixed_parts(axes[p][d])
            if parts:
                fl = [x for x in store.leaves(a) if not is_free(x) and store.size(x) > 1]
                reasons = tuple(dict.fromkeys(str(r) for x in fl for r in store.reasons(x)))
                fixed.append(FixedAxis(p, d, parts, reasons))
    unknown = {k: len(v) for k, v in result.unknown_ops.items()}
    spec = PermSpec(groups, axes, dict(param_shapes), fixed, dict(aliases), unknown, dict(info))
    if not with_nodes:
        return spec

    def named(t: AxisTree) -> AxisTree:
        if t[0] == "g":
            return ["g", names[t[1]]] if t[1] in names else ["id", store.size(t[1])]
        if t[0] == "id":
            return t
        subs = [named(x) for x in t[1]]
        return ["id", math.prod(x[1] for x in subs) if t[0] == "prod" else sum(x[1] for x in subs)] \
            if all(x[0] == "id" for x in subs) else [t[0], subs]

    node_trees = {n: [named(tree(a)) for a in ty] for n, ty in result.node_types.items()
                  if isinstance(ty, list) and all(isinstance(a, int) for a in ty)}
    return spec, node_trees


def _fixed_parts(t: AxisTree, where: str = "whole axis") -> str:
    """Which parts of an axis are fixed: 'whole axis', 'segment of 16', 'factor of 3', ..."""
    if t[0] == "id":
        return where if t[1] > 1 else ""
    if t[0] == "g":
        return ""
    label = "segment" if t[0] == "cat" else "factor"
    parts = [_fixed_parts(s, f"{label} of {s[1] if s[0] == 'id' else '?'}") for s in t[1]]
    return ", ".join(dict.fromkeys(p for p in parts if p))


def _propagate_fixed(store, result) -> None:
    """A fixed axis fixes every part of it."""
    seen: set[int] = set()
    roots = {store.find(a) for ty in list(result.param_axes.values()) + result.tensor_types for a in ty}
    stack = list(roots)
    while stack:
        r = store.find(stack.pop())
        if r in seen:
            continue
        seen.add(r)
        kids = store.children(r) if store.kind(r) else []
        if store.reasons(r):
            for c in kids:
                if not store.reasons(c):
                    for why in store.reasons(r):
                        store.fix(c, why)
        stack.extend(kids)
    # a fixed parent discovered after its children were visited: repeat until stable
    changed = True
    while changed:
        changed = False
        for r in seen:
            if store.reasons(r) and store.kind(r):
                for c in store.children(r):
                    if not store.reasons(c):
                        for why in store.reasons(r):
                            store.fix(c, why)
                        changed = True


def _contexts(store, raw_axes, tensor_types, groups: set[int]) -> dict[int, list[int]]:
    """Context of each group: outer factors it may be indexed by.

    A candidate must precede the group in the product structure of *every*
    parameter axis containing it (so the index map is per-axis), and co-occur
    with it in *every* tensor of the graph (so every op treats the group's axis
    batch-wise along the candidate's axis). Otherwise the group is shared.
    """
    cand: dict[int, list[int]] = {}

    def walk(t: AxisTree, pre: list[int]) -> None:
        if t[0] == "g":
            x = t[1]
            cand[x] = [c for c in cand[x] if c in pre] if x in cand else list(pre)
        elif t[0] == "cat":
            for s in t[1]:
                walk(s, pre)
        elif t[0] == "prod":
            acc = list(pre)
            for s in t[1]:
                walk(s, acc)
                if s[0] == "g":
                    acc = acc + [s[1]]

    for trees in raw_axes.values():
        for t in trees:
            walk(t, [])
    cooc: dict[int, set[int]] = {}
    for ty in tensor_types + list(_param_types(raw_axes)):
        present = {x for a in ty for x in (store.leaves(a) if isinstance(a, int) else [a])} & groups
        for x in present:
            cooc[x] = cooc[x] & present if x in cooc else set(present)
    return {x: [c for c in cand.get(x, []) if c in cooc.get(x, set()) and c != x] for x in groups}


def _param_types(raw_axes):
    for trees in raw_axes.values():
        yield [g for t in trees for g in tree_groups(t)]


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


def _role(store, x: int, ctx: dict[int, list[int]]) -> str:
    roles = store.roles(x)
    if "qk" in roles and "vo" in roles:
        return "qkvo"
    if roles:
        return roles[0]
    if any(x in cs for cs in ctx.values()):
        return "heads"
    return "within" if ctx[x] else ""


_LAYER = re.compile(r"\.\d+(?=\.|$)")


def _name_groups(store, leaves: list[int], raw_axes, ctx) -> dict[int, str]:
    """Names from module paths: the members' common module prefix plus a role."""
    members: dict[int, list[str]] = {x: [] for x in leaves}
    for p, trees in raw_axes.items():
        for t in trees:
            for g in dict.fromkeys(tree_groups(t)):
                members[g].append(p)
    names: dict[int, str] = {}
    bases: dict[int, tuple[str, str]] = {}
    used: Counter = Counter()
    for x in leaves:
        mods = [m.rsplit(".", 1)[0] if "." in m else "" for m in members[x]]
        prefix = _common_prefix(mods)
        role = _role(store, x, ctx)
        layers = {tuple(_LAYER.findall(m)) for m in members[x]}
        if not role and len(layers) > 1 and not ctx[x]:
            prefix = "residual"  # a flat group spanning several layers: the residual stream
        elif not prefix:
            prefix = "+".join(sorted({m.split(".")[0] for m in members[x]})) or "root"
        base = f"{prefix}.{role}" if role else prefix
        bases[x] = (base, Counter(m.split(".")[0] for m in members[x]).most_common(1)[0][0])
    counts = Counter(b for b, _ in bases.values())
    for x in leaves:
        base, top = bases[x]
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


def _rename(t: AxisTree, names: Mapping[int, str]) -> AxisTree:
    if t[0] == "g":
        return ["g", names.get(t[1], t[1])]
    if t[0] == "id":
        return t
    return [t[0], [_rename(s, names) for s in t[1]]]
