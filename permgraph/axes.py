"""The axis algebra: union-find over axis variables with product/concat structure.

Every dimension of every tensor in a traced graph is an *atom*. Op rules unify
atoms (the two axes must be permuted identically), fix them (the axis may not be
permuted), or refine them:

- ``prod``: an axis of size ``a*b`` seen as ``(a, b)`` (heads x within-head);
  its permutation moves whole ``b``-blocks, and each block may carry its own
  inner permutation (decided later by co-occurrence, see ``permgraph.infer``).
- ``cat``: an axis made of consecutive segments (fused q/k/v projections);
  its permutation is block-diagonal, one permutation per segment.

A refinement is global: it lives on the union-find root, so every place the
variable occurs is refined the same way. Unifying two refined atoms reconciles
their structures (common refinement); where no common refinement exists the
axis is fixed with a reason, never guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class Reason:
    """Why an axis is fixed: a message and the graph node where it arose."""

    message: str
    node: str = ""

    def __str__(self) -> str:
        return f"{self.message} (at {self.node})" if self.node else self.message


@dataclass
class _Atom:
    size: int
    parent: int
    kind: str | None = None  # None, "prod" or "cat"
    children: list[int] = field(default_factory=list)
    fixed: list[Reason] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    copies: bool = False  # counts identical copies of a tensor (``repeat``'s outer factor)


class AxisStore:
    """Union-find of axis atoms with structured refinements."""

    def __init__(self) -> None:
        self._atoms: list[_Atom] = []

    # -- basics ---------------------------------------------------------------
    def new(self, size: int, fixed: Reason | None = None, *, copies: bool = False) -> int:
        """A fresh atom; ``copies``: it counts identical copies (``is_copies``)."""
        a = len(self._atoms)
        self._atoms.append(_Atom(size=int(size), parent=a, copies=copies))
        if fixed is not None:
            self._atoms[a].fixed.append(fixed)
        return a

    def find(self, a: int) -> int:
        atoms = self._atoms
        root = a
        while atoms[root].parent != root:
            root = atoms[root].parent
        while atoms[a].parent != root:
            atoms[a].parent, a = root, atoms[a].parent
        return root

    def size(self, a: int) -> int:
        return self._atoms[a].size

    def kind(self, a: int) -> str | None:
        return self._atoms[self.find(a)].kind

    def __len__(self) -> int:
        """Number of atoms ever made (ids are ``range(len(store))``)."""
        return len(self._atoms)

    def children(self, a: int) -> list[int]:
        return [self.find(c) for c in self._atoms[self.find(a)].children]

    def reasons(self, a: int) -> list[Reason]:
        return self._atoms[self.find(a)].fixed

    def is_copies(self, a: int) -> bool:
        """Whether ``a`` (or an atom unified with it) counts identical copies of a tensor."""
        return self._atoms[self.find(a)].copies

    def roles(self, a: int) -> list[str]:
        return self._atoms[self.find(a)].roles

    def fix(self, a: int, reason: Reason) -> None:
        atom = self._atoms[self.find(a)]
        if len(atom.fixed) < 8 and reason not in atom.fixed:
            atom.fixed.append(reason)
        elif not atom.fixed:
            atom.fixed.append(reason)

    def add_role(self, a: int, role: str) -> None:
        atom = self._atoms[self.find(a)]
        if role not in atom.roles:
            atom.roles.append(role)

    def make(self, kind: str, children: list[int]) -> int:
        """A fresh atom whose structure is ``kind`` over ``children``."""
        children = [c for c in children if self.size(c) != 1 or kind == "cat"]
        children = [c for c in children if self.size(c) != 0]
        if len(children) == 1:
            return children[0]
        total = math.prod(self.size(c) for c in children) if kind == "prod" else sum(self.size(c) for c in children)
        a = self.new(total)
        self._atoms[a].kind = kind
        self._atoms[a].children = list(children)
        return a

    # -- flattening --------------------------------------------------------------
    def flat(self, a: int, kind: str) -> list[int]:
        """Roots of ``a``'s ``kind``-structure, nested same-kind structure expanded."""
        r = self.find(a)
        atom = self._atoms[r]
        if atom.kind != kind:
            return [r]
        out: list[int] = []
        for c in atom.children:
            out.extend(self.flat(c, kind))
        return out

    def leaves(self, a: int) -> Iterator[int]:
        """All leaf roots below ``a`` (``a`` itself when unstructured)."""
        r = self.find(a)
        atom = self._atoms[r]
        if atom.kind is None:
            yield r
        else:
            for c in atom.children:
                yield from self.leaves(c)

    # -- refinement -----------------------------------------------------------
    def split(self, a: int, kind: str, sizes: list[int], where: str) -> list[int]:
        """Refine ``a`` as ``kind`` over parts of ``sizes``; return the parts' atoms.

        Size-1 parts of a product carry no permutation and get fresh unit atoms.
        """
        parts = [self.new(s) for s in sizes]
        real = [p for p, s in zip(parts, sizes) if (s != 1 or kind == "cat") and s != 0]
        if not real:
            return parts
        if len(real) == 1:
            self.unify(a, real[0], where)
        else:
            self.unify(a, self.make(kind, real), where)
        return [self.find(p) for p in parts]

    def unify(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        A, B = self._atoms[ra], self._atoms[rb]
        if A.size != B.size:
            raise ValueError(f"internal: unify sizes {A.size} != {B.size} at {where}")
        B.parent = ra
        A.copies = A.copies or B.copies
        for r in B.fixed:
            self.fix(ra, r)
        for role in B.roles:
            self.add_role(ra, role)
        if B.kind is None:
            return
        if A.kind is None:
            A.kind, A.children = B.kind, B.children
            return
        self._reconcile(ra, B.kind, B.children, where)

    def _reconcile(self, r: int, kind_b: str, children_b: list[int], where: str) -> None:
        A = self._atoms[r]
        if A.kind == kind_b:
            fa = [x for c in A.children for x in self.flat(c, kind_b)]
            fb = [x for c in children_b for x in self.flat(c, kind_b)]
            sa, sb = [self.size(x) for x in fa], [self.size(x) for x in fb]
            pieces = _common_prod(sa, sb) if kind_b == "prod" else _common_cat(sa, sb)
            if pieces is not None:
                la = self._refine_list(fa, pieces[0], kind_b, where)
                lb = self._refine_list(fb, pieces[1], kind_b, where)
                for x, y in zip(la, lb):
                    self.unify(x, y, where)
                return
            if kind_b == "prod" and self._common_inner_block(fa, fb, where):
                return
        elif self._prod_over_equal_segments(r, kind_b, children_b, where):
            return
        self.fix(r, Reason("conflicting reshape/split structure", where))
        for c in children_b:
            self.fix(c, Reason("conflicting reshape/split structure", where))

    def _common_inner_block(self, fa: list[int], fb: list[int], where: str) -> bool:
        """Two products with no common refinement that still agree below some block size ``m``
        (``(5, 6)`` against ``(3, 10)``: pairs, ``m = 2``). The flat index is ``q * m + r``; moving
        ``r`` alike in every block is a permutation of both factorizations, so the pieces below ``m``
        unify and the pieces above it are fixed. False when ``m`` is 1 (the caller fixes all)."""
        sa, sb = [self.size(x) for x in fa], [self.size(x) for x in fb]
        m, chain = _inner_block(sa, sb)
        if m == 1:
            return False
        la = self._refine_list(fa, _prod_pieces(sa, chain), "prod", where)
        lb = self._refine_list(fb, _prod_pieces(sb, chain), "prod", where)
        n = len(chain) - 1  # pieces below m on either side (innermost last)
        for x, y in zip(la[-n:], lb[-n:]):
            self.unify(x, y, where)
        for x in la[:-n] + lb[:-n]:
            self.fix(x, Reason("conflicting reshape/split structure", where))
        return True

    def _prod_over_equal_segments(self, r: int, kind_b: str, children_b: list[int], where: str) -> bool:
        """``(k, rest)`` reshape of an axis made of k equal segments (or the reverse).

        The leading factor indexes the segments, so it is fixed, and the segments
        must share one permutation (that of ``rest``): sound, slightly less free.
        """
        A = self._atoms[r]
        prod, cat = (A.children, children_b) if A.kind == "prod" else (children_b, A.children)
        cat = [x for c in cat for x in self.flat(c, "cat")]
        prod = [x for c in prod for x in self.flat(c, "prod")]
        k = len(cat)
        if self.size(prod[0]) != k or len({self.size(s) for s in cat}) != 1:
            return False
        self.fix(prod[0], Reason("indexes fused segments (select/unbind)", where))
        rest = self.make("prod", prod[1:])
        for s in cat:
            self.unify(rest, s, where)
        A.kind, A.children = "cat", cat
        return True

    def _refine_list(self, atoms: list[int], pieces: list[list[int]], kind: str, where: str) -> list[int]:
        out: list[int] = []
        for x, ps in zip(atoms, pieces):
            if len(ps) == 1:
                out.append(self.find(x))
            else:
                out.extend(p for p, s in zip(self.split(x, kind, ps, where), ps))
        return [self.find(o) for o in out]


def _common_prod(sa: list[int], sb: list[int]) -> tuple[list[list[int]], list[list[int]]] | None:
    """Common refinement of two mixed-radix factorizations (outer to inner): both cut at every
    stride of either, when those strides form one divisibility chain."""
    st = sorted(set(_strides(sa)) | set(_strides(sb)))
    if any(st[i + 1] % st[i] for i in range(len(st) - 1)):
        return None
    return _prod_pieces(sa, st), _prod_pieces(sb, st)


def _strides(s: list[int]) -> list[int]:
    """Strides of a mixed-radix factorization (outer to inner sizes): 1, the innermost size, ..., the total."""
    out, acc = [1], 1
    for x in reversed(s):
        acc *= x
        out.append(acc)
    return out


def _prod_pieces(s: list[int], points: list[int]) -> list[list[int]]:
    """Each factor of ``s`` cut at the ``points`` (strides) strictly inside it, outer to inner."""
    out, hi = [], math.prod(s)
    for x in s:
        lo = hi // x
        inner = [lo] + [v for v in points if lo < v < hi] + [hi]
        out.append([inner[i + 1] // inner[i] for i in reversed(range(len(inner) - 1))])
        hi = lo
    return out


def _inner_block(sa: list[int], sb: list[int]) -> tuple[int, list[int]]:
    """The largest block size ``m`` below which two factorizations of one axis agree: the strides
    of both that are at most ``m`` form a divisibility chain ending at ``m``, and ``m`` divides
    every larger stride of either (so each factor is a whole number of blocks or lies within one).
    Returns ``m`` and the chain ``1, ..., m``."""
    st = sorted(set(_strides(sa)) | set(_strides(sb)))
    best: tuple[int, list[int]] = (1, [1])
    for i in range(len(st)):
        m = math.gcd(*st[i:])
        chain = sorted({s for s in st if s <= m} | {m})
        if (m > best[0] and all(chain[k + 1] % chain[k] == 0 for k in range(len(chain) - 1))
                and all(s % m == 0 for s in st if s > m)):
            best = (m, chain)
    return best


def _common_cat(sa: list[int], sb: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Common refinement of two segmentations (left to right)."""
    def bounds(s: list[int]) -> list[int]:
        out, acc = [0], 0
        for x in s:
            acc += x
            out.append(acc)
        return out

    bd = sorted(set(bounds(sa)) | set(bounds(sb)))

    def pieces(s: list[int]) -> list[list[int]]:
        out, lo = [], 0
        for x in s:
            inner = [v for v in bd if lo <= v <= lo + x]
            out.append([inner[i + 1] - inner[i] for i in range(len(inner) - 1)] or [0])
            lo += x
        return out

    return pieces(sa), pieces(sb)
