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

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from permgraph.alignment import Alignment
from permgraph.backends import get_backend
from permgraph.ir import G
from permgraph.permutation import permute_tensor
from permgraph.solvers.common import PermState, units
from permgraph.solvers.weight_matching import WeightCosts, WeightMatchingOptions, weight_matching
from permgraph.spec import PermSpec


@dataclass
class OTOptions(WeightMatchingOptions):
    backend: str = "pot"
    reg: float = 0.0


def ot_solver(spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
              opts: OTOptions) -> Alignment:
    """OT alignment; ``reg`` > 0 adds Sinkhorn soft plans for flat groups (see module docstring)."""
    import dataclasses

    shared = {f.name: getattr(opts, f.name) for f in dataclasses.fields(WeightMatchingOptions)}
    wm_opts = WeightMatchingOptions(**shared)
    if wm_opts.backend == "auto":
        wm_opts.backend = "pot"
    hard = weight_matching(spec, params_a, params_b, wm_opts, solver_name="ot")
    hard.settings["reg"] = opts.reg
    if opts.reg <= 0:
        return hard
    import ot

    state = PermState(hard.spec, get_backend("scipy"))
    state.perm = hard.permutation
    wm = WeightCosts(state, params_a, params_b, torch.float64)
    parents = {c for g in hard.spec.groups.values() for c in g.ctx}
    soft = {}
    for g, grp in hard.spec.groups.items():
        if grp.ctx or g in parents or not _whole_axis_only(hard.spec, g):
            continue
        score = wm.cost(g)[0]
        nb = sum(units(wm.wb(s.param), s)[0].pow(2).sum(1) for s in state.sites[g])
        na = sum(units(permute_tensor(wm.spec, state.perm, s.param, wm.wa(s.param), skip=(s.axis, g)), s)[0]
                 .pow(2).sum(1) for s in state.sites[g])
        dist = (nb[:, None] + na[None, :] - 2 * score).clamp_min(0)
        dist = dist / dist.max().clamp_min(1e-30)
        n = grp.size
        u = np.full(n, 1.0 / n)
        plan = ot.sinkhorn(u, u, dist.numpy(), opts.reg, numItermax=2000)
        # rows: B's units; columns: A's units after the hard permutation was applied, so
        # compose: soft[i, j] weighs A' unit j, where A' = A permuted by the hard solution
        soft[g] = torch.as_tensor(plan * n, dtype=torch.float64)
    hard.soft = soft
    hard.function_preserving = False
    hard.settings["soft_groups"] = sorted(soft)
    return hard


def _whole_axis_only(spec: PermSpec, g: str) -> bool:
    return all(t == G(g) for trees in spec.axes.values() for t in trees if g in t.groups())
