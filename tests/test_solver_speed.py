"""The fast descent (reused scores, assignments on worker threads) finds exactly what the plain
one-group-at-a-time descent finds; progress and the time summary."""
import pytest
import torch

import permgraph as pg
from permgraph.backends import get_backend
from permgraph.rewrites import group_map, shared_within_head
from permgraph.solvers.common import PermState, spectral_heads
from permgraph.solvers.weight_matching import WeightCosts
from permgraph.testing.zoo import build


def plain_descent(spec, sa, sb, seed=0, max_iter=100):
    """Git Re-Basin's descent as first written: spectral heads, then every group's scores
    recomputed and solved one at a time, in the solver's random order."""
    state = PermState(spec, get_backend("scipy"))
    wm = WeightCosts(state, sa, sb, torch.float32)
    history = [wm.objective()]
    heads = spec.head_groups()
    for h in heads:
        spectral_heads(state, h, wm.a, wm.b)
    names = [g for g in spec.groups if g not in heads]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            improved |= wm.step(names[i])
        history.append(wm.objective())
        if not improved:
            break
    return state.perm, history


@pytest.fixture(scope="module")
def pairs(zoo_compiled):
    out = {}
    for name in ("llama", "gpt2", "vit"):
        zm, spec = zoo_compiled(name)
        out[name] = (spec, zm.model.state_dict(), build(name, seed=5).model.state_dict())
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit"])
@pytest.mark.parametrize("solver", ["weight_matching", "transfusion"])
@pytest.mark.parametrize("workers", [1, 3])
def test_fast_descent_equals_the_plain_descent(pairs, name, solver, workers):
    spec, sa, sb = pairs[name]
    work = shared_within_head(spec) if solver == "transfusion" else spec
    perm, history = plain_descent(work, sa, sb, seed=2)
    al = pg.align(sa, sb, spec, solver=solver, backend="scipy", seed=2, workers=workers, head_guard=False)
    assert al.sweeps >= 2 and al.history == history
    merged = group_map(spec, work)  # transfusion's result is expressed on the spec it was given
    assert al.permutation.equal(pg.Permutation({g: perm[merged[g]] for g in spec.groups}))
    assert al.settings["workers"] == (workers if workers > 1 else 1)
    solves = al.settings["group_solves"]
    n = len([g for g in work.groups if g not in work.head_groups()])
    assert solves["solved"] + solves["reused"] == al.sweeps * n


def test_a_sweep_after_a_sweep_that_changed_nothing_solves_nothing(pairs):
    spec, sa, sb = pairs["gpt2"]
    state = PermState(spec, get_backend("scipy"), workers=2)
    wm = WeightCosts(state, sa, sb, torch.float32)
    order = [g for g in spec.groups if g not in spec.head_groups()]
    while wm.sweep(order):
        pass
    solved = wm.solved
    assert not wm.sweep(order[::-1]) and wm.solved == solved and wm.reused >= len(order)
    state.close()


def test_parallel_runs_are_deterministic(pairs):
    spec, sa, sb = pairs["llama"]
    runs = [pg.align(sa, sb, spec, backend="scipy", seed=1, workers=4, heads="brute") for _ in range(3)]
    assert all(r.permutation.equal(runs[0].permutation) and r.history == runs[0].history for r in runs)
    single = pg.align(sa, sb, spec, backend="scipy", seed=1, workers=1, heads="brute")
    assert single.permutation.equal(runs[0].permutation) and single.history == runs[0].history


def test_timings_say_where_the_time_went(pairs):
    spec, sa, sb = pairs["gpt2"]
    al = pg.align(sa, sb, spec, backend="scipy", workers=2)
    t = al.timings
    parts = ["cost", "lap", "heads", "objective", "other"]
    assert all(t[k] >= 0 for k in parts + ["lap_cpu", "total"])
    assert sum(t[k] for k in parts) == pytest.approx(t["total"], rel=1e-6)
    assert sorted(k for k in t if k.startswith("sweep_")) == sorted(f"sweep_{i}" for i in range(1, al.sweeps + 1))
    assert sum(t[f"sweep_{i}"] for i in range(1, al.sweeps + 1)) <= t["total"]
    assert set(al.settings["slowest_groups"]) <= set(spec.groups)
    back = pg.Alignment.from_json(al.to_json())
    assert back.timings == t and back.settings["group_solves"] == al.settings["group_solves"]


def test_progress_per_sweep_and_group(pairs, capsys):
    spec, sa, sb = pairs["gpt2"]
    al = pg.align(sa, sb, spec, backend="scipy", progress=True)
    err = capsys.readouterr().err
    n = len([g for g in spec.groups if g not in spec.head_groups()])
    for k in range(1, al.sweeps + 1):
        assert f"sweep {k} (objective" in err
    assert f"group {n}/{n}" in err and "<" in err  # elapsed<remaining


def test_workers_option_is_validated():
    zm = build("gpt2")
    with pytest.raises(ValueError, match="workers must be a non-negative integer"):
        pg.align(zm.model, zm.model, workers=-1)


@pytest.fixture(scope="module")
def llama6():
    """benchmarks/recovery_noise.py's LLaMA-style model: 6 layers, RoPE, GQA (6 query heads on 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=192, num_hidden_layers=6,
                                         num_attention_heads=6, num_key_value_heads=2))
    spec = pg.compile(model)
    return spec, model.state_dict()


@pytest.mark.parametrize("planted", [0, 1, 2])
def test_brute_heads_recover_planted_gqa_exactly(llama6, planted):
    """Brute head matching on a 6-layer GQA model (query-per-kv and value groups coupled
    through o_proj): exact. Before the warm start (the stream aligned from the parameters
    outside attention before any head pair is scored), planted 0 ended at 1.4% of units:
    the first sweep aligned the stream to five layers of mismatched heads."""
    spec, sa = llama6
    shared = shared_within_head(spec)
    perm = shared.random_permutation(planted)
    sb = pg.apply_permutation(shared, perm, sa)
    al = pg.align(sa, sb, spec, solver="weight_matching", heads="brute")
    out = pg.apply_permutation(spec, al.permutation, sa)
    assert all(torch.equal(out[k], sb[k]) for k in sb), al.summary()
    assert al.settings["warm_start_sweeps"] >= 1


def test_brute_pairs_solve_coupled_children_jointly(llama6):
    """The value of a head pair is that of its children solved together: on a planted pair the
    matched pairs' within-head permutations are the planted ones, and every pair's value is
    at most the matched pair's (each B head's best A head is its planted one)."""
    spec, sa = llama6
    shared = shared_within_head(spec)
    perm = shared.random_permutation(0)
    sb = pg.apply_permutation(shared, perm, sa)
    state = PermState(spec, get_backend("scipy"))
    wm = WeightCosts(state, sa, sb, torch.float32)
    merged = group_map(spec, shared)
    for g in spec.groups:  # everything but one layer's heads and their children at the planted value
        if ".layers.3.self_attn" not in g:
            state.perm.perms[g] = perm[merged[g]].clone()
    h = "model.layers.3.self_attn.heads"
    value, best = wm.head_pairs(h)
    planted_h = perm[merged[h]]
    assert not planted_h.equal(torch.arange(2)) and torch.equal(get_backend("scipy").solve(value), planted_h)
    for c in ("model.layers.3.self_attn.q_per_kv", "model.layers.3.self_attn.vo"):
        # B's frame: B's head i holds A's head planted_h[i]; the planted child perm is indexed by A's head
        assert torch.equal(best[c][torch.arange(2), planted_h], perm[merged[c]][planted_h]), c
    assert wm.brute_step(h)
    assert all(state.perm[g].equal(perm[merged[g]]) for g in spec.groups)


@pytest.mark.parametrize("argv", [
    ["--model", "llama7b", "--dtype", "bfloat16", "--backend", "torch", "--device", "cpu"],  # the GPU run's path
    ["--model", "vit-b16"],
])
def test_align_speed_benchmark_runs_at_a_tiny_shape(argv):
    """benchmarks/align_speed.py's code path (bf16 weights on the chosen device, the batched
    torch backend that ``auto`` picks on CUDA) runs on CPU at a tiny shape, and prints its split."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "align_speed.py"
    out = subprocess.run([sys.executable, str(script), *argv, "--tiny", "--max-iter", "3", "--repeat", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("cost matrices", "assignments", "runs identical: True"):
        assert line in out.stdout, out.stdout
    if "--backend" in argv:
        assert "backend torch" in out.stdout
