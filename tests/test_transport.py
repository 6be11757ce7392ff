"""Task-vector transport: exact identities, planted releases, dtypes, extras, bad input."""
import copy

import pytest
import torch

import permgraph as pg
from permgraph.testing.zoo import build


def finetune(sd, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def releases():
    zm = build("llama")
    model = zm.model.double()
    spec = pg.compile(model)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    planted = spec.random_permutation(7)
    b = pg.apply_permutation(spec, planted, a)
    al = pg.align(a, b, spec, solver="weight_matching")
    return model, spec, a, b, al, planted


def test_alpha_zero_gives_b_exactly(releases):
    _, _, a, b, al, _ = releases
    out = pg.transport(a, finetune(a), b, al, alpha=0.0)
    assert all(torch.equal(out[k], b[k]) for k in b)


def test_unchanged_finetune_gives_b_exactly(releases):
    _, _, a, b, al, _ = releases
    out = pg.transport(a, a, b, al)
    assert all(torch.equal(out[k], b[k]) for k in b)


def test_planted_release_carries_the_finetune_function(releases):
    model, spec, a, b, al, planted = releases
    ft = finetune(a)
    out = pg.transport(a, ft, b, al)
    expect = pg.apply_permutation(spec, planted, ft)
    assert all(torch.allclose(out[k], expect[k], rtol=0, atol=1e-12) for k in expect)
    m_ft, m_out = copy.deepcopy(model), copy.deepcopy(model)
    m_ft.load_state_dict(ft)
    m_out.load_state_dict(out)
    ids = torch.randint(0, 60, (2, 8))
    with torch.no_grad():
        assert torch.allclose(m_ft(input_ids=ids).logits, m_out(input_ids=ids).logits, rtol=1e-5, atol=1e-7)


def test_inputs_untouched_and_dtype_kept(releases):
    _, spec, a, b, al, planted = releases
    a16 = {k: v.to(torch.bfloat16) for k, v in a.items()}
    b16 = {k: v.to(torch.bfloat16) for k, v in b.items()}
    ft16 = finetune(a16)
    copies = [{k: v.clone() for k, v in d.items()} for d in (a16, b16, ft16)]
    out = pg.transport(a16, ft16, b16, planted, spec=spec)
    assert all(out[k].dtype == torch.bfloat16 for k in out)
    for d, c in zip((a16, b16, ft16), copies):
        assert all(torch.equal(d[k], c[k]) for k in d)


def test_alpha_patterns_and_several_finetunes(releases):
    _, spec, a, b, al, planted = releases
    ft1, ft2 = finetune(a, seed=1), finetune(a, seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    out = pg.transport(a, ft1, b, al, alpha={"model.layers.0.*": 0.0, "*": 1.0})
    assert torch.equal(out[name], b[name])
    assert not torch.equal(out["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    each = pg.transport(a, [ft1, ft2], b, al, combine="each")
    summed = pg.transport(a, [ft1, ft2], b, al)
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(summed[k] - b[k], (each[0][k] - b[k]) + (each[1][k] - b[k]), atol=1e-12)


def test_head_only_in_finetune_is_carried_and_permuted():
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    base = LlamaModel(cfg).double().eval()
    spec = pg.compile(base, outputs=[])  # hidden states may come out permuted: a head follows
    a = base.state_dict()
    b = pg.apply_permutation(spec, spec.random_permutation(3), a)
    clf = LlamaForSequenceClassification(cfg).double().eval()
    clf.model.load_state_dict(finetune(a))
    al = pg.align(a, b, spec, solver="weight_matching")
    out = pg.transport(a, clf, b, al)
    assert "score.weight" in out and not torch.equal(out["score.weight"], clf.score.weight)
    moved = copy.deepcopy(clf)
    moved.load_state_dict(out)
    ids = torch.randint(1, 60, (2, 8))
    with torch.no_grad():
        assert torch.allclose(moved(input_ids=ids).logits, clf(input_ids=ids).logits, atol=1e-9)


def test_bad_inputs(releases):
    _, spec, a, b, al, _ = releases
    wrong = dict(b)
    wrong["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="base B: 'model.norm.weight' has shape"):
        pg.transport(a, a, wrong, al)
    bad_ft = {k: v.clone() for k, v in a.items()}
    bad_ft["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        pg.transport(a, bad_ft, b, al)
    other = build("gpt2").model.state_dict()
    with pytest.raises(ValueError, match="lacks base parameters"):
        pg.transport(a, other, b, al)
    with pytest.raises(ValueError, match="needs spec"):
        pg.transport(a, a, b, spec.identity())
