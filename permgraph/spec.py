"""PermSpec: the permutation groups of a model, the axis tree of every parameter axis, fixed axes.

Built by ``permgraph.build`` from an inference result; serializable to JSON (and
validated when read), so solvers and the command line work without tracing again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph.errors import FormatError
from permgraph.ir import (
    AxisTree,
    Cat,
    Fixed,
    G,
    Layout,
    Permutation,
    Prod,
    check_layout,
    from_view,
    to_view,
    tree_from_json,
    view_shape,
    zip_trees,
)

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
    # TransFusion's untied residual step: the axis trees of the parameters whose groups split
    # when every residual addend keeps its own permutation (``rewrites.untied_residual``);
    # None when not recorded (a spec from before, or a model where untying changes more)
    residual_sites: dict[str, list[AxisTree]] | None = None
    # parameters viewed with dims merged (``permgraph.ir``, layouts): their axis trees, members and
    # fixed axes are over the view's axes; every other parameter's are over its own dims
    layouts: dict[str, Layout] = field(default_factory=dict)
    # the outputs left free (``compile(outputs=...)``) whose axes the compiler typed: output name -> one
    # tree per dim. A permutation from the spec permutes them along these, ``f(perm(theta)) = perm(f(theta))``
    # (``verify`` checks it); a free leaf that moves no parameter is ``Fixed`` here
    outputs: dict[str, list[AxisTree]] = field(default_factory=dict)

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

    def view_shape(self, name: str) -> tuple[int, ...]:
        """The shape the axis trees of parameter ``name`` describe (its own, unless it has a layout)."""
        p = self.canonical(name)
        return view_shape(self.shapes[p], self.layouts.get(p))

    def to_view(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Parameter ``name``'s tensor (in its shape, or already in its view's) in its view's shape."""
        layout = self.layouts.get(self.canonical(name))
        return x if layout is None or x.dim() == len(layout) else to_view(x, layout)

    def from_view(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """A tensor in parameter ``name``'s view shape back in the parameter's shape."""
        p = self.canonical(name)
        return from_view(v, self.layouts.get(p), self.shapes[p])

    def axis_label(self, name: str, axis: int) -> str:
        """How an axis of the trees is named: its dim, or its dims joined by '*' (outer first)."""
        layout = self.layouts.get(self.canonical(name))
        return str(axis) if layout is None else "*".join(map(str, layout[axis]))

    def perm_shape(self, group: str) -> tuple[int, ...]:
        g = self.groups[group]
        return tuple(self.groups[c].size for c in g.ctx) + (g.size,)

    def members(self, group: str) -> list[Member]:
        return [Member(p, d) for p, trees in self.axes.items() for d, t in enumerate(trees)
                if group in t.groups()]

    def member_map(self) -> dict[str, list[Member]]:
        out: dict[str, list[Member]] = {g: [] for g in self.groups}
        for p, trees in self.axes.items():
            for d, t in enumerate(trees):
                for g in dict.fromkeys(t.groups()):
                    out[g].append(Member(p, d))
        return out

    def covered_fraction(self) -> float:
        """Fraction of parameter entries that some group moves."""
        total = moved = 0
        for p, shape in self.shapes.items():
            n = math.prod(shape)
            total += n
            if any(t.groups() for t in self.axes.get(p, [])):
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
            "axes": {p: [t.to_json() for t in trees] for p, trees in self.axes.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "fixed": [{"param": f.param, "axis": f.axis, "part": f.part, "reasons": list(f.reasons)}
                      for f in self.fixed],
            "aliases": self.aliases,
            "unknown_ops": self.unknown_ops,
            "info": self.info,
            **({"layouts": {p: [list(part) for part in lay] for p, lay in self.layouts.items()}}
               if self.layouts else {}),
            **({"outputs": {o: [t.to_json() for t in trees] for o, trees in self.outputs.items()}}
               if self.outputs else {}),
            **({} if self.residual_sites is None else
               {"residual_sites": {p: [t.to_json() for t in trees] for p, trees in self.residual_sites.items()}}),
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
            shapes = {_str(k): tuple(_int(n, 0) for n in v) for k, v in d["shapes"].items()}
            layouts = {}
            for k, lay in dict(d.get("layouts", {})).items():
                if _str(k) not in shapes:
                    raise FormatError(f"layout given for '{k}', which has no shape")
                layouts[k] = check_layout(lay, len(shapes[k]))
            spec = cls(groups=groups, axes={_str(k): [tree_from_json(t) for t in v] for k, v in d["axes"].items()},
                       shapes=shapes, layouts=layouts,
                       fixed=[FixedAxis(_str(f["param"]), _int(f["axis"], 0), _str(f["part"]),
                                        tuple(_str(r) for r in f["reasons"])) for f in d.get("fixed", [])],
                       aliases={_str(k): _str(v) for k, v in d.get("aliases", {}).items()},
                       unknown_ops=dict(d.get("unknown_ops", {})), info=dict(d.get("info", {})))
            spec.outputs = {_str(k): [tree_from_json(t) for t in v] for k, v in dict(d.get("outputs", {})).items()}
            if d.get("residual_sites") is not None:
                spec.residual_sites = {_str(k): [tree_from_json(t) for t in v] for k, v in d["residual_sites"].items()}
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
                for g in dict.fromkeys(t.groups()):
                    graph.add_edge(node, f"group:{g}", kind="member")
        return graph

    def with_trees(self, axes: dict[str, list[AxisTree]], groups: dict[str, Group], **info: Any) -> "PermSpec":
        """A spec over the same parameters with other groups and axis trees (see ``permgraph.rewrites``);
        the free outputs' trees (over the old groups) are left out."""
        return PermSpec(groups, axes, dict(self.shapes), list(self.fixed), dict(self.aliases),
                        dict(self.unknown_ops), {**self.info, **info}, layouts=dict(self.layouts))

    def head_groups(self) -> list[str]:
        """Groups that other groups are indexed by and that have no context themselves (attention heads)."""
        parents = {c for g in self.groups.values() for c in g.ctx}
        return [g for g in self.groups if g in parents and not self.groups[g].ctx]

    def explain(self) -> str:
        """Groups, members, fixed axes and why, coverage (``permgraph.report``)."""
        from permgraph.report import explain_spec

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
    for p, layout in spec.layouts.items():
        if p not in spec.shapes:
            raise FormatError(f"layout given for '{p}', which has no shape")
        check_layout(layout, len(spec.shapes[p]))
    for p, trees in spec.axes.items():
        if p not in spec.shapes:
            raise FormatError(f"axes given for '{p}', which has no shape")
        shape = spec.view_shape(p)
        if len(trees) != len(shape):
            raise FormatError(f"'{p}' has {len(shape)} {'view axes' if p in spec.layouts else 'dims'} "
                              f"but {len(trees)} axis trees")
        for d, t in enumerate(trees):
            where = f"'{p}' axis {spec.axis_label(p, d)}"
            size = _check_tree(t, spec, where, set())
            if size != shape[d]:
                raise FormatError(f"{where}: the axis tree covers {size} entries, the shape says {shape[d]}")
    for o, trees in spec.outputs.items():
        for d, t in enumerate(trees):
            check_tree(t, spec, f"output '{o}' dim {d}")
    for alias, target in spec.aliases.items():
        if target not in spec.shapes:
            raise FormatError(f"alias '{alias}' points to unknown parameter '{target}'")
    site_groups(spec)


def site_groups(spec: PermSpec) -> dict[str, str]:
    """Residual site group -> the group it splits from (``spec.residual_sites``), validated:
    every site tree is the parameter's tree with some groups renamed, each site name standing
    for one group of the spec."""
    out: dict[str, str] = {}
    for p, trees in (spec.residual_sites or {}).items():
        if p not in spec.axes or len(trees) != len(spec.axes[p]):
            raise FormatError(f"residual sites given for '{p}', which has no axes of that number in the spec")
        for d, (t, u) in enumerate(zip(spec.axes[p], trees)):
            where = f"'{p}' axis {d}"
            for leaf, site in zip_trees(t, u) or [(t, None)]:
                match leaf, site:
                    case G(a), G(b):
                        if b in spec.groups and b != a:
                            raise FormatError(f"{where}: residual site '{b}' is the name of another group")
                        if out.setdefault(b, a) != a:
                            raise FormatError(f"{where}: residual site '{b}' splits from two groups")
                    case Fixed(n), Fixed(m) if n == m:
                        pass
                    case _:
                        raise FormatError(f"{where}: the residual site tree does not match the parameter's axis tree")
    return out


def check_tree(t: AxisTree, spec: PermSpec, where: str) -> int:
    """The size of ``t`` over ``spec``'s groups; ``FormatError`` where a group is unknown or used
    without its context groups as outer factors of the same product."""
    return _check_tree(t, spec, where, set())


def _check_tree(t: AxisTree, spec: PermSpec, where: str, outer: set[str]) -> int:
    """The size of a tree whose groups exist and whose contexts are outer factors of a product."""
    match t:
        case Fixed(n):
            return n
        case G(name):
            if name not in spec.groups:
                raise FormatError(f"{where}: unknown group {name!r}")
            missing = [c for c in spec.groups[name].ctx if c not in outer]
            if missing:
                raise FormatError(f"{where}: group '{name}' is used without its context groups {missing} outside it")
            return spec.groups[name].size
        case Cat(parts):
            return sum(_check_tree(s, spec, where, outer) for s in parts)
        case Prod(parts):
            size, seen = 1, set(outer)
            for s in parts:
                size *= _check_tree(s, spec, where, seen)
                seen |= set(s.groups())
            return size
    raise FormatError(f"{where}: not an axis tree: {t!r}")
