"""The typed data a spec is made of: axis trees, and permutations over groups.

An axis tree says how one parameter axis is built from group axes:

- ``G(name)``: the whole axis is group ``name``'s axis;
- ``Fixed(n)``: ``n`` positions no permutation moves;
- ``Prod((t1, t2, ...))``: mixed radix, ``t1`` outermost (heads x within-head:
  position ``i1 * size(t2) + i2``);
- ``Cat((t1, t2, ...))``: consecutive segments (a fused q|k|v projection).

JSON keeps the format of spec version 1: ``["g", name]``, ``["id", n]``,
``["prod", [...]]``, ``["cat", [...]]``.

A layout views a parameter with some dims merged, so that a group whose context lies on another
dim (each MoE expert's hidden units, indexed by the expert dim) is a product on one axis like a
within-head group: ``((0, 2), (1,))`` views ``(E, H, 2I)`` as ``(E * 2I, H)``, dim 0 outer. The
axis trees of such a parameter are over its view's axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch

from permgraph.errors import FormatError


@dataclass(frozen=True)
class G:
    """A group's axis. ``name`` is the group's name (an atom id while a spec is being built)."""

    name: str

    def size(self, sizes: Mapping[str, int]) -> int:
        return sizes[self.name]

    def groups(self) -> list[str]:
        return [self.name]

    def rename(self, f: Callable[[str], "AxisTree"]) -> "AxisTree":
        return f(self.name)

    def to_json(self) -> list:
        return ["g", self.name]


@dataclass(frozen=True)
class Fixed:
    """``n`` positions that stay where they are."""

    n: int

    def size(self, sizes: Mapping[str, int]) -> int:
        return self.n

    def groups(self) -> list[str]:
        return []

    def rename(self, f: Callable[[str], "AxisTree"]) -> "AxisTree":
        return self

    def to_json(self) -> list:
        return ["id", self.n]


@dataclass(frozen=True)
class Prod:
    """Mixed radix over ``parts``, outermost first."""

    parts: tuple["AxisTree", ...]

    def size(self, sizes: Mapping[str, int]) -> int:
        return math.prod(p.size(sizes) for p in self.parts)

    def groups(self) -> list[str]:
        return [g for p in self.parts for g in p.groups()]

    def rename(self, f: Callable[[str], "AxisTree"]) -> "AxisTree":
        return Prod(tuple(p.rename(f) for p in self.parts))

    def to_json(self) -> list:
        return ["prod", [p.to_json() for p in self.parts]]


@dataclass(frozen=True)
class Cat:
    """Consecutive segments."""

    parts: tuple["AxisTree", ...]

    def size(self, sizes: Mapping[str, int]) -> int:
        return sum(p.size(sizes) for p in self.parts)

    def groups(self) -> list[str]:
        return [g for p in self.parts for g in p.groups()]

    def rename(self, f: Callable[[str], "AxisTree"]) -> "AxisTree":
        return Cat(tuple(p.rename(f) for p in self.parts))

    def to_json(self) -> list:
        return ["cat", [p.to_json() for p in self.parts]]


AxisTree = Union[G, Fixed, Prod, Cat]


def tree_from_json(obj: object) -> AxisTree:
    """Parse ``["g", name] | ["id", n] | ["prod", [...]] | ["cat", [...]]``; ``FormatError`` otherwise."""
    match obj:
        case ["g", str(name)]:
            return G(name)
        case ["id", int(n)] if not isinstance(n, bool) and n >= 1:
            return Fixed(n)
        case ["prod" | "cat" as kind, list(parts)] if parts:
            subs = tuple(tree_from_json(p) for p in parts)
            return Prod(subs) if kind == "prod" else Cat(subs)
    raise FormatError(f"malformed axis tree {str(obj)[:80]}")


def zip_trees(t: AxisTree, u: AxisTree) -> list[tuple[AxisTree, AxisTree]] | None:
    """Each leaf of ``t`` (``G`` or ``Fixed``) with the subtree of ``u`` at the same place, when
    ``u`` has ``t``'s products and segments down to ``t``'s leaves; None otherwise. How a derived
    spec's trees are read against the spec they derive from."""
    match t, u:
        case (Prod(ps), Prod(qs)) | (Cat(ps), Cat(qs)) if type(t) is type(u) and len(ps) == len(qs):
            out: list[tuple[AxisTree, AxisTree]] = []
            for x, y in zip(ps, qs):
                sub = zip_trees(x, y)
                if sub is None:
                    return None
                out += sub
            return out
        case G() | Fixed(), _:
            return [(t, u)]
    return None


Layout = tuple[tuple[int, ...], ...]


def view_shape(shape: tuple[int, ...], layout: Layout | None) -> tuple[int, ...]:
    """The shape of the view: each axis the product of its dims' sizes."""
    return tuple(shape) if layout is None else tuple(math.prod(shape[d] for d in part) for part in layout)


def to_view(x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """``x`` with its dims reordered and merged as ``layout`` says (a copy only where dims move)."""
    if layout is None:
        return x
    return x.permute([d for part in layout for d in part]).reshape(view_shape(tuple(x.shape), layout))


def from_view(v: torch.Tensor, layout: Layout | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``to_view`` for a tensor of real shape ``shape``."""
    if layout is None:
        return v
    order = [d for part in layout for d in part]
    x = v.reshape([shape[d] for d in order])
    return x.permute([order.index(d) for d in range(len(shape))])


def check_layout(layout: object, ndim: int) -> Layout:
    """A partition of ``range(ndim)`` into non-empty parts; ``FormatError`` otherwise."""
    if (not isinstance(layout, (list, tuple)) or not all(isinstance(p, (list, tuple)) and p for p in layout)
            or not all(isinstance(d, int) and not isinstance(d, bool) for p in layout for d in p)
            or sorted(d for p in layout for d in p) != list(range(ndim))):
        raise FormatError(f"layout {str(layout)[:80]} is not a partition of the parameter's {ndim} dims")
    return tuple(tuple(p) for p in layout)


@dataclass
class Permutation:
    """A permutation tensor for every group of a spec.

    Convention (gather): group ``g``'s permutation ``p`` moves old index ``p[i]`` to new
    index ``i``. A group with context groups ``(c1, ...)`` holds one permutation per
    context value: shape ``(size(c1), ..., size(g))``, indexed by the *old* context index.
    """

    perms: dict[str, torch.Tensor]

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.perms[group]

    def is_identity(self) -> bool:
        return all(bool((p == torch.arange(p.shape[-1])).all()) for p in self.perms.values())

    def to_json(self) -> dict[str, list]:
        return {k: v.tolist() for k, v in self.perms.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, list]) -> "Permutation":
        """Nested lists of integers per group; ``FormatError`` for anything else (floats, bools, ragged)."""
        if not isinstance(data, Mapping):
            raise FormatError("a permutation must map group names to lists of indices")
        out = {}
        for k, v in data.items():
            if not _all_ints(v):
                raise FormatError(f"permutation of group '{k}' holds a value that is not an integer index")
            try:
                out[k] = torch.tensor(v, dtype=torch.long)
            except (ValueError, TypeError, RuntimeError):
                raise FormatError(f"permutation of group '{k}' is not a rectangular array of indices") from None
        return cls(out)

    def equal(self, other: "Permutation") -> bool:
        return self.perms.keys() == other.perms.keys() and all(
            torch.equal(v, other.perms[k]) for k, v in self.perms.items())


def _all_ints(v: object) -> bool:
    if isinstance(v, list):
        return all(_all_ints(x) for x in v)
    return isinstance(v, int) and not isinstance(v, bool)
