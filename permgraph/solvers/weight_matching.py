"""Git Re-Basin weight matching over a spec, with head strategies (TransFusion and ablations).

For group g, the score between B's unit i and A's unit j is
``sum over members <B_p[.., i, ..], A'_p[.., j, ..]>`` where ``A'`` is A with every
other group already permuted; a linear assignment per context value (per head,
for within-head groups) maximizes it. Groups are visited in random order until a
full sweep improves nothing.

Head strategies, for groups that other groups are indexed by (attention heads):
- ``spectral``: TransFusion. Heads are matched once by the distance between the
  singular values of their blocks (invariant to every within-head and residual
  permutation), then frozen; within-head groups are solved per matched pair.
- ``brute``: every head pair scored by its within-head assignments' value.
- ``natural``: heads keep their order; only within-head groups are solved.
- ``lap``: heads are one more coordinate in the descent.
- ``flat``: heads and within-head dims merged into flat units: the
  head-contaminating baseline. NOT function-preserving.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from permgraph.errors import InputError
from permgraph.backends import LapBackend, get_backend
from permgraph.permutation import Permutation, axis_index, digit_map, permute_tensor, tree_groups
from permgraph.solvers.base import Alignment, register_solver
from permgraph.spec import PermSpec

HEAD_STRATEGIES = ("spectral", "brute", "natural", "lap", "flat")


@dataclass
class _Site:
    """Where one group's units live in one parameter axis."""

    param: str
    axis: int
    units: torch.Tensor     # (n_ctx, n_g, m): positions along the axis, B frame
    ctx_digits: dict[str, torch.Tensor]  # digits of each context group at every position


def unit_index(spec: PermSpec, g: str, tree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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


def _sites(spec: PermSpec, g: str) -> list[_Site]:
    out = []
    for p, trees in spec.axes.items():
        for axis, tree in enumerate(trees):
            if g in tree_groups(tree):
                units, digits = unit_index(spec, g, tree)
                out.append(_Site(p, axis, units, digits))
    return out


class WeightMatcher:
    """Coordinate descent state for one pair of models over one spec."""

    def __init__(self, spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                 backend: LapBackend, dtype: torch.dtype) -> None:
        self.spec, self.backend, self.dtype = spec, backend, dtype
        names = [p for p in spec.axes if any(tree_groups(t) for t in spec.axes[p])]
        self.a = {p: params_a[p].detach().to(dtype) for p in names}
        self.b = {p: params_b[p].detach().to(dtype) for p in names}
        self.sites = {g: _sites(spec, g) for g in spec.groups}
        self.perm = spec.identity()
        self.timings = {"cost": 0.0, "lap": 0.0}

    # -- objective and costs -----------------------------------------------------------
    def objective(self) -> float:
        return float(sum((self.b[p] * permute_tensor(self.spec, self.perm, p, self.a[p])).sum() for p in self.a))

    def cost(self, g: str, skip_groups: tuple[str, ...] = ()) -> torch.Tensor:
        """Score tensor (n_ctx, n_g, n_g) for group g with all other groups at their current value."""
        t0 = time.perf_counter()
        perm = self.perm
        if skip_groups:
            perm = Permutation({**perm.perms, **{s: self.spec.identity()[s] for s in skip_groups}})
        total = None
        for site in self.sites[g]:
            a_perm = permute_tensor(self.spec, perm, site.param, self.a[site.param], skip=(site.axis, g))
            b_units = _units(self.b[site.param], site)
            a_units = _units(a_perm, site)
            c = b_units @ a_units.transpose(1, 2)
            total = c if total is None else total + c
        self.timings["cost"] += time.perf_counter() - t0
        return total

    def old_ctx_index(self, g: str) -> torch.Tensor:
        """For each context value in B's frame, the flat context index in A's (old) frame."""
        group = self.spec.groups[g]
        if not group.ctx:
            return torch.zeros(1, dtype=torch.long)
        site = self.sites[g][0]
        tree = self.spec.axes[site.param][site.axis]
        ident = self.spec.identity()[g]
        gather = axis_index(tree, Permutation({**self.perm.perms, g: ident}), self.spec.ctx, self.spec.sizes)
        first = site.units[:, 0, 0]
        old = torch.zeros(len(first), dtype=torch.long)
        for c in group.ctx:
            old = old * self.spec.groups[c].size + site.ctx_digits[c][gather[first]]
        return old

    def current(self, g: str) -> torch.Tensor:
        """Group g's permutation in B's frame: (n_ctx, n_g)."""
        p = self.perm[g].reshape(-1, self.spec.groups[g].size)
        return p[self.old_ctx_index(g)]

    def set(self, g: str, q: torch.Tensor) -> None:
        """Store ``q`` (B frame, (n_ctx, n_g)) as group g's permutation (A frame)."""
        flat = self.perm[g].reshape(-1, self.spec.groups[g].size).clone()
        flat[self.old_ctx_index(g)] = q.cpu()
        self.perm.perms[g] = flat.reshape(self.spec.perm_shape(g))

    def solve(self, scores: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        q = self.backend.solve_batch(scores).cpu()
        self.timings["lap"] += time.perf_counter() - t0
        return q

    def step(self, g: str) -> bool:
        """One coordinate: returns whether group g improved."""
        scores = self.cost(g)
        q = self.solve(scores)
        cur = self.current(g)
        new_val = scores.gather(2, q[..., None].to(scores.device)).sum()
        old_val = scores.gather(2, cur[..., None].to(scores.device)).sum()
        if new_val > old_val + 1e-9 * (abs(float(old_val)) + 1.0):
            self.set(g, q)
            return True
        return False

    # -- head strategies -----------------------------------------------------------------
    def spectral_heads(self, h: str) -> None:
        """TransFusion: match heads by the distance between their blocks' singular values."""
        dist = None
        for site in self.sites[h]:
            if site.units.shape[0] != 1:
                return
            sb = _block_svals(self.b[site.param], site)
            sa = _block_svals(self.a[site.param], site)
            d = torch.cdist(sb, sa)
            dist = d if dist is None else dist + d
        if dist is not None:
            self.set(h, self.solve(-dist[None]))

    def brute_step(self, h: str) -> bool:
        """``brute_heads`` as a coordinate step: kept only if the objective improves."""
        before = {g: p.clone() for g, p in self.perm.perms.items()}
        old = self.objective()
        self.brute_heads(h)
        if self.objective() > old + 1e-9 * (abs(old) + 1.0):
            return True
        self.perm.perms.update(before)
        return False

    def brute_heads(self, h: str) -> None:
        """Score every head pair by the summed value of its within-head assignments."""
        children = [g for g, grp in self.spec.groups.items() if grp.ctx == (h,)]
        n = self.spec.groups[h].size
        score = torch.zeros(n, n, dtype=self.dtype)
        best: dict[str, torch.Tensor] = {}
        for g in children:
            units_b, units_a = self._pair_units(g, h)
            pair = torch.einsum("iuf,jvf->ijuv", units_b, units_a)
            q = self.solve(pair.reshape(n * n, *pair.shape[2:]))
            score += pair.reshape(n * n, *pair.shape[2:]).gather(2, q[..., None].to(pair.device)).sum((1, 2)).reshape(n, n).cpu()
            best[g] = q.reshape(n, n, -1)
        ph = self.solve(score[None])[0]
        self.set(h, ph[None])
        for g in children:  # within-head assignment of each matched pair
            self.set(g, best[g][torch.arange(n), ph])

    def _pair_units(self, g: str, h: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Units of within-head group g per head, with heads and g at identity in A."""
        bs, as_ = [], []
        for site in self.sites[g]:
            a_perm = permute_tensor(self.spec, Permutation({**self.perm.perms, h: self.spec.identity()[h]}),
                                    site.param, self.a[site.param], skip=(site.axis, g))
            bs.append(_units(self.b[site.param], site))
            as_.append(_units(a_perm, site))
        return torch.cat(bs, dim=2), torch.cat(as_, dim=2)


def _units(x: torch.Tensor, site: _Site) -> torch.Tensor:
    """(n_ctx, n_g, m * rest): the tensor's entries grouped by unit."""
    moved = x.movedim(site.axis, 0)
    n_ctx, n_g, m = site.units.shape
    return moved[site.units.flatten().to(x.device)].reshape(n_ctx, n_g, -1)


def _block_svals(x: torch.Tensor, site: _Site) -> torch.Tensor:
    """Singular values of each unit's block (unit = head): (n_heads, k)."""
    n_ctx, n_g, m = site.units.shape
    blocks = x.movedim(site.axis, 0)[site.units[0].flatten().to(x.device)].reshape(n_g, m, -1)
    return torch.linalg.svdvals(blocks.double()).to(x.dtype)


def _head_groups(spec: PermSpec) -> list[str]:
    """Groups that other groups are indexed by, outermost first (attention heads)."""
    parents = {c for g in spec.groups.values() for c in g.ctx}
    return [g for g in spec.groups if g in parents and not spec.groups[g].ctx]


@register_solver("weight_matching")
def weight_matching(spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], *,
                    heads: str = "spectral", backend: str | LapBackend = "auto", seed: int = 0, max_iter: int = 100,
                    dtype: torch.dtype = torch.float32, progress: bool = False, solver_name: str = "weight_matching",
                    ) -> Alignment:
    """Align A to B by coordinate descent over the spec's groups (see module docstring)."""
    if heads not in HEAD_STRATEGIES:
        raise InputError(f"heads must be one of {HEAD_STRATEGIES}, not '{heads}'")
    t_start = time.perf_counter()
    work_spec = spec.flattened_heads() if heads == "flat" else spec
    device = next(iter(params_a.values())).device if params_a else None
    wm = WeightMatcher(work_spec, params_a, params_b, get_backend(backend, device), dtype)
    history = [wm.objective()]
    frozen: set[str] = set()
    brute = set()
    for h in _head_groups(work_spec):
        if heads == "spectral":
            wm.spectral_heads(h)
        if heads in ("spectral", "natural"):
            frozen.add(h)
        if heads == "brute":
            brute.add(h)
    gen = torch.Generator().manual_seed(int(seed))
    names = [g for g in work_spec.groups if g not in frozen and g not in brute]
    bar = _progress(progress, max_iter)
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            improved |= wm.step(names[i])
        for h in sorted(brute):  # head pairs are scored given the sweep's other groups
            improved |= wm.brute_step(h)
        history.append(wm.objective())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{history[-1]:.4g}")
        if not improved:
            break
    if bar is not None:
        bar.close()
    timings = {**wm.timings, "total": time.perf_counter() - t_start}
    settings = {"solver": solver_name, "heads": heads, "backend": wm.backend.name, "seed": seed,
                "max_iter": max_iter, "dtype": str(dtype).replace("torch.", "")}
    return Alignment(wm.perm, work_spec, history, timings, settings, function_preserving=heads != "flat")


def shared_within_head(spec: PermSpec) -> PermSpec:
    """The spec with each head's Q/K and V/O within-head groups merged into one (the paper's
    choice), where the spec allows it (both free, same size); otherwise unchanged."""
    merged = spec
    for h in _head_groups(spec):
        kids = [g for g, grp in spec.groups.items() if grp.ctx == (h,) and grp.role in ("qk", "vo")]
        if len(kids) == 2 and spec.groups[kids[0]].size == spec.groups[kids[1]].size:
            merged = merged.merged(kids, kids[0].rsplit(".", 1)[0] + ".qkvo")
    return merged


@register_solver("transfusion")
def transfusion(spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                **options) -> Alignment:
    """The paper's method: spectral head matching, then one within-head permutation per head
    pair shared by Q, K, V and O (``shared_within_head``)."""
    options.setdefault("heads", "spectral")
    return weight_matching(shared_within_head(spec), params_a, params_b, solver_name="transfusion", **options)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweeps", leave=False)
