"""Property-based: random small configurations compile into sound specs."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import permgraph as pg
from permgraph.testing.zoo import TinyTransformer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tiny_configs(draw):
    head_dim = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    heads = kv * group
    return dict(d=heads * head_dim, heads=heads, kv_heads=kv, layers=draw(st.integers(1, 3)),
                mlp=draw(st.sampled_from([6, 10])), norm=draw(st.sampled_from(["layer", "rms"])),
                prenorm=draw(st.booleans()), bias=draw(st.booleans()), tied=draw(st.booleans()),
                fused_qkv=draw(st.booleans()), rope=draw(st.booleans()), gated=draw(st.booleans()))


@SETTINGS
@given(cfg=tiny_configs(), seed=st.integers(0, 2**16))
def test_random_tiny_transformers_are_sound(cfg, seed):
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=17, **cfg).eval()
    ids = torch.randint(0, 17, (2, 5))
    spec = pg.compile(model, (ids,))
    rep = pg.verify(model, spec, (ids,), seed=seed, tolerance=1e-12)
    assert rep.ok, (cfg, rep)
    # complete: the MLP hidden layer and the residual stream are always free
    assert sum(1 for g in spec.groups.values() if g.size == cfg["mlp"] and not g.ctx) >= cfg["layers"]
    if cfg["heads"] > 1 and cfg["kv_heads"] > 1:
        assert any(g.role == "heads" for g in spec.groups.values())


@SETTINGS
@given(layers=st.integers(1, 2), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([4, 8]), tie=st.booleans(), bias=st.booleans(), seed=st.integers(0, 999))
def test_random_llama_configs_are_sound(layers, kv, group, head_dim, tie, bias, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = kv * group
    cfg = LlamaConfig(vocab_size=31, hidden_size=heads * head_dim, intermediate_size=12, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                      attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    spec = pg.compile(model)
    rep = pg.verify(model, spec, seed=seed, tolerance=1e-5)
    assert rep.ok, rep
    assert sum(1 for g in spec.groups.values() if g.role == "vo") == layers
