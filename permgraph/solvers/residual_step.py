"""TransFusion's residual step (App. A.3): every residual addend with its own permutation.

Over the untied spec (``permgraph.rewrites.untied_residual``) the descent has many small
residual groups coupled to the MLP and attention groups around them, so where it starts
matters. Two starts are solved and the higher objective kept:

- ``tied``: every site at the tied solution's stream permutation, so the result is never
  below the tied objective;
- ``unit features``: each flat group (residual sites, MLP hidden units; not heads and
  within-head groups) matched on its own by the sorted values of its members' slices,
  ``S_ij = -||sort(f_B(i)) - sort(f_A(j))||^2`` (invariant to every other group, so exact
  on planted pairs), the other groups from the identity.

The permutation is ``compose(start, found)``: the descent runs on ``start(A)``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from permgraph.alignment import Alignment
from permgraph.backends import get_backend
from permgraph.ir import G, Permutation
from permgraph.permutation import apply_permutation, compose
from permgraph.rewrites import untied_residual
from permgraph.spec import PermSpec, site_groups

Params = Mapping[str, torch.Tensor]
Solve = Callable[[PermSpec, Params, Params], Alignment]


def untied_descent(tied: Alignment, spec: PermSpec, params_a: Params, params_b: Params, solve: Solve,
                   backend: str = "auto") -> Alignment:
    """The untied alignment from both starts (module docstring); ``tied`` is over ``spec``."""
    untied = untied_residual(spec)
    parent = site_groups(spec)
    starts = {
        "tied": Permutation({g: tied.permutation[parent.get(g, g)].clone() for g in untied.groups}),
        "unit features": feature_start(untied, params_a, params_b, backend),
    }
    best: Alignment | None = None
    objectives, seconds = {}, tied.timings.get("total", 0.0)
    for name, start in starts.items():
        found = solve(untied, apply_permutation(untied, start, params_a), params_b)
        seconds += found.timings.get("total", 0.0)
        objectives[name] = found.history[-1] if found.history else float("-inf")
        if best is None or objectives[name] > best.history[-1]:
            best = Alignment(compose(untied, start, found.permutation), untied, list(found.history),
                             dict(found.timings), dict(found.settings), found.function_preserving)
            best.settings["start"] = name
    assert best is not None
    best.settings["objective_tied"] = tied.history[-1] if tied.history else None
    best.settings["objective_by_start"] = objectives
    best.settings["residual"] = "untied"
    best.settings["preserving_with_shortcut_permutations"] = tied.function_preserving and best.function_preserving
    best.settings["spec"] = "untied residual sites (not expressible on the given spec: use al.spec)"
    best.function_preserving = False
    best.timings["total"] = seconds  # the tied descent and both starts
    return best


def feature_start(spec: PermSpec, params_a: Params, params_b: Params, backend: str = "auto") -> Permutation:
    """Identity, except each flat group that no other group is indexed by matched by its units'
    sorted member slices."""
    perm = spec.identity()
    lap = get_backend(backend)
    heads = set(spec.head_groups())
    for g in (g for g, grp in spec.groups.items() if not grp.ctx and g not in heads):
        fa, fb = _features(spec, g, params_a), _features(spec, g, params_b)
        if fa is None:
            continue
        score = 2 * fb @ fa.T - (fb * fb).sum(1, keepdim=True) - (fa * fa).sum(1)[None, :]
        perm.perms[g] = lap.solve_batch(score[None])[0].cpu().long()
    return perm


def _features(spec: PermSpec, g: str, params: Params) -> torch.Tensor | None:
    """(n_units, features): for every member axis that is exactly ``G(g)``, each unit's slice
    sorted (invariant to the other axes' permutations)."""
    parts = []
    for m in spec.members(g):
        if spec.axes[m.param][m.axis] != G(g):
            continue
        x = spec.to_view(m.param, params[m.param]).detach().to(torch.float64).movedim(m.axis, 0)
        parts.append(x.reshape(x.shape[0], -1).sort(dim=1).values)
    return torch.cat(parts, dim=1) if parts else None
