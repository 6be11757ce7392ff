"""Applying permutations (``permgraph.ir.Permutation``) to parameter tensors.

Convention (gather): a group's permutation ``p`` moves old index ``p[i]`` to new
index ``i``, so ``x_new = x.index_select(axis, idx)`` with ``idx`` the axis's gather
index. A group with context groups ``(c1, c2, ...)`` holds one permutation per context
value, selected by the *old* context indices: on an axis ``Prod((G(h), G(w)))`` the new
position ``(i, j)`` holds old ``(ph[i], pw[ph[i], j])``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from permgraph.errors import FormatError, InputError
from permgraph.ir import AxisTree, Cat, Fixed, G, Permutation, Prod
from permgraph.spec import PermSpec


def check_permutation(spec: PermSpec, perm: Permutation) -> None:
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


def axis_index(tree: AxisTree, perm: Permutation, ctx: Mapping[str, tuple[str, ...]],
               sizes: Mapping[str, int]) -> torch.Tensor:
    """The gather index (new position -> old position) of one parameter axis."""
    return _gather(tree, perm, ctx, sizes, {}, 1)[0]


def _gather(tree: AxisTree, perm: Permutation, ctx: Mapping[str, tuple[str, ...]],
            sizes: Mapping[str, int], digits: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    """Old index for each new position, for ``rows`` context rows: shape (rows, size).

    ``digits[c]``: the old index of context group ``c`` in each row.
    """
    match tree:
        case Fixed(n):
            return torch.arange(n).expand(rows, n)
        case G(name):
            p = perm[name].cpu()
            cs = ctx.get(name, ())
            return p[tuple(digits[c] for c in cs)] if cs else p.expand(rows, p.shape[-1])
        case Cat(parts):
            out, off = [], 0
            for sub in parts:
                out.append(_gather(sub, perm, ctx, sizes, digits, rows) + off)
                off += sub.size(sizes)
            return torch.cat(out, dim=1)
        case Prod(parts):
            return _gather_prod(parts, perm, ctx, sizes, digits, rows)
    raise TypeError(f"not an axis tree: {tree!r}")


def _gather_prod(parts, perm, ctx, sizes, digits, rows) -> torch.Tensor:
    """Mixed radix: each factor is gathered per combination of the (old) outer digits."""
    idx = torch.zeros(rows, 1, dtype=torch.long)
    local: dict[str, torch.Tensor] = {}
    k = 1
    for sub in parts:
        n = sub.size(sizes)
        d2 = {name: v.repeat_interleave(k) for name, v in digits.items()}
        d2.update({name: v.reshape(rows * k) for name, v in local.items()})
        old = _gather(sub, perm, ctx, sizes, d2, rows * k).reshape(rows, k, n)
        idx = (idx[:, :, None] * n + old).reshape(rows, k * n)
        local = {name: v.repeat_interleave(n, dim=1) for name, v in local.items()}
        if isinstance(sub, G):
            local[sub.name] = old.reshape(rows, k * n)
        k *= n
    return idx


def digit_map(tree: AxisTree, sizes: Mapping[str, int]) -> tuple[int, dict[str, torch.Tensor]]:
    """The axis size and, for every position, the digit of each group there (-1 where absent)."""
    match tree:
        case Fixed(n):
            return n, {}
        case G(name):
            return sizes[name], {name: torch.arange(sizes[name])}
        case Cat(parts):
            subs = [digit_map(t, sizes) for t in parts]
            names = list(dict.fromkeys(g for _, d in subs for g in d))
            total = sum(n for n, _ in subs)
            return total, {g: torch.cat([d.get(g, torch.full((n,), -1, dtype=torch.long)) for n, d in subs])
                           for g in names}
        case Prod(parts):
            subs = [digit_map(t, sizes) for t in parts]
            total = tree.size(sizes)
            pos = torch.arange(total)
            out: dict[str, torch.Tensor] = {}
            stride = total
            for n, d in subs:
                stride //= n
                child = (pos // stride) % n
                for g, v in d.items():
                    out[g] = v[child]
            return total, out
    raise TypeError(f"not an axis tree: {tree!r}")


def apply_permutation(spec: PermSpec, perm: Permutation, state_dict: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """A new state dict with every parameter axis permuted; the input is not touched.

    Entries the spec does not know (buffers, extra heads) are passed through as they are.
    Works for any dtype and device.
    """
    check_permutation(spec, perm)
    cache: dict[AxisTree, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        trees = spec.axes_of(name)
        if trees is None:
            out[name] = tensor
            continue
        viewed = _check_shape(spec, name, tensor)
        x = spec.to_view(name, tensor)
        for dim, tree in enumerate(trees):
            if not tree.groups():
                continue
            if tree not in cache:
                cache[tree] = axis_index(tree, perm, spec.ctx, spec.sizes)
            x = x.index_select(dim, cache[tree].to(x.device))
        out[name] = x if viewed else spec.from_view(name, x)
    return out


def _check_shape(spec: PermSpec, name: str, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is in the view shape of a parameter with a layout (else in its own shape);
    ``InputError`` for any other shape."""
    p = spec.canonical(name)
    if tuple(tensor.shape) == spec.shapes[p]:
        return False
    if p in spec.layouts and tuple(tensor.shape) == spec.view_shape(p):
        return True
    raise InputError(f"'{name}' has shape {tuple(tensor.shape)} but the spec expects "
                     f"{spec.shapes[p]}: is this the same architecture?")


def axis_indices(spec: PermSpec, perm: Permutation, name: str,
                 skip: tuple[int, str] | None = None) -> list[torch.Tensor | None]:
    """Per axis of one parameter (of its view, where it has a layout), its gather index (new -> old)
    or None where nothing moves;
    ``skip=(axis, group)`` leaves that group alone on that axis."""
    trees = spec.axes_of(name)
    if trees is None:
        return []
    out: list[torch.Tensor | None] = []
    for dim, tree in enumerate(trees):
        groups = tree.groups()
        if not groups:
            out.append(None)
            continue
        p = perm
        if skip is not None and skip[0] == dim and skip[1] in groups:
            ident = torch.arange(spec.groups[skip[1]].size).expand(spec.perm_shape(skip[1]))
            p = Permutation({**perm.perms, skip[1]: ident})
        out.append(axis_index(tree, p, spec.ctx, spec.sizes))
    return out


def permute_tensor(spec: PermSpec, perm: Permutation, name: str, tensor: torch.Tensor,
                   skip: tuple[int, str] | None = None) -> torch.Tensor:
    """One parameter permuted on every axis (of its view, where it has a layout: the tensor may come
    in either shape and is returned in the one it came in); ``skip=(axis, group)`` leaves that
    group alone on that axis."""
    viewed = _check_shape(spec, name, tensor)
    out = gather_axes(spec.to_view(name, tensor), axis_indices(spec, perm, name, skip))
    return out if viewed else spec.from_view(name, out)


def gather_axes(x: torch.Tensor, index: list[torch.Tensor | None]) -> torch.Tensor:
    """``x`` gathered along each axis by its index (``axis_indices``); None leaves an axis as it is."""
    for dim, idx in enumerate(index):
        if idx is not None:
            x = x.index_select(dim, idx.to(x.device))
    return x


def compose(spec: PermSpec, first: Permutation, second: Permutation) -> Permutation:
    """The permutation that applies ``first``, then ``second``:
    ``apply(compose(f, s), x) == apply(s, apply(f, x))``. Per axis the gather indices compose
    as ``idx_f[idx_s]``; each group's permutation is read back from an axis that holds it
    (with its context groups, whose old digits select the row)."""
    out: dict[str, torch.Tensor] = {}
    for trees in spec.axes.values():
        for tree in trees:
            todo = [g for g in dict.fromkeys(tree.groups()) if g not in out]
            if not todo:
                continue
            both = axis_index(tree, first, spec.ctx, spec.sizes)[axis_index(tree, second, spec.ctx, spec.sizes)]
            _, digits = digit_map(tree, spec.sizes)
            for g in todo:
                new = digits[g]
                at = new >= 0
                old = both[at]
                perm = torch.empty(spec.perm_shape(g), dtype=torch.long)
                row = tuple(digits[c][old] for c in spec.groups[g].ctx)
                perm[row + (new[at],)] = digits[g][old]
                out[g] = perm
    for g in spec.groups:  # on no axis: moves nothing
        out.setdefault(g, second[g].clone())
    return Permutation(out)
