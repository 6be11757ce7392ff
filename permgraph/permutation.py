"""Permutations over a spec's groups, and applying them to parameter tensors.

Convention (gather): a group's permutation ``p`` moves old index ``p[i]`` to new
index ``i``, so ``x_new = x.index_select(axis, p)``. A group with context
groups ``(c1, c2, ...)`` (e.g. a within-head group whose context is the head
group) holds one permutation per context value: a tensor of shape
``(size(c1), size(c2), ..., size)``, indexed by the *old* context indices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch

from permgraph.errors import FormatError, InputError

if TYPE_CHECKING:
    from permgraph.spec import PermSpec

AxisTree = list  # ["g", name] | ["id", size] | ["prod", [trees]] | ["cat", [trees]]


@dataclass
class Permutation:
    """A permutation tensor for every group of a spec (see module docstring)."""

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


def check_permutation(spec: "PermSpec", perm: Permutation) -> None:
    """Every group of ``spec`` has integer index tensors of its shape, each row a bijection;
    ``FormatError`` naming the group otherwise."""
    missing = [g for g in spec.groups if g not in perm.perms]
    if missing:
        raise FormatError(f"the permutation lacks groups {missing[:5]}: was it made for another spec?")
    extra = [g for g in perm.perms if g not in spec.groups]
    if extra:
        raise FormatError(f"the permutation has groups the spec lacks {extra[:5]}: was it made for another spec?")
    for g, p in perm.perms.items():
        if not isinstance(p, torch.Tensor) or p.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise FormatError(f"permutation of group '{g}' is not an integer tensor")
        if tuple(p.shape) != spec.perm_shape(g):
            raise FormatError(f"permutation of group '{g}' has shape {tuple(p.shape)}, "
                              f"the spec expects {spec.perm_shape(g)}")
        n = p.shape[-1]
        if not torch.equal(p.cpu().long().sort(dim=-1).values, torch.arange(n).expand(p.shape)):
            raise FormatError(f"permutation of group '{g}' is not a bijection of 0..{n - 1} "
                              "(a duplicate or out-of-range index): the file is corrupt")


def tree_size(tree: AxisTree, sizes: Mapping[str, int]) -> int:
    kind = tree[0]
    if kind == "id":
        return tree[1]
    if kind == "g":
        return sizes[tree[1]]
    subs = [tree_size(t, sizes) for t in tree[1]]
    return math.prod(subs) if kind == "prod" else sum(subs)


def tree_groups(tree: AxisTree) -> list[str]:
    """Group names in an axis tree, outer to inner."""
    if tree[0] == "g":
        return [tree[1]]
    if tree[0] == "id":
        return []
    return [g for t in tree[1] for g in tree_groups(t)]


def axis_index(tree: AxisTree, perm: Permutation, ctx: Mapping[str, tuple[str, ...]],
               sizes: Mapping[str, int]) -> torch.Tensor:
    """The gather index (new position -> old position) of one parameter axis."""
    return _gather(tree, perm, ctx, sizes, {}, 1)[0]


def _gather(tree: AxisTree, perm: Permutation, ctx: Mapping[str, tuple[str, ...]],
            sizes: Mapping[str, int], digits: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    """Old index for each new position, for ``rows`` context rows: shape (rows, size)."""
    kind = tree[0]
    if kind == "id":
        return torch.arange(tree[1]).expand(rows, tree[1])
    if kind == "g":
        p = perm[tree[1]].cpu()
        cs = ctx.get(tree[1], ())
        if cs:
            return p[tuple(digits[c] for c in cs)]
        return p.expand(rows, p.shape[-1])
    if kind == "cat":
        out, off = [], 0
        for sub in tree[1]:
            out.append(_gather(sub, perm, ctx, sizes, digits, rows) + off)
            off += tree_size(sub, sizes)
        return torch.cat(out, dim=1)
    idx = torch.zeros(rows, 1, dtype=torch.long)
    local: dict[str, torch.Tensor] = {}
    k = 1
    for sub in tree[1]:
        n = tree_size(sub, sizes)
        d2 = {name: v.repeat_interleave(k) for name, v in digits.items()}
        d2.update({name: v.reshape(rows * k) for name, v in local.items()})
        old = _gather(sub, perm, ctx, sizes, d2, rows * k).reshape(rows, k, n)
        idx = (idx[:, :, None] * n + old).reshape(rows, k * n)
        local = {name: v.repeat_interleave(n, dim=1) for name, v in local.items()}
        if sub[0] == "g":
            local[sub[1]] = old.reshape(rows, k * n)
        k *= n
    return idx


def apply_permutation(spec: "PermSpec", perm: Permutation, state_dict: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """A new state dict with every parameter axis permuted; the input is not touched.

    Entries the spec does not know (buffers, extra heads) are passed through as they are.
    Works for any dtype and device.
    """
    check_permutation(spec, perm)
    cache: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        trees = spec.axes_of(name)
        if trees is None:
            out[name] = tensor
            continue
        if tuple(tensor.shape) != spec.shapes[spec.canonical(name)]:
            raise InputError(f"'{name}' has shape {tuple(tensor.shape)} but the spec expects "
                             f"{spec.shapes[spec.canonical(name)]}: is this the same architecture?")
        x = tensor
        for dim, tree in enumerate(trees):
            if not tree_groups(tree):
                continue
            key = repr(tree)
            if key not in cache:
                cache[key] = axis_index(tree, perm, spec.ctx, spec.sizes)
            x = x.index_select(dim, cache[key].to(x.device))
        out[name] = x
    return out


def digit_map(tree: AxisTree, sizes: Mapping[str, int]) -> tuple[int, dict[str, torch.Tensor]]:
    """For every position of an axis, the digit of each group there (-1 where absent)."""
    kind = tree[0]
    if kind == "id":
        return tree[1], {}
    if kind == "g":
        n = sizes[tree[1]]
        return n, {tree[1]: torch.arange(n)}
    subs = [digit_map(t, sizes) for t in tree[1]]
    names = list(dict.fromkeys(g for _, d in subs for g in d))
    if kind == "cat":
        total = sum(n for n, _ in subs)
        out = {g: torch.cat([d.get(g, torch.full((n,), -1, dtype=torch.long)) for n, d in subs]) for g in names}
        return total, out
    total = math.prod(n for n, _ in subs)
    pos = torch.arange(total)
    out: dict[str, torch.Tensor] = {}
    stride = total
    for n, d in subs:
        stride //= n
        child = (pos // stride) % n
        for g, v in d.items():
            out[g] = v[child]
    return total, out


def permute_tensor(spec: "PermSpec", perm: Permutation, name: str, tensor: torch.Tensor,
                   skip: tuple[int, str] | None = None) -> torch.Tensor:
    """One parameter permuted on every axis; ``skip=(axis, group)`` leaves that group alone on that axis."""
    trees = spec.axes_of(name)
    if trees is None:
        return tensor
    x = tensor
    for dim, tree in enumerate(trees):
        groups = tree_groups(tree)
        if not groups:
            continue
        p = perm
        if skip is not None and skip[0] == dim and skip[1] in groups:
            ident = torch.arange(spec.groups[skip[1]].size).expand(spec.perm_shape(skip[1]))
            p = Permutation({**perm.perms, skip[1]: ident})
        x = x.index_select(dim, axis_index(tree, p, spec.ctx, spec.sizes).to(x.device))
    return x
