"""Git Re-Basin weight matching over a spec, with head strategies; TransFusion as its preset.

For group g, the score between B's unit i and A's unit j is
``sum over members <B_p[.., i, ..], A'_p[.., j, ..]>`` where ``A'`` is A with every
other group already permuted; a linear assignment per context value (per head, for
within-head groups) maximizes it. Groups are visited in random order until a full
sweep improves nothing. Heads follow ``heads`` (``permgraph.solvers.common.HEAD_STRATEGIES``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from permgraph.alignment import Alignment
from permgraph.backends import get_backend
from permgraph.errors import InputError
from permgraph.ir import Permutation
from permgraph.permutation import permute_tensor
from permgraph.rewrites import flattened_heads, shared_within_head
from permgraph.solvers.base import SolverOptions
from permgraph.solvers.common import (
    HEAD_DISTANCES,
    HEAD_STRATEGIES,
    PermState,
    brute_heads,
    check_heads,
    spectral_heads,
    units,
)
from permgraph.spec import PermSpec

Params = Mapping[str, torch.Tensor]


@dataclass
class WeightMatchingOptions(SolverOptions):
    """``heads``: a head strategy (``HEAD_STRATEGIES``); ``head_distance``: the blocks spectral
    head matching compares (``HEAD_DISTANCES``: ``paper``, ``official`` or ``sites``);
    ``head_guard``: when spectral head matching ends below the identity's objective, also
    solve with heads in their natural order and keep the better of the two."""

    heads: str = "spectral"
    head_distance: str = "paper"
    head_guard: bool = True
    dtype: torch.dtype = torch.float32
    device: str | None = None  # where A, B and the scores live ("cuda"); default: the parameters' device

    def __post_init__(self) -> None:
        super().__post_init__()
        check_heads(self.heads)
        if self.head_distance not in HEAD_DISTANCES:
            raise InputError(f"head_distance must be one of {list(HEAD_DISTANCES)}, not '{self.head_distance}'")


class WeightCosts:
    """The weight-matching objective ``sum_p <B_p, pi(A)_p>`` and its per-group score tensors.

    Only the parameters the spec moves are held, in their own dtype (a bf16 checkpoint stays
    bf16) on ``device``; each is widened to ``dtype`` only while one score is computed.
    """

    def __init__(self, state: PermState, params_a: Params, params_b: Params, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        spec = state.spec
        names = [p for p in spec.axes if any(t.groups() for t in spec.axes[p])]
        self.state, self.spec, self.dtype = state, spec, dtype
        self.a = {p: params_a[p].detach().to(device=device) for p in names}
        self.b = {p: params_b[p].detach().to(device=device) for p in names}

    def wa(self, p: str) -> torch.Tensor:
        return self.a[p].to(self.dtype)

    def wb(self, p: str) -> torch.Tensor:
        return self.b[p].to(self.dtype)

    def objective(self) -> float:
        perm = self.state.perm
        return float(sum((self.wb(p) * permute_tensor(self.spec, perm, p, self.wa(p))).sum() for p in self.a))

    def cost(self, g: str, perm: Permutation | None = None) -> torch.Tensor:
        """Scores (n_ctx, n_g, n_g) of group g with every other group at its value in ``perm``."""
        t0 = time.perf_counter()
        perm = perm or self.state.perm
        total = None
        for site in self.state.sites[g]:
            a_perm = permute_tensor(self.spec, perm, site.param, self.wa(site.param), skip=(site.axis, g))
            c = units(self.wb(site.param), site) @ units(a_perm, site).transpose(1, 2)
            total = c if total is None else total + c
        self.state.timings["cost"] += time.perf_counter() - t0
        return total

    def step(self, g: str) -> bool:
        """One coordinate: solve group g; keep it if the objective improves."""
        scores = self.cost(g)
        q = self.state.solve(scores)
        cur = self.state.current(g)
        new_val = scores.gather(2, q[..., None].to(scores.device)).sum()
        old_val = scores.gather(2, cur[..., None].to(scores.device)).sum()
        if new_val > old_val + 1e-9 * (abs(float(old_val)) + 1.0):
            self.state.set(g, q)
            return True
        return False

    def pair_scores(self, h: str):
        """For brute head matching: child group g's scores for every (B head, A head) pair."""
        ident = Permutation({**self.state.perm.perms, h: self.spec.identity()[h]})

        def scores(g: str) -> torch.Tensor:
            bs, as_ = [], []
            for site in self.state.sites[g]:
                a_perm = permute_tensor(self.spec, ident, site.param, self.wa(site.param), skip=(site.axis, g))
                bs.append(units(self.wb(site.param), site))
                as_.append(units(a_perm, site))
            return torch.einsum("iuf,jvf->ijuv", torch.cat(bs, dim=2), torch.cat(as_, dim=2))
        return scores

    def brute_step(self, h: str) -> bool:
        """Brute head matching as a coordinate step: kept only if the objective improves."""
        before = {g: p.clone() for g, p in self.state.perm.perms.items()}
        old = self.objective()
        brute_heads(self.state, h, self.pair_scores(h))
        if self.objective() > old + 1e-9 * (abs(old) + 1.0):
            return True
        self.state.perm.perms.update(before)
        return False


def weight_matching(spec: PermSpec, params_a: Params, params_b: Params, opts: WeightMatchingOptions,
                    solver_name: str = "weight_matching") -> Alignment:
    """Align A to B by coordinate descent over the spec's groups (see module docstring)."""
    al = _descent(spec, params_a, params_b, opts, solver_name)
    if opts.heads != "spectral" or not opts.head_guard or al.history[-1] >= al.history[0]:
        return al
    alt = _descent(spec, params_a, params_b, dataclasses.replace(opts, heads="natural"), solver_name)
    note = (f"spectral heads ended at {al.history[-1]:.6g}, below the identity's {al.history[0]:.6g}; "
            f"natural heads reached {alt.history[-1]:.6g}")
    best = alt if alt.history[-1] > al.history[-1] else al
    best.settings["head_guard"] = note + ("; kept natural heads" if best is alt else "; kept spectral heads")
    best.timings["total"] = al.timings["total"] + alt.timings["total"]
    return best


def _descent(spec: PermSpec, params_a: Params, params_b: Params, opts: WeightMatchingOptions,
             solver_name: str) -> Alignment:
    """One coordinate descent from the identity, heads handled by ``opts.heads``."""
    t_start = time.perf_counter()
    work = flattened_heads(spec) if opts.heads == "flat" else spec
    device = torch.device(opts.device) if opts.device else (next(iter(params_a.values())).device if params_a else None)
    state = PermState(work, get_backend(opts.backend, device))
    wm = WeightCosts(state, params_a, params_b, opts.dtype, device)
    history = [wm.objective()]
    heads = work.head_groups()
    for h in heads if opts.heads == "spectral" else ():
        spectral_heads(state, h, wm.a, wm.b, opts.head_distance)
    skip = set(heads) if opts.heads in ("spectral", "natural", "brute") else set()
    names = [g for g in work.groups if g not in skip]
    brute = sorted(heads) if opts.heads == "brute" else []
    gen = torch.Generator().manual_seed(int(opts.seed))
    bar = _progress(opts.progress, opts.max_iter)
    for _ in range(opts.max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            improved |= wm.step(names[i])
        for h in brute:  # head pairs are scored given the sweep's other groups
            improved |= wm.brute_step(h)
        history.append(wm.objective())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{history[-1]:.4g}")
        if not improved:
            break
    if bar is not None:
        bar.close()
    timings = {**state.timings, "total": time.perf_counter() - t_start}
    settings = {"solver": solver_name, "heads": opts.heads, "backend": state.backend.name, "seed": opts.seed,
                "head_distance": opts.head_distance,
                "max_iter": opts.max_iter, "dtype": str(opts.dtype).replace("torch.", "")}
    return Alignment(state.perm, work, history, timings, settings,
                     function_preserving=HEAD_STRATEGIES[opts.heads].function_preserving)


@dataclass
class TransfusionOptions(WeightMatchingOptions):
    """As ``WeightMatchingOptions``; the guard is off: the paper's method as published."""

    head_guard: bool = False


def transfusion(spec: PermSpec, params_a: Params, params_b: Params, opts: WeightMatchingOptions) -> Alignment:
    """The paper's method: spectral head matching (Eq. 7-8 with ``head_distance="paper"``), then
    one within-head permutation per head pair shared by Q, K, V and O
    (``permgraph.rewrites.shared_within_head``), in Git Re-Basin's descent over the spec."""
    return weight_matching(shared_within_head(spec), params_a, params_b, opts, solver_name="transfusion")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweeps", leave=False)
