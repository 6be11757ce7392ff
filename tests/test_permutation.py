"""Permutations: application semantics, block structure, dtype/device, serialization."""
import pytest
import torch

import permgraph as pg
from permgraph.ir import Cat, Fixed, G, Permutation, Prod
from permgraph.permutation import axis_index
from permgraph.testing.zoo import build


@pytest.fixture(scope="module")
def llama():
    zm = build("llama")
    return zm, pg.compile(zm.model)


def test_blocked_index_matches_explicit_block_permutation():
    # axis = (heads 3) x (within 4), one within-head permutation per head
    sizes = {"h": 3, "w": 4}
    ctx = {"h": (), "w": ("h",)}
    ph = torch.tensor([2, 0, 1])
    pw = torch.tensor([[1, 0, 2, 3], [3, 2, 1, 0], [0, 1, 3, 2]])
    idx = axis_index(Prod((G("h"), G("w"))), Permutation({"h": ph, "w": pw}), ctx, sizes)
    expect = torch.cat([ph[i] * 4 + pw[ph[i]] for i in range(3)])  # new head i holds old head ph[i]
    assert torch.equal(idx, expect)


def test_segmented_index():
    sizes = {"a": 2, "b": 3}
    idx = axis_index(Cat((G("a"), Fixed(2), G("b"))),
                     Permutation({"a": torch.tensor([1, 0]), "b": torch.tensor([2, 0, 1])}), {}, sizes)
    assert idx.tolist() == [1, 0, 2, 3, 6, 4, 5]


def test_apply_leaves_input_untouched_and_keeps_dtype(llama):
    zm, spec = llama
    sd = {k: v.to(torch.bfloat16).clone() for k, v in zm.model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    out = pg.apply_permutation(spec, spec.random_permutation(0), sd)
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert all(out[k].dtype == torch.bfloat16 for k in out)
    assert any(not torch.equal(out[k], sd[k]) for k in sd)


def test_identity_is_a_no_op(llama):
    zm, spec = llama
    sd = zm.model.state_dict()
    out = pg.apply_permutation(spec, spec.identity(), sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert spec.identity().is_identity()


def test_random_permutation_is_deterministic(llama):
    _, spec = llama
    assert spec.random_permutation(7).equal(spec.random_permutation(7))
    assert not spec.random_permutation(7).equal(spec.random_permutation(8))


def test_spec_and_permutation_json_round_trip(llama):
    zm, spec = llama
    spec2 = pg.PermSpec.from_json(spec.to_json())
    assert spec2.to_json() == spec.to_json()
    perm = spec.random_permutation(1)
    perm2 = Permutation.from_json(perm.to_json())
    sd = zm.model.state_dict()
    a = pg.apply_permutation(spec, perm, sd)
    b = pg.apply_permutation(spec2, perm2, sd)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shape_mismatch_is_reported(llama):
    zm, spec = llama
    sd = dict(zm.model.state_dict())
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="up_proj.weight.*same architecture"):
        pg.apply_permutation(spec, spec.random_permutation(0), sd)


def test_permutation_for_another_spec_is_rejected(llama):
    _, spec = llama
    other = pg.compile(build("gpt2").model)
    with pytest.raises(ValueError, match="lacks groups"):
        pg.apply_permutation(spec, other.random_permutation(0), {})


def test_networkx_view(llama):
    _, spec = llama
    g = spec.to_networkx()
    heads = [n for n, d in g.nodes(data=True) if d.get("kind") == "group" and d["role"] == "heads"]
    assert len(heads) == 2
    assert any(g.has_edge(f"group:{spec.groups[h[6:]].name}", n) for h in heads for n in g.neighbors(h))
