"""What every solver shares: where a group's units live, the permutation state, LAP calls,
and the head strategies.

Frames: solvers score B's units (rows) against A's units (columns). For a group with
context (a within-head group, indexed by heads), B's context value ``i`` is matched
inside A's context value ``p_head[i]``; ``PermState`` converts between B's frame (what
solvers compute) and the stored gather convention (indexed by A's old context index).
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from permgraph.backends import LapBackend
from permgraph.errors import InputError
from permgraph.ir import AxisTree, Cat, Fixed, Permutation, Prod
from permgraph.permutation import axis_index, digit_map
from permgraph.spec import PermSpec


@dataclass(frozen=True)
class HeadStrategy:
    """How a solver treats groups that other groups are indexed by (attention heads, experts)."""

    name: str
    description: str
    function_preserving: bool = True


HEAD_STRATEGIES: dict[str, HeadStrategy] = {s.name: s for s in (
    HeadStrategy("spectral", "TransFusion: match heads once by the distance between the singular values of "
                             "their blocks (invariant to within-head and residual permutations), then freeze"),
    HeadStrategy("brute", "score every head pair by the value of its within-head groups solved jointly for "
                          "that pair; after a warm start that aligns the other groups from the parameters "
                          "outside attention; re-run after every sweep"),
    HeadStrategy("natural", "keep the head order; solve only within-head groups"),
    HeadStrategy("lap", "heads are one more coordinate of the descent"),
    HeadStrategy("flat", "heads and within-head units merged into flat units: the head-contaminating "
                         "baseline (ablation)", function_preserving=False),
)}


def check_heads(heads: str, allowed: tuple[str, ...] = tuple(HEAD_STRATEGIES)) -> str:
    if heads not in allowed:
        raise InputError(f"heads must be one of {list(allowed)}, not '{heads}'")
    return heads


@dataclass
class Site:
    """Where one group's units live on one parameter (or activation) axis."""

    param: str
    axis: int
    units: torch.Tensor  # (n_ctx, n_g, m): positions along the axis, ordered by context and unit
    ctx_digits: dict[str, torch.Tensor]  # the digit of each group at every position


def unit_index(spec: PermSpec, g: str, tree: AxisTree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Positions of group g's units along an axis with this tree: (n_ctx, n_g, m), and the digit map."""
    group = spec.groups[g]
    sizes = spec.sizes
    n, digits = digit_map(tree, sizes)
    gd = digits[g]
    pos = (gd >= 0).nonzero().flatten()
    cflat = torch.zeros(len(pos), dtype=torch.long)
    for c in group.ctx:
        cflat = cflat * sizes[c] + digits[c][pos]
    key = (cflat * group.size + gd[pos]) * n + pos
    order = pos[key.argsort()]
    return order.reshape(math.prod(spec.perm_shape(g)[:-1]), group.size, -1), digits


def sites(spec: PermSpec, g: str) -> list[Site]:
    """Every parameter axis that group g moves."""
    out = []
    for p, trees in spec.axes.items():
        for axis, tree in enumerate(trees):
            if g in tree.groups():
                units, digits = unit_index(spec, g, tree)
                out.append(Site(p, axis, units, digits))
    return out


def units(x: torch.Tensor, site: Site) -> torch.Tensor:
    """(n_ctx, n_g, m * rest): the tensor's entries grouped by unit."""
    moved = x.movedim(site.axis, 0)
    n_ctx, n_g, m = site.units.shape
    return moved[site.units.flatten().to(x.device)].reshape(n_ctx, n_g, -1)


def block_svals(x: torch.Tensor, site: Site) -> torch.Tensor:
    """Singular values of each unit's block (unit = head): (n_heads, k), descending.

    Computed as the square roots of the eigenvalues of each block's smaller Gram matrix, in
    float64, in one batched call: about 25x faster than ``svdvals`` on CPU for 64 x 768
    blocks, and within 1e-15 of it relative to the largest singular value (a singular value
    far below ``1e-8`` of the largest comes out as about ``1e-8`` of it)."""
    n_ctx, n_g, m = site.units.shape
    blocks = x.movedim(site.axis, 0)[site.units[0].flatten().to(x.device)].reshape(n_g, m, -1).double()
    gram = blocks @ blocks.mT if blocks.shape[1] <= blocks.shape[2] else blocks.mT @ blocks
    svals = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
    return svals.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class PermState:
    """The permutation being solved (from the identity), with its conversions to and from B's frame.

    ``sites``: every group's parameter sites (``sites(spec, g)``), computed once and shared.
    ``workers``: CPU threads for assignments submitted with ``submit`` (used when the backend
    releases the GIL); ``timings``: ``cost`` (score matrices), ``lap`` (time spent in or
    waiting for assignments), ``lap_cpu`` (the assignments' own time, summed over threads).
    """

    spec: PermSpec
    backend: LapBackend
    sites: dict[str, list[Site]] = field(default_factory=dict)
    workers: int = 1
    perm: Permutation = field(init=False)
    timings: dict[str, float] = field(default_factory=lambda: {"cost": 0.0, "lap": 0.0, "lap_cpu": 0.0})

    def __post_init__(self) -> None:
        self.perm = self.spec.identity()
        for g in self.spec.groups:
            if g not in self.sites:
                self.sites[g] = sites(self.spec, g)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def old_ctx_index(self, g: str) -> torch.Tensor:
        """For each context value in B's frame, the flat context index in A's (old) frame."""
        group = self.spec.groups[g]
        if not group.ctx:
            return torch.zeros(1, dtype=torch.long)
        site = self.sites[g][0]
        tree = self.spec.axes[site.param][site.axis]
        gather = axis_index(tree, Permutation({**self.perm.perms, g: self.spec.identity()[g]}),
                            self.spec.ctx, self.spec.sizes)
        first = site.units[:, 0, 0]
        old = torch.zeros(len(first), dtype=torch.long)
        for c in group.ctx:
            old = old * self.spec.groups[c].size + site.ctx_digits[c][gather[first]]
        return old

    def current(self, g: str) -> torch.Tensor:
        """Group g's permutation in B's frame: (n_ctx, n_g)."""
        return self.perm[g].reshape(-1, self.spec.groups[g].size)[self.old_ctx_index(g)]

    def set(self, g: str, q: torch.Tensor) -> None:
        """Store ``q`` (B's frame, (n_ctx, n_g)) as group g's permutation."""
        flat = self.perm[g].reshape(-1, self.spec.groups[g].size).clone()
        flat[self.old_ctx_index(g)] = q.cpu()
        self.perm.perms[g] = flat.reshape(self.spec.perm_shape(g))

    def snapshot(self, groups) -> dict[str, torch.Tensor]:
        """The current permutations of ``groups`` (compare later with ``unchanged``)."""
        return {g: self.perm[g].clone() for g in groups}

    def unchanged(self, snap: dict[str, torch.Tensor] | None) -> bool:
        return snap is not None and all(torch.equal(self.perm[g], p) for g, p in snap.items())

    def solve(self, scores: torch.Tensor) -> torch.Tensor:
        """Maximizing assignments of a batch of score matrices (batch, n, n) -> (batch, n)."""
        t0 = time.perf_counter()
        q = self._solve(scores)
        self.timings["lap"] += time.perf_counter() - t0
        return q

    def _solve(self, scores: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        q = self.backend.solve_batch(scores).cpu()
        with self._lock:
            self.timings["lap_cpu"] += time.perf_counter() - t0
        return q

    @property
    def parallel(self) -> bool:
        return self.workers > 1 and self.backend.releases_gil

    def submit(self, scores: torch.Tensor) -> Future:
        """``solve`` on a worker thread when ``parallel`` (the caller takes ``result()`` through
        ``wait``), else at once."""
        if not self.parallel:
            done: Future = Future()
            done.set_result(self.solve(scores))
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="permgraph-lap")
        return self._pool.submit(self._solve, scores)

    def wait(self, fut: Future) -> torch.Tensor:
        t0 = time.perf_counter()
        q = fut.result()
        self.timings["lap"] += time.perf_counter() - t0
        return q

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


HEAD_DISTANCES = {
    "paper": "TransFusion Eq. 7-8: sum over the Q, K and V projections of ||S(W_i) - S(W_j)|| "
             "(fused projections split into their q/k/v segments, biases out)",
    "official": "the paper's official code: the Q, K and V terms plus one for the output projection's columns",
    "sites": "one term per parameter axis the head group lives on (a fused q|k|v block as one; biases in)",
}


def spectral_heads(state: PermState, h: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                   distance: str = "paper") -> None:
    """Heads matched by ``D_ij = sum over blocks ||S(B_i) - S(A_j)||`` with ``S`` the singular values
    of a head's block; the blocks are chosen by ``distance`` (``HEAD_DISTANCES``)."""
    blocks = state.sites[h] if distance == "sites" else [
        s for kind, s in head_blocks(state.spec, h) if kind == "in" or distance == "official"]
    dist = None
    for site in blocks:
        if site.units.shape[0] != 1:
            return
        d = torch.cdist(block_svals(b[site.param], site), block_svals(a[site.param], site))
        dist = d if dist is None else dist + d
    if dist is not None:
        state.set(h, state.solve(-dist[None]))


def head_blocks(spec: PermSpec, h: str) -> list[tuple[str, Site]]:
    """The projection blocks of head group h in weight matrices: ``("in", site)`` for Q, K and V
    (a fused q|k|v axis gives one block per segment), ``("out", site)`` for the output projection.

    Q, K and V share their orientation (the head axis is their output axis); the output
    projection reads heads on its other axis, so its blocks are those on the axis index
    that holds the fewer blocks. Biases (1-D) are left out.
    """
    blocks = []
    for p, trees in spec.axes.items():
        if len(spec.view_shape(p)) < 2:
            continue
        for axis, tree in enumerate(trees):
            for offset, seg in _segments(tree, spec.sizes):
                if h in seg.groups():
                    units_, digits = unit_index(spec, h, seg)
                    blocks.append(Site(p, axis, units_ + offset, digits))
    counts = Counter(s.axis for s in blocks)
    if len(counts) < 2:
        return [("in", s) for s in blocks]
    major = counts.most_common(1)[0][0]
    return [("in" if s.axis == major else "out", s) for s in blocks]


def _segments(tree: AxisTree, sizes) -> list[tuple[int, AxisTree]]:
    """Consecutive projections on one axis with their offsets: a ``Cat``'s parts, or the slices of
    a leading fixed factor (``nn.MultiheadAttention``'s packed ``Prod(Fixed(3), heads, d)``)."""
    if isinstance(tree, Cat):
        out, off = [], 0
        for part in tree.parts:
            out.append((off, part))
            off += part.size(sizes)
        return out
    if isinstance(tree, Prod) and isinstance(tree.parts[0], Fixed) and len(tree.parts) > 1:
        rest = Prod(tree.parts[1:]) if len(tree.parts) > 2 else tree.parts[1]
        n = rest.size(sizes)
        return [(k * n, rest) for k in range(tree.parts[0].n)]
    return [(0, tree)]


def brute_heads(state: PermState, h: str, pair_scores) -> None:
    """Every head pair (i of B, j of A) scored by the summed value of its within-head assignments;
    ``pair_scores(g)`` gives child group g's scores per pair: (n, n, n_g, n_g)."""
    children = [g for g, grp in state.spec.groups.items() if grp.ctx == (h,)]
    n = state.spec.groups[h].size
    score = torch.zeros(n, n, dtype=torch.float64)
    best: dict[str, torch.Tensor] = {}
    for g in children:
        pair = pair_scores(g)
        flat = pair.reshape(n * n, *pair.shape[2:])
        q = state.solve(flat.float())
        score += flat.gather(2, q[..., None].to(flat.device)).sum((1, 2)).reshape(n, n).double().cpu()
        best[g] = q.reshape(n, n, -1)
    ph = state.solve(score[None].float())[0]
    state.set(h, ph[None])
    for g in children:  # the within-head assignment of each matched pair
        state.set(g, best[g][torch.arange(n), ph])
