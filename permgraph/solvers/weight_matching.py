"""Git Re-Basin weight matching over a spec, with head strategies; TransFusion as its preset.

For group g, the score between B's unit i and A's unit j is
``sum over members <B_p[.., i, ..], A'_p[.., j, ..]>`` where ``A'`` is A with every
other group already permuted; a linear assignment per context value (per head, for
within-head groups) maximizes it. Groups are visited in random order until a full
sweep improves nothing. Heads follow ``heads`` (``permgraph.solvers.common.HEAD_STRATEGIES``).

``heads="brute"`` first runs the descent over the groups outside attention with the scores
of the attention parameters left out (a warm start: head pairs mean nothing before the
stream is aligned, and attention with mismatched heads pulls the stream away from the
right solution), then scores heads after every sweep (``WeightCosts.brute_step``). Other
strategies on a spec with expert banks (parameters with layouts: each expert's own units) warm
start likewise with the banks left out, so that the units start from an aligned residual.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from permgraph.alignment import Alignment
from permgraph.backends import get_backend
from permgraph.errors import InputError
from permgraph.ir import Permutation
from permgraph.permutation import axis_indices, gather_axes
from permgraph.rewrites import flattened_heads, shared_within_head
from permgraph.solvers.base import SolverOptions
from permgraph.solvers.common import (
    HEAD_DISTANCES,
    HEAD_STRATEGIES,
    PermState,
    Site,
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
    workers: int = 0  # CPU threads for the assignments of independent groups; 0: one per core (at most 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_heads(self.heads)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise InputError(f"workers must be a non-negative integer (0: one per core), got {self.workers!r}")
        if self.head_distance not in HEAD_DISTANCES:
            raise InputError(f"head_distance must be one of {list(HEAD_DISTANCES)}, not '{self.head_distance}'")


class WeightCosts:
    """The weight-matching objective ``sum_p <B_p, pi(A)_p>`` and its per-group score tensors.

    Only the parameters the spec moves are held, in their own dtype (a bf16 checkpoint stays
    bf16) on ``device``; each is widened to ``dtype`` only while one score is computed.
    ``deps[g]``: the groups whose permutations group g's scores depend on (every group on
    the parameters g moves, g itself only where it also lives on another axis of them).
    """

    def __init__(self, state: PermState, params_a: Params, params_b: Params, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        spec = state.spec
        names = [p for p in spec.axes if any(t.groups() for t in spec.axes[p])]
        self.state, self.spec, self.dtype = state, spec, dtype
        # parameters with a layout are held in their view's shape (the axes their trees describe)
        self.a = {p: spec.to_view(p, params_a[p].detach().to(device=device)) for p in names}
        self.b = {p: spec.to_view(p, params_b[p].detach().to(device=device)) for p in names}
        self.deps = {g: _deps(spec, state.sites[g], g) for g in spec.groups}
        self.inputs: dict[str, dict[str, torch.Tensor]] = {}  # g -> its deps when last solved
        self.solved = self.reused = 0
        self.group_time: dict[str, float] = {}
        self.left_out: frozenset[str] = frozenset()  # parameters the scores leave out (brute's warm start)
        self._terms: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}

    def wa(self, p: str) -> torch.Tensor:
        return self.a[p].to(self.dtype)

    def wb(self, p: str) -> torch.Tensor:
        return self.b[p].to(self.dtype)

    def pairs(self, p: str, perm: Permutation, keep: int | None = None,
              skip: tuple[int, str] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(b, pi(a))`` of parameter p in ``self.dtype``, in slices along its longest axis
        other than ``keep`` (whole if it is small or has no other axis): sums of products
        over the slices equal those over the whole tensors, and only one slice is widened
        and permuted at a time (a bf16 embedding matrix is never copied whole in float32)."""
        a, b = self.a[p], self.b[p]
        index = axis_indices(self.spec, perm, p, skip) or [None] * a.dim()
        index = [None if i is None else i.to(a.device) for i in index]
        dims = [d for d in range(a.dim()) if d != keep]
        if a.numel() <= CHUNK or not dims:
            yield b.to(self.dtype), gather_axes(a, index).to(self.dtype)
            return
        d = max(dims, key=lambda k: a.shape[k])
        step = max(1, CHUNK * a.shape[d] // a.numel())
        for start in range(0, a.shape[d], step):
            stop = min(start + step, a.shape[d])
            rows = index[d][start:stop] if index[d] is not None else torch.arange(start, stop, device=a.device)
            part = gather_axes(a.index_select(d, rows), index[:d] + [None] + index[d + 1:])
            yield b.narrow(d, start, stop - start).to(self.dtype), part.to(self.dtype)

    def objective(self) -> float:
        """The objective; each parameter's term is recomputed only when a group on it moved."""
        return float(sum(self._term(p) for p in self.a))

    def _term(self, p: str) -> torch.Tensor:
        cached = self._terms.get(p)
        if cached is not None and self.state.unchanged(cached[0]):
            return cached[1]
        snap = self.state.snapshot({g for t in self.spec.axes[p] for g in t.groups()})
        value = sum((b * a).sum() for b, a in self.pairs(p, self.state.perm))
        self._terms[p] = (snap, value)
        return value

    def cost(self, g: str, perm: Permutation | None = None) -> torch.Tensor:
        """Scores (n_ctx, n_g, n_g) of group g with every other group at its value in ``perm``."""
        t0 = time.perf_counter()
        perm = perm or self.state.perm
        total = None
        for site in self.state.sites[g]:
            if site.param in self.left_out:
                continue
            for b, a in self.pairs(site.param, perm, keep=site.axis, skip=(site.axis, g)):
                c = _unit_products(b, a, site)
                total = c if total is None else total + c
        self.state.timings["cost"] += time.perf_counter() - t0
        return total

    def keep(self, g: str, scores: torch.Tensor, q: torch.Tensor) -> bool:
        """Store ``q`` as group g's permutation if it scores higher than the current one."""
        cur = self.state.current(g)
        new_val = scores.gather(2, q[..., None].to(scores.device)).sum()
        old_val = scores.gather(2, cur[..., None].to(scores.device)).sum()
        if new_val > old_val + 1e-9 * (abs(float(old_val)) + 1.0):
            self.state.set(g, q)
            return True
        return False

    def step(self, g: str) -> bool:
        """One coordinate: solve group g; keep it if the objective improves."""
        scores = self.cost(g)
        return self.keep(g, scores, self.state.solve(scores))

    def sweep(self, order: list[str], progress: "_SweepBar | None" = None) -> bool:
        """``step`` for each group of ``order``, with the same result, faster:

        - a group whose inputs (``deps``) are as they were when it was last solved is skipped:
          its scores, and so its assignment, would be the same;
        - while the groups in a run do not depend on each other (the MLP hidden groups given
          the residual stream; the within-head groups given the heads), each one's scores are
          computed here while the assignments of the ones before it are solved on worker
          threads (``PermState.submit``); results are kept in ``order``, exactly as one by one.
        """
        state = self.state
        improved = False
        pending: deque[tuple[str, torch.Tensor, Future, float]] = deque()
        in_flight = state.workers if state.parallel else 0

        def finish() -> None:
            nonlocal improved
            g, scores, fut, t0 = pending.popleft()
            improved |= self.keep(g, scores, state.wait(fut))
            self.group_time[g] = self.group_time.get(g, 0.0) + time.perf_counter() - t0
            if progress is not None:
                progress.done(g)

        for g in order:
            if any(h in self.deps[g] or g in self.deps[h] for h, _, _, _ in pending):
                while pending:
                    finish()
            if state.unchanged(self.inputs.get(g)):
                self.reused += 1
                if progress is not None:
                    progress.done(g, reused=True)
                continue
            t0 = time.perf_counter()
            self.inputs[g] = state.snapshot(self.deps[g])
            scores = self.cost(g)
            pending.append((g, scores, state.submit(scores), t0))
            self.solved += 1
            while len(pending) > in_flight:
                finish()
        while pending:
            finish()
        return improved

    def leave_out(self, params: frozenset[str]) -> None:
        """Scores from now on leave ``params`` out (forgetting which scores could be reused)."""
        self.left_out = params
        self.inputs.clear()

    def head_pairs(self, h: str, inner: int = 10) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Brute head matching's pair values: for B's head i and A's head j, the objective over the
        parameters of head group h once its child groups are solved *jointly* for that pair
        (coordinate descent over the children from the identity, at most ``inner`` rounds):
        GQA's query-per-kv and value groups share ``o_proj`` and cannot be solved one at a time.

        The n^2 pairs are visited as n cyclic shifts of the heads (each a head permutation, so
        every child's scores for all n pairs of a shift come from one ``cost``). Returns the
        (n, n) values and, per child, its (n, n, n_child) permutations (B's frame) for each pair.
        Leaves the state as it found it."""
        state, spec = self.state, self.spec
        n = spec.groups[h].size
        children = [g for g, grp in spec.groups.items() if grp.ctx == (h,)]
        saved = {g: state.perm[g] for g in (h, *children)}
        value = torch.zeros(n, n, dtype=torch.float64)
        best = {c: torch.zeros(n, n, spec.groups[c].size, dtype=torch.long) for c in children}
        rows = torch.arange(n)
        try:
            for k in range(n):
                shift = (rows + k) % n  # B's head i with A's head (i + k) mod n
                state.set(h, shift[None])
                for c in children:
                    state.perm.perms[c] = spec.identity()[c]
                for _ in range(inner):
                    changed = False
                    for c in children:
                        scores = self.cost(c)
                        changed |= self.keep(c, scores, state.solve(scores))
                    if not changed:
                        break
                value[rows, shift] = self.cost(h)[0][rows, shift].double().cpu()
                for c in children:
                    best[c][rows, shift] = state.current(c)
        finally:
            state.perm.perms.update(saved)
        return value, best

    def brute_step(self, h: str) -> bool:
        """Brute head matching as a coordinate step (``head_pairs``, then one assignment of the
        heads): kept only if the objective improves. Skipped when nothing it reads moved since
        its last run (the outcome would be the same)."""
        children = [g for g, grp in self.spec.groups.items() if grp.ctx == (h,)]
        reads = {h, *children, *(d for c in children for d in self.deps[c]), *self.deps[h]}
        key = f"heads:{h}"
        if self.state.unchanged(self.inputs.get(key)):
            self.reused += 1
            return False
        t0 = time.perf_counter()
        moved = {h, *children}
        before = {g: self.state.perm[g] for g in moved}
        touched = [p for p in self.a if any(g in moved for t in self.spec.axes[p] for g in t.groups())]
        old = float(sum(self._term(p) for p in touched))
        value, best = self.head_pairs(h)
        ph = self.state.solve(value[None].float())[0]
        self.state.set(h, ph[None])
        for c in children:  # each matched pair's joint within-head solution
            self.state.set(c, best[c][torch.arange(len(ph)), ph])
        new = float(sum(self._term(p) for p in touched))
        kept = new > old + 1e-9 * (abs(old) + 1.0)
        if not kept:
            self.state.perm.perms.update(before)
        self.inputs[key] = self.state.snapshot(reads)
        self.solved += 1
        self.group_time[h] = self.group_time.get(h, 0.0) + time.perf_counter() - t0
        return kept


CHUNK = 1 << 22  # elements of one parameter widened and permuted at a time by WeightCosts.pairs


def _deps(spec: PermSpec, group_sites: list[Site], g: str) -> frozenset[str]:
    out: set[str] = set()
    for site in group_sites:
        for axis, tree in enumerate(spec.axes[site.param]):
            out.update(x for x in tree.groups() if axis != site.axis or x != g)
    return frozenset(out)


def _unit_products(b: torch.Tensor, a: torch.Tensor, site: Site) -> torch.Tensor:
    """``units(b) @ units(a)^T``: (n_ctx, n_g, n_g). A group that is a whole axis needs no
    regrouping: the product contracts every other axis in place (no copies)."""
    n_ctx, n_g, m = site.units.shape
    if n_ctx == 1 and m == 1 and b.shape[site.axis] == n_g and site.units.flatten().equal(torch.arange(n_g)):
        other = [d for d in range(b.dim()) if d != site.axis]
        return torch.tensordot(b, a, dims=(other, other))[None]
    return units(b, site) @ units(a, site).transpose(1, 2)


class _SweepBar:
    """Progress of one sweep (tqdm): groups done, weighted by their estimated work for the
    time estimate; the postfix names the group just finished."""

    def __init__(self, wm: WeightCosts, order: list[str], sweep: int, objective: float) -> None:
        from tqdm.auto import tqdm

        self.weight = {g: _work(wm, g) for g in order}
        self.n, self.k, self.reused = len(order), 0, 0
        self.bar = tqdm(total=sum(self.weight.values()), desc=f"sweep {sweep} (objective {objective:.6g})",
                        leave=False, mininterval=0, miniters=1,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")

    def done(self, g: str, reused: bool = False) -> None:
        self.k += 1
        self.reused += reused
        self.bar.set_postfix_str(f"group {self.k}/{self.n} {g}" + (" (inputs unchanged)" if reused else ""),
                                 refresh=False)
        self.bar.update(self.weight[g])

    def close(self) -> None:
        self.bar.close()


def _work(wm: WeightCosts, g: str) -> float:
    """Estimated work of solving group g: the score products plus an n^3 assignment per context."""
    flops = 0.0
    for site in wm.state.sites[g]:
        n_ctx, n_g, m = site.units.shape
        shape = wm.spec.view_shape(site.param)
        flops += 2.0 * n_ctx * n_g * n_g * m * math.prod(shape) / shape[site.axis]
    n_ctx, n_g, _ = wm.state.sites[g][0].units.shape if wm.state.sites[g] else (1, 1, 1)
    return flops + float(n_ctx) * n_g ** 3


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
    best.timings = {k: al.timings.get(k, 0.0) + alt.timings.get(k, 0.0) for k in {*al.timings, *alt.timings}}
    return best


def _descent(spec: PermSpec, params_a: Params, params_b: Params, opts: WeightMatchingOptions,
             solver_name: str) -> Alignment:
    """One coordinate descent from the identity, heads handled by ``opts.heads``."""
    t_start = time.perf_counter()
    work = flattened_heads(spec) if opts.heads == "flat" else spec
    device = torch.device(opts.device) if opts.device else (next(iter(params_a.values())).device if params_a else None)
    state = PermState(work, get_backend(opts.backend, device), workers=_workers(opts.workers))
    try:
        wm = WeightCosts(state, params_a, params_b, opts.dtype, device)
        timings = _Clock(state)
        with timings.section("objective"):
            history = [wm.objective()]
        heads = work.head_groups()
        with timings.section("heads"):
            for h in heads if opts.heads == "spectral" else ():
                spectral_heads(state, h, wm.a, wm.b, opts.head_distance)
        skip = set(heads) if opts.heads in ("spectral", "natural", "brute") else set()
        names = [g for g in work.groups if g not in skip]
        brute = sorted(heads) if opts.heads == "brute" else []
        gen = torch.Generator().manual_seed(int(opts.seed))
        sweep = 0

        def run(groups: list[str], heads_after: list[str]) -> None:
            nonlocal sweep
            for _ in range(opts.max_iter):
                sweep += 1
                t_sweep = time.perf_counter()
                order = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
                bar = _SweepBar(wm, order, sweep, history[-1]) if opts.progress else None
                try:
                    improved = wm.sweep(order, bar)
                finally:
                    if bar is not None:
                        bar.close()
                with timings.section("heads"):
                    for h in heads_after:  # head pairs are scored given the sweep's other groups
                        improved |= wm.brute_step(h)
                with timings.section("objective"):
                    history.append(wm.objective())
                timings.add(f"sweep_{sweep}", time.perf_counter() - t_sweep)
                if not improved:
                    break

        def warm_start(left_out: frozenset[str], skip: set[str]) -> None:
            """The descent over the groups outside ``skip`` that live on other parameters, with the
            scores of the ``left_out`` parameters left out."""
            outside = [g for g in names if g not in skip and any(s.param not in left_out for s in state.sites[g])]
            if outside:
                wm.leave_out(left_out)
                run(outside, [])
                wm.leave_out(frozenset())

        if brute:  # the groups outside attention first, from the parameters outside it
            tied = {*brute, *(g for g, grp in work.groups.items() if set(grp.ctx) & set(brute))}
            warm_start(frozenset(p for p in wm.a if any(g in tied for t in work.axes[p] for g in t.groups())), tied)
        elif work.layouts:  # each expert's units start from a residual solved without the expert banks
            warm_start(frozenset(p for p in wm.a if p in work.layouts), set())
        warm = sweep
        run(names, brute)
    finally:
        state.close()
    settings = {"solver": solver_name, "heads": opts.heads, "backend": state.backend.name, "seed": opts.seed,
                "head_distance": opts.head_distance, "workers": state.workers if state.parallel else 1,
                "max_iter": opts.max_iter, "dtype": str(opts.dtype).replace("torch.", ""),
                **({"warm_start_sweeps": warm} if opts.heads == "brute" else {}),
                "group_solves": {"solved": wm.solved, "reused": wm.reused},
                "slowest_groups": {g: round(t, 3) for g, t in
                                   sorted(wm.group_time.items(), key=lambda kv: -kv[1])[:5]}}
    return Alignment(state.perm, work, history, timings.finish(time.perf_counter() - t_start), settings,
                     function_preserving=HEAD_STRATEGIES[opts.heads].function_preserving)


class _Clock:
    """Where a descent's time went, as exclusive parts of ``total``: ``cost`` (score matrices),
    ``lap`` (in or waiting for assignments), ``heads`` (head matching, less its scores and
    assignments), ``objective``, ``other``; ``lap_cpu``: the assignments' own time summed
    over worker threads; ``sweep_<k>``: each sweep's wall time."""

    def __init__(self, state: PermState) -> None:
        self.state = state
        self.t: dict[str, float] = {"heads": 0.0, "objective": 0.0}

    @contextmanager
    def section(self, name: str):
        inner0 = self.state.timings["cost"] + self.state.timings["lap"]
        t0 = time.perf_counter()
        try:
            yield
        finally:
            inner = self.state.timings["cost"] + self.state.timings["lap"] - inner0
            self.add(name, time.perf_counter() - t0 - inner)

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + seconds

    def finish(self, total: float) -> dict[str, float]:
        st = self.state.timings
        parts = {"cost": st["cost"], "lap": st["lap"], "heads": self.t["heads"], "objective": self.t["objective"]}
        sweeps = {k: v for k, v in self.t.items() if k.startswith("sweep_")}
        return {**parts, "other": max(total - sum(parts.values()), 0.0), "lap_cpu": st["lap_cpu"], **sweeps,
                "total": total}


def _workers(n: int) -> int:
    if n:
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


@dataclass
class TransfusionOptions(WeightMatchingOptions):
    """As ``WeightMatchingOptions``; the guard is off: the paper's method as published."""

    head_guard: bool = False


def transfusion(spec: PermSpec, params_a: Params, params_b: Params, opts: WeightMatchingOptions) -> Alignment:
    """The paper's method: spectral head matching (Eq. 7-8 with ``head_distance="paper"``), then
    one within-head permutation per head pair shared by Q, K, V and O
    (``permgraph.rewrites.shared_within_head``), in Git Re-Basin's descent over the spec."""
    return weight_matching(shared_within_head(spec), params_a, params_b, opts, solver_name="transfusion")
