"""Activation matching: align groups by the correlation of their activations on data.

The compiler knows, for every graph node, which group each tensor axis carries,
so activations are read where the spec says each group lives (up to
``max_sites`` nodes per group). Both models run the same exported program on
the same batches; for group g, unit i of B and unit j of A are scored by the
Pearson correlation of their activations, summed over sites, and one linear
assignment per context value gives g's permutation. Groups are solved outer
first, so within-head groups are matched inside already-matched heads.
Head groups: ``spectral`` (weights, as in TransFusion), ``natural`` (keep order)
or ``brute`` (every head pair scored by its within-head assignments' correlation).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from permgraph.errors import InputError
from permgraph.backends import get_backend
from permgraph.permutation import tree_groups
from permgraph.solvers.base import Alignment, register_solver
from permgraph.solvers.weight_matching import WeightMatcher, _head_groups, unit_index
from permgraph.spec import PermSpec
from permgraph.trace import split_inputs


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.seen[n.name] = out.detach()
        return out


def _sites(cg, g: str, max_sites: int, runnable: set[str]) -> list[tuple[str, list[int], list]]:
    """Nodes carrying group g: (node, dims with groups, the merged tree of those dims)."""
    found = []
    for node, trees in cg.node_trees.items():
        if node not in runnable:
            continue
        dims = [d for d, t in enumerate(trees) if tree_groups(t)]
        if any(g in tree_groups(trees[d]) for d in dims):
            merged = trees[dims[0]] if len(dims) == 1 else ["prod", [trees[d] for d in dims]]
            found.append((node, dims, merged))
    if len(found) > max_sites:
        step = len(found) / max_sites
        found = [found[int(i * step)] for i in range(max_sites)]
    return found


def _features(x: torch.Tensor, dims: list[int], units: torch.Tensor) -> torch.Tensor:
    """(n_ctx, n_g, m * samples) unit activations of one site."""
    rest = [d for d in range(x.dim()) if d not in dims]
    flat = x.permute(*rest, *dims).reshape(-1, math.prod(x.shape[d] for d in dims))
    n_ctx, n_g, m = units.shape
    return flat.t()[units.flatten()].reshape(n_ctx, n_g, -1).double()


def _standardize(f: torch.Tensor) -> torch.Tensor:
    f = f - f.mean(-1, keepdim=True)
    return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _load(gm: fx.GraphModule, spec: PermSpec, params: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    sd = {}
    for name in gm.state_dict():
        canon = spec.canonical(name)
        if canon in params:
            sd[name] = params[canon]
    gm.load_state_dict(sd, strict=False)
    return gm


@register_solver("activation_matching")
def activation_matching(spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                        *, data: Iterable[Any] | None = None, module: nn.Module | None = None,
                        heads: str = "spectral", backend: str = "auto", seed: int = 0, max_sites: int = 8,
                        max_iter: int | None = None, progress: bool = False) -> Alignment:
    """Align A to B by activation correlation on ``data`` (batches of model inputs)."""
    import copy

    from permgraph.compiler import compile_graph

    if module is None or data is None:
        raise InputError("activation_matching needs data=[batch, ...] (model inputs) and the model: "
                         "call pg.align(model_a, model_b, solver='activation_matching', data=batches)")
    if heads not in ("spectral", "natural", "brute"):
        raise InputError(f"activation_matching heads must be spectral, natural or brute, not '{heads}'")
    t0 = time.perf_counter()
    batches = list(data)
    if not batches:
        raise InputError("activation_matching got no data batches")
    cg = compile_graph(module, batches[0], outputs=spec.info.get("fixed_outputs"))
    if list(cg.spec.groups) != list(spec.groups):
        raise InputError("the spec passed to align does not match the model's compiled spec")
    gm = cg.exported.module()
    runnable = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    plan = {g: _sites(cg, g, max_sites, runnable) for g in spec.groups}
    missing = [g for g, sites in plan.items() if not sites]
    if missing:
        raise InputError(f"no activations found for groups {missing[:3]}: use a weight-based solver")
    wanted = {node for sites in plan.values() for node, _, _ in sites}
    runs = {}
    for label, params in (("a", params_a), ("b", params_b)):
        model = _load(copy.deepcopy(gm), spec, params)
        acts: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            args, kwargs = split_inputs(batch)
            rec = _Recorder(model, wanted)
            with torch.no_grad():
                rec.run(*_flat_inputs(cg.exported, args, kwargs))
            for k, v in rec.seen.items():
                acts.setdefault(k, []).append(v)
        runs[label] = acts
    t_data = time.perf_counter() - t0
    wm = WeightMatcher(spec, params_a, params_b, get_backend(backend), torch.float32)

    def correlation(g: str, old_ctx: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for node, dims, tree in plan[g]:
            units, _ = unit_index(spec, g, tree)
            fb = torch.cat([_features(x, dims, units) for x in runs["b"][node]], dim=-1)
            fa = torch.cat([_features(x, dims, units) for x in runs["a"][node]], dim=-1)
            fa = fa if old_ctx is None else fa[old_ctx]
            c = _standardize(fb) @ _standardize(fa).transpose(1, 2)
            total = c if total is None else total + c
        return total

    frozen = set()
    for h in _head_groups(spec):
        if heads == "spectral":
            wm.spectral_heads(h)
            frozen.add(h)
        elif heads == "natural":
            frozen.add(h)
    for g in spec.groups:
        if g in frozen:
            continue
        grp = spec.groups[g]
        if heads == "brute" and g in _head_groups(spec):
            _brute_heads(wm, spec, g, correlation)
            continue
        scores = correlation(g, wm.old_ctx_index(g) if grp.ctx else None)
        wm.set(g, wm.solve(scores.float()))
    settings = {"solver": "activation_matching", "heads": heads, "backend": wm.backend.name, "seed": seed,
                "batches": len(batches), "max_sites": max_sites}
    timings = {"data": t_data, "cost": wm.timings["cost"], "lap": wm.timings["lap"],
               "total": time.perf_counter() - t0}
    return Alignment(wm.perm, spec, [], timings, settings)


def _brute_heads(wm: WeightMatcher, spec: PermSpec, h: str, correlation) -> None:
    """Score head pairs by the summed correlation assignments of their within-head groups."""
    n = spec.groups[h].size
    children = [g for g, grp in spec.groups.items() if grp.ctx == (h,)]
    score = torch.zeros(n, n, dtype=torch.float64)
    best = {}
    for g in children:
        per_pair = []
        for j in range(n):  # A's head j against every B head
            c = correlation(g, torch.full((n,), j, dtype=torch.long))  # (n_b_heads, n_g, n_g)
            per_pair.append(c)
        pair = torch.stack(per_pair, dim=1)  # (i, j, u, v)
        q = wm.solve(pair.reshape(n * n, *pair.shape[2:]).float())
        score += pair.reshape(n * n, *pair.shape[2:]).gather(2, q[..., None]).sum((1, 2)).reshape(n, n)
        best[g] = q.reshape(n, n, -1)
    ph = wm.solve(score[None].float())[0]
    wm.set(h, ph[None])
    for g in children:
        wm.set(g, best[g][torch.arange(n), ph])


def _flat_inputs(ep, args: tuple, kwargs: dict) -> list:
    """User inputs in the order the unlifted module expects them."""
    from torch.utils._pytree import tree_flatten

    return tree_flatten((args, kwargs))[0]
