"""Derived specs: rewrites of a spec's groups that solvers use.

- ``merged``: several groups forced to share one permutation. Sound: the permutations
  of the result are a subgroup of the original's.
- ``shared_within_head``: each head's Q/K and V/O within-head groups merged (the
  TransFusion paper's choice).
- ``flattened_heads``: heads and their within-head groups merged into one flat group
  per product axis: the head-contaminating baseline, NOT function-preserving.
- ``untied_residual``: the residual stream split into one group per residual addend
  (TransFusion's Step 3): NOT function-preserving for the plain architecture, whose
  identity shortcuts would have to become ``P_out P_in^T``; ``residual_sites``
  computes what the spec records for it at compile time.

``expand_permutation`` maps a permutation of a merged spec back onto the original
spec (a shared permutation is every member's permutation).
"""
from __future__ import annotations

import math

from permgraph.errors import InputError
from permgraph.ir import AxisTree, Cat, Fixed, G, Permutation, Prod, zip_trees
from permgraph.spec import Group, PermSpec, site_groups


def merged(spec: PermSpec, names: list[str], new_name: str) -> PermSpec:
    """``spec`` with groups ``names`` sharing one permutation, called ``new_name``."""
    first = spec.groups[names[0]]
    if any((spec.groups[n].size, spec.groups[n].ctx) != (first.size, first.ctx) for n in names):
        raise InputError(f"cannot merge groups of different sizes or contexts: {names}")
    ren = {n: new_name for n in names}
    groups: dict[str, Group] = {}
    for g in spec.groups.values():
        name = ren.get(g.name, g.name)
        if name in groups:
            continue
        role = "+".join(dict.fromkeys(spec.groups[n].role for n in names)) if name == new_name else g.role
        groups[name] = Group(name, g.size, tuple(ren.get(c, c) for c in g.ctx), role)
    axes = {p: [t.rename(lambda n: G(ren.get(n, n))) for t in trees] for p, trees in spec.axes.items()}
    return spec.with_trees(axes, groups)


def shared_within_head(spec: PermSpec) -> PermSpec:
    """Each head's Q/K and V/O within-head groups merged into one, where both are free
    and of one size; otherwise unchanged."""
    out = spec
    for h in spec.head_groups():
        kids = [g for g, grp in spec.groups.items() if grp.ctx == (h,) and grp.role in ("qk", "vo")]
        if len(kids) == 2 and spec.groups[kids[0]].size == spec.groups[kids[1]].size:
            out = merged(out, kids, kids[0].rsplit(".", 1)[0] + ".qkvo")
    return out


def expand_permutation(derived: PermSpec, perm: Permutation, original: PermSpec) -> Permutation:
    """A permutation of ``derived`` (``original`` with groups merged) as one of ``original``:
    each original group takes the permutation of the group it was merged into."""
    mapping = group_map(original, derived)
    return Permutation({g: perm[mapping[g]] for g in original.groups})


def group_map(original: PermSpec, derived: PermSpec) -> dict[str, str]:
    """Original group -> derived group, by zipping the axis trees; ``InputError`` when ``derived``
    is not ``original`` with groups merged (e.g. flattened heads)."""
    out: dict[str, str] = {}
    for p, trees in original.axes.items():
        if p not in derived.axes or len(derived.axes[p]) != len(trees):
            raise InputError(f"the specs differ on parameter '{p}'")
        for d, (t, u) in enumerate(zip(trees, derived.axes[p])):
            for leaf, other in zip_trees(t, u) or [(t, None)]:
                match leaf, other:
                    case G(a), G(b) if original.groups[a].size == derived.groups[b].size:
                        if out.setdefault(a, b) != b:
                            raise InputError(f"group '{a}' maps to two groups of the derived spec ('{p}' axis {d})")
                    case Fixed(n), Fixed(m) if n == m:
                        pass
                    case _:
                        raise InputError(f"the alignment's spec is not the given spec with groups merged (at '{p}' "
                                         f"axis {d}): its permutation cannot be expressed on the given spec")
    missing = [g for g in original.groups if g not in out]
    if missing:
        raise InputError(f"groups {missing[:3]} have no counterpart in the derived spec")
    return out


def flattened_heads(spec: PermSpec) -> PermSpec:
    """Every product of groups on an axis becomes one flat group over the whole product."""
    groups: dict[str, Group] = {}

    def flat(t: AxisTree) -> AxisTree:
        match t:
            case G() | Fixed():
                return t
            case Cat(parts):
                return Cat(tuple(flat(s) for s in parts))
            case Prod(parts):
                subs = [flat(s) for s in parts]
                if not any(isinstance(s, G) for s in subs):
                    return Prod(tuple(subs))
                name = "*".join(s.name if isinstance(s, G) else f"fixed{s.size(spec.sizes)}" for s in subs)
                size = math.prod(s.size(spec.sizes) for s in subs)
                groups.setdefault(name, Group(name, size, (), "flat-heads"))
                return G(name)
        raise TypeError(f"not an axis tree: {t!r}")

    axes = {p: [flat(t) for t in trees] for p, trees in spec.axes.items()}
    used = {g for trees in axes.values() for t in trees for g in t.groups()}
    for g in spec.groups.values():
        if g.name in used and not g.ctx:
            groups.setdefault(g.name, g)
    return spec.with_trees(axes, {k: v for k, v in groups.items() if k in used})


def untied_residual(spec: PermSpec) -> PermSpec:
    """``spec`` with every residual addend's own group (``spec.residual_sites``): each residual
    site is a group of the size, context and role of the group it splits from."""
    if spec.residual_sites is None:
        why = spec.info.get("residual_sites_missing", "it was written before permgraph recorded them")
        raise InputError(f"this spec has no residual sites ({why}): compile it again with this permgraph "
                         "to align with residual='untied'")
    parent = site_groups(spec)
    axes = {**spec.axes, **{p: list(trees) for p, trees in spec.residual_sites.items()}}
    used = {g for trees in axes.values() for t in trees for g in t.groups()}
    groups = {g: grp for g, grp in spec.groups.items() if g in used}
    for site, g in parent.items():
        if site not in groups:
            grp = spec.groups[g]
            groups[site] = Group(site, grp.size, grp.ctx, grp.role or "residual-site")
    return spec.with_trees(axes, groups, residual="untied")


def residual_sites(tied: PermSpec, untied: PermSpec) -> tuple[dict[str, list[AxisTree]] | None, str]:
    """What ``tied`` records of ``untied`` (the same model inferred with untied residual additions):
    the axis trees of the parameters whose groups split, site groups named ``GROUP@k`` in order of
    appearance; None and the reason when ``untied`` is not ``tied`` with groups split (untying
    changed what is fixed or structured, or split a group that others are indexed by)."""
    pairs: dict[str, dict[str, None]] = {}  # tied group -> its untied groups, in order
    for p, trees in tied.axes.items():
        other = untied.axes.get(p)
        zipped = [zip_trees(t, u) for t, u in zip(trees, other or [])]
        if other is None or len(other) != len(trees) or None in zipped:
            return None, f"untying the residual additions changes the axes of '{p}' beyond splitting groups"
        for leaf, u in (pair for leaves in zipped for pair in leaves):
            match leaf, u:
                case G(a), G(b) if tied.groups[a].size == untied.groups[b].size:
                    pairs.setdefault(a, {})[b] = None
                case Fixed(n), _ if n == u.size(untied.sizes):
                    pass  # free only when untied: kept fixed (the sites refine the tied spec)
                case _:
                    return None, f"untying the residual additions changes the axes of '{p}' beyond splitting groups"
    owner: dict[str, str] = {}
    for a, bs in pairs.items():
        for b in bs:
            if owner.setdefault(b, a) != a:
                return None, f"an untied group spans the groups '{owner[b]}' and '{a}'"
    split = {a: list(bs) for a, bs in pairs.items() if len(bs) > 1}
    contexts = {c for g in tied.groups.values() for c in g.ctx}
    if split.keys() & contexts:
        return None, f"untying splits groups that others are indexed by: {sorted(split.keys() & contexts)}"
    name = {b: f"{a}@{k}" for a, bs in split.items() for k, b in enumerate(bs)}

    def rename(t: AxisTree, u: AxisTree) -> AxisTree:
        match t, u:
            case G(a), G(b):
                return G(name.get(b, a))
            case (Prod(ps), Prod(qs)):
                return Prod(tuple(rename(x, y) for x, y in zip(ps, qs)))
            case (Cat(ps), Cat(qs)):
                return Cat(tuple(rename(x, y) for x, y in zip(ps, qs)))
        return t

    sites = {}
    for p, trees in tied.axes.items():
        new = [rename(t, u) for t, u in zip(trees, untied.axes[p])]
        if new != trees:
            sites[p] = new
    return sites, ""
