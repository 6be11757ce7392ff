"""Solvers: planted-permutation recovery, function preservation, determinism, errors."""
import pytest
import torch

import permgraph as pg
from permgraph.rewrites import shared_within_head
from permgraph.testing.zoo import ZOO, build


@pytest.fixture(scope="module", params=sorted(ZOO))
def planted(request, zoo_compiled):
    zm, spec = zoo_compiled(request.param)
    return zm, spec, zm.model.state_dict()


def _exact(al, sa, sb):
    out = pg.apply_permutation(al.spec, al.permutation, sa)
    return all(torch.equal(out[k], sb[k]) for k in sb)


def test_weight_matching_recovers_planted_permutation(planted):
    zm, spec, sa = planted
    sb = pg.apply_permutation(spec, spec.random_permutation(11), sa)
    al = pg.align(sa, sb, spec, solver="weight_matching", heads="spectral", seed=0)
    assert _exact(al, sa, sb), (zm.name, al.summary())
    assert al.history[-1] >= al.history[0]


def test_transfusion_recovers_planted_permutation(planted):
    zm, spec, sa = planted
    shared = shared_within_head(spec)
    sb = pg.apply_permutation(shared, shared.random_permutation(12), sa)
    al = pg.align(sa, sb, spec, solver="transfusion")
    assert _exact(al, sa, sb), (zm.name, al.summary())


def test_alignment_preserves_function(planted):
    zm, spec, sa = planted
    other = build(zm.name, seed=1).model.state_dict()
    al = pg.align(sa, other, spec, solver="weight_matching", heads="spectral", max_iter=5)
    assert al.function_preserving
    rep = pg.verify(zm.model, al.spec, zm.inputs, permutation=al.permutation, tolerance=zm.tolerance)
    assert rep.ok, (zm.name, rep)


@pytest.mark.parametrize("heads", ["brute", "lap", "natural", "flat"])
def test_head_strategies_run_and_flat_is_marked(heads):
    zm = build("gpt2")
    spec = pg.compile(zm.model)
    sa, sb = zm.model.state_dict(), build("gpt2", seed=3).model.state_dict()
    al = pg.align(sa, sb, spec, solver="weight_matching", heads=heads, max_iter=3)
    assert al.function_preserving == (heads != "flat")
    assert al.history[-1] >= al.history[0] - 1e-6
    if heads == "flat":
        assert "NOT function-preserving" in al.summary()
        assert not any(g.ctx for g in al.spec.groups.values())


def test_brute_recovers_planted_heads():
    zm = build("torch_encoder_post")
    spec = pg.compile(zm.model, zm.inputs)
    sa = zm.model.state_dict()
    sb = pg.apply_permutation(spec, spec.random_permutation(2), sa)
    al = pg.align(sa, sb, spec, solver="weight_matching", heads="brute")
    assert _exact(al, sa, sb)


def test_same_seed_same_permutation():
    zm = build("llama")
    spec = pg.compile(zm.model)
    sa, sb = zm.model.state_dict(), build("llama", seed=4).model.state_dict()
    a1 = pg.align(sa, sb, spec, solver="weight_matching", heads="lap", seed=5)
    a2 = pg.align(sa, sb, spec, solver="weight_matching", heads="lap", seed=5)
    assert a1.permutation.equal(a2.permutation) and a1.history == a2.history


@pytest.mark.parametrize("backend", ["scipy", "lap", "torch"])
def test_backends_agree_on_planted_recovery(backend):
    zm = build("tiny_gqa_rope")
    spec = pg.compile(zm.model, zm.inputs)
    sa = zm.model.state_dict()
    sb = pg.apply_permutation(spec, spec.random_permutation(9), sa)
    al = pg.align(sa, sb, spec, solver="weight_matching", backend=backend)
    assert al.settings["backend"] == backend and _exact(al, sa, sb)


def test_mismatched_models_are_reported():
    zm = build("llama")
    spec = pg.compile(zm.model)
    sa = zm.model.state_dict()
    sb = dict(sa)
    sb["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    del sb["model.norm.weight"]
    with pytest.raises(ValueError, match=r"(?s)model B: 'model.layers.0.mlp.up_proj.weight' has shape \(5, 5\).*"
                                         r"model B: missing 'model.norm.weight'"):
        pg.align(sa, sb, spec)


def test_nan_weights_are_reported():
    zm = build("gpt2")
    spec = pg.compile(zm.model)
    sa = {k: v.clone() for k, v in zm.model.state_dict().items()}
    sa["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="model A: 'transformer.h.0.mlp.c_fc.weight' contains NaN"):
        pg.align(sa, zm.model.state_dict(), spec)


def test_state_dicts_need_a_spec():
    zm = build("gpt2")
    with pytest.raises(ValueError, match="without a spec"):
        pg.align(zm.model.state_dict(), zm.model.state_dict())


def test_unknown_solver_and_registry():
    zm = build("gpt2")
    with pytest.raises(ValueError, match="unknown solver 'nope'.*transfusion"):
        pg.align(zm.model, zm.model, solver="nope")

    calls = []

    @pg.register_solver("identity_for_test")
    def ident(spec, a, b, **opts):
        calls.append(opts)
        return pg.Alignment(spec.identity(), spec, settings={"solver": "identity_for_test"})

    al = pg.align(zm.model, zm.model, solver="identity_for_test", seed=3)
    assert al.permutation.is_identity() and calls[0]["seed"] == 3
    assert "identity_for_test" in pg.available_solvers()


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "clip", "mixtral"])
@pytest.mark.parametrize("heads", ["spectral", "brute"])
def test_activation_matching_recovers_planted_permutation(name, heads):
    """Mixtral: each expert's units are matched by their weights (activation rows follow the routing)."""
    from permgraph.inputs import default_example_inputs

    zm = build(name)
    spec = pg.compile(zm.model, zm.inputs, outputs=zm.outputs)
    planted = pg.apply_permutation(spec, spec.random_permutation(4), zm.model.state_dict())
    model_b = build(name).model
    model_b.load_state_dict(planted)
    data = [default_example_inputs(zm.model, batch=4, seq=8, seed=s) for s in range(2)]
    al = pg.align(zm.model, model_b, spec, solver="activation_matching", data=data, heads=heads)
    out = pg.apply_alignment(al, zm.model.state_dict())
    assert all(torch.equal(out[k], planted[k]) for k in planted), name
    assert al.settings.get("by_weights", 0) == (2 if name == "mixtral" else 0)


def test_activation_matching_needs_data():
    zm = build("gpt2")
    with pytest.raises(ValueError, match="needs data"):
        pg.align(zm.model, zm.model, solver="activation_matching")


def test_ot_hard_recovers_and_soft_is_marked():
    zm = build("vit")
    spec = pg.compile(zm.model)
    sa = zm.model.state_dict()
    sb = pg.apply_permutation(spec, spec.random_permutation(3), sa)
    hard = pg.align(sa, sb, spec, solver="ot")
    assert hard.function_preserving and not hard.soft and hard.settings["backend"] == "pot"
    assert _exact(hard, sa, sb)
    soft = pg.align(sa, sb, spec, solver="ot", reg=0.05)
    assert not soft.function_preserving and soft.soft and "soft transport" in soft.summary()
    for t in soft.soft.values():  # rows of n * (doubly stochastic plan) sum to 1
        assert torch.allclose(t.sum(1), torch.ones(t.shape[0], dtype=t.dtype), atol=1e-3)
    out = pg.apply_alignment(soft, sa)
    rel = sum(float((out[k] - sb[k]).norm()) for k in spec.shapes) / sum(float(sb[k].norm()) for k in spec.shapes)
    assert rel < 0.05  # a sharp plan on a planted problem stays close to the permutation
