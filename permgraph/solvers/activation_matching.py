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
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from permgraph.alignment import Alignment
from permgraph.backends import get_backend
from permgraph.compiler import compile_graph
from permgraph.equivalents import with_all_ones_mask
from permgraph.errors import InputError
from permgraph.inputs import resolve_inputs
from permgraph.ir import Prod
from permgraph.solvers.base import SolverOptions
from permgraph.solvers.common import PermState, brute_heads, check_heads, spectral_heads, unit_index
from permgraph.solvers.weight_matching import WeightCosts
from permgraph.spec import PermSpec


@dataclass
class ActivationMatchingOptions(SolverOptions):
    """``data``: batches of model inputs; ``module``: model A (``pg.align`` passes it)."""

    data: Iterable[Any] | None = None
    module: nn.Module | None = None
    heads: str = "spectral"
    max_sites: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_heads(self.heads, ("spectral", "natural", "brute"))


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
        dims = [d for d, t in enumerate(trees) if t.groups()]
        if any(g in trees[d].groups() for d in dims):
            merged = trees[dims[0]] if len(dims) == 1 else Prod(tuple(trees[d] for d in dims))
            if set(cg.spec.groups[g].ctx) <= set(merged.groups()):  # an expert's units: rows by routing
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


def activation_matching(spec: PermSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                        opts: ActivationMatchingOptions) -> Alignment:
    """Align A to B by activation correlation on ``opts.data`` (batches of model inputs)."""
    if opts.module is None or opts.data is None:
        raise InputError("activation_matching needs data=[batch, ...] (model inputs) and the model: "
                         "call pg.align(model_a, model_b, solver='activation_matching', data=batches)")
    t0 = time.perf_counter()
    batches = list(opts.data)
    if not batches:
        raise InputError("activation_matching got no data batches")
    cg = compile_graph(opts.module, batches[0], outputs=spec.info.get("fixed_outputs"))
    if list(cg.spec.groups) != list(spec.groups):
        raise InputError("the spec passed to align does not match the model's compiled spec")
    gm = cg.exported.module()
    runnable = {n.name for n in gm.graph.nodes if n.op == "call_function"}
    plan = {g: _sites(cg, g, opts.max_sites, runnable) for g in spec.groups}
    # groups no activation shows with their contexts (each MoE expert's units: an activation's row
    # belongs to the expert the token was routed to, and A and B route differently) are matched by
    # their weights, given the groups solved before them
    by_weights = [g for g, found in plan.items() if not found and spec.groups[g].ctx]
    missing = [g for g, found in plan.items() if not found and g not in by_weights]
    if missing:
        raise InputError(f"no activations found for groups {missing[:3]}: use a weight-based solver")
    resolved = [resolve_inputs(opts.module, b) for b in batches]
    if cg.spec.info.get("inputs"):  # traced with an all-ones attention_mask (trace): the batches too
        resolved = [(a, with_all_ones_mask(opts.module, k) or k) for a, k in resolved]
    runs = _record(gm, cg, spec, resolved,
                   {node for found in plan.values() for node, _, _ in found}, {"a": params_a, "b": params_b})
    t_data = time.perf_counter() - t0
    state = PermState(spec, get_backend(opts.backend))

    def correlation(g: str, old_ctx: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for node, dims, tree in plan[g]:
            site_units, _ = unit_index(spec, g, tree)
            fb = torch.cat([_features(x, dims, site_units) for x in runs["b"][node]], dim=-1)
            fa = torch.cat([_features(x, dims, site_units) for x in runs["a"][node]], dim=-1)
            fa = fa if old_ctx is None else fa[old_ctx]
            c = _standardize(fb) @ _standardize(fa).transpose(1, 2)
            total = c if total is None else total + c
        return total

    heads = spec.head_groups()
    if opts.heads == "spectral":
        names = [p for p in spec.axes if any(t.groups() for t in spec.axes[p])]
        a32 = {p: spec.to_view(p, params_a[p].detach().float()) for p in names}
        b32 = {p: spec.to_view(p, params_b[p].detach().float()) for p in names}
        for h in heads:
            spectral_heads(state, h, a32, b32)
    weights = WeightCosts(state, params_a, params_b, torch.float64) if by_weights else None
    for g in spec.groups:
        if g in heads and opts.heads != "brute":
            continue
        if weights is not None and g in by_weights:
            weights.step(g)
            continue
        if g in heads and weights is not None and any(spec.groups[c].ctx == (g,) for c in by_weights):
            weights.brute_step(g)  # experts: every pair scored by its units matched by weights
            continue
        if g in heads:
            brute_heads(state, g, _pair_correlation(spec, g, correlation))
            continue
        scores = correlation(g, state.old_ctx_index(g) if spec.groups[g].ctx else None)
        state.set(g, state.solve(scores.float()))
    settings = {"solver": "activation_matching", "heads": opts.heads, "backend": state.backend.name,
                "seed": opts.seed, "batches": len(batches), "max_sites": opts.max_sites,
                **({"by_weights": len(by_weights)} if by_weights else {})}
    timings = {"data": t_data, "cost": state.timings["cost"], "lap": state.timings["lap"],
               "total": time.perf_counter() - t0}
    return Alignment(state.perm, spec, [], timings, settings)


def _record(gm: fx.GraphModule, cg, spec: PermSpec, batches: list[tuple[tuple, dict]], wanted: set[str],
            params: dict[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Activations at the ``wanted`` nodes, for each model's parameters, over all batches
    (``(args, kwargs)``, as traced: transformers' ``use_cache`` off)."""
    import copy

    runs = {}
    for label, p in params.items():
        model = _load(copy.deepcopy(gm), spec, p)
        acts: dict[str, list[torch.Tensor]] = {}
        for args, kwargs in batches:
            rec = _Recorder(model, wanted)
            with torch.no_grad():
                rec.run(*_flat_inputs(cg.exported, args, kwargs))
            for k, v in rec.seen.items():
                acts.setdefault(k, []).append(v)
        runs[label] = acts
    return runs


def _pair_correlation(spec: PermSpec, h: str, correlation):
    """Child group g's correlations for every (B head i, A head j) pair: (n, n, n_g, n_g)."""
    n = spec.groups[h].size

    def scores(g: str) -> torch.Tensor:
        per_a_head = [correlation(g, torch.full((n,), j, dtype=torch.long)) for j in range(n)]
        return torch.stack(per_a_head, dim=1)
    return scores


def _flat_inputs(ep, args: tuple, kwargs: dict) -> list:
    """User inputs in the order the unlifted module expects them."""
    from torch.utils._pytree import tree_flatten  # noqa: PLC2701 - torch's pytree API

    return tree_flatten((args, kwargs))[0]
