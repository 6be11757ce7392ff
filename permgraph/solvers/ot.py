"""Optimal-transport baseline after Imfeld et al. (Transformer Fusion with Optimal Transport).

Hard plans (``reg=0``): exact OT between the units of A and B with uniform
marginals (POT's network simplex), inside the same coordinate descent as weight
matching; the plan is a permutation. Soft plans (``reg>0``): after the hard
solution, each flat group (residual stream, MLP hidden layers) gets a Sinkhorn
plan computed against the other groups' hard solution; it is applied as a
transport matrix, so the result is NOT a permutation and not function-preserving.
Head-blocked groups always get hard plans (heads are matched by ``heads``).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from permgraph.solvers.base import Alignment, register_solver
from permgraph.solvers.weight_matching import WeightMatcher, _units, weight_matching
from permgraph.backends import get_backend
from permgraph.permutation import tree_groups


@register_solver("ot")
def ot_solver(spec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], *,
              reg: float = 0.0, heads: str = "spectral", backend: str = "pot", **options) -> Alignment:
    """OT alignment; ``reg`` > 0 adds Sinkhorn soft plans for flat groups (see module docstring)."""
    if backend == "auto":
        backend = "pot"
    hard = weight_matching(spec, params_a, params_b, heads=heads, backend=backend, solver_name="ot", **options)
    hard.settings["reg"] = reg
    if reg <= 0:
        return hard
    import ot

    wm = WeightMatcher(hard.spec, params_a, params_b, get_backend("scipy"), torch.float64)
    wm.perm = hard.permutation
    parents = {c for g in hard.spec.groups.values() for c in g.ctx}
    soft = {}
    for g, grp in hard.spec.groups.items():
        if grp.ctx or g in parents or not _whole_axis_only(hard.spec, g):
            continue
        score = wm.cost(g)[0]
        nb = sum(_units(wm.b[s.param], s)[0].pow(2).sum(1) for s in wm.sites[g])
        na = sum(_units(_perm_without(wm, s, g), s)[0].pow(2).sum(1) for s in wm.sites[g])
        dist = (nb[:, None] + na[None, :] - 2 * score).clamp_min(0)
        dist = dist / dist.max().clamp_min(1e-30)
        n = grp.size
        u = np.full(n, 1.0 / n)
        plan = ot.sinkhorn(u, u, dist.numpy(), reg, numItermax=2000)
        # rows: B's units; columns: A's units after the hard permutation was applied, so
        # compose: soft[i, j] weighs A' unit j, where A' = A permuted by the hard solution
        soft[g] = torch.as_tensor(plan * n, dtype=torch.float64)
    hard.soft = soft
    hard.function_preserving = False
    hard.settings["soft_groups"] = sorted(soft)
    return hard


def _perm_without(wm: WeightMatcher, site, g: str) -> torch.Tensor:
    from permgraph.permutation import permute_tensor

    return permute_tensor(wm.spec, wm.perm, site.param, wm.a[site.param], skip=(site.axis, g))


def _whole_axis_only(spec, g: str) -> bool:
    return all(t == ["g", g] for trees in spec.axes.values() for t in trees if g in tree_groups(t))
