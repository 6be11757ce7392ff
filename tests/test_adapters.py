"""LoRA adapters carried to a new base release (permgraph.adapters), checked against PEFT itself.

B is a planted permutation of A, so the carried adapter on B must give the outputs of the
original adapter on A (float64). The original adapter on B must not: that is what makes the
tests able to fail.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

import permgraph as pg  # noqa: E402
from permgraph.adapters import AdapterError, read_adapter, transport_adapter  # noqa: E402
from permgraph.alignment import Alignment  # noqa: E402
from permgraph.errors import InputError  # noqa: E402
from permgraph.testing import zoo  # noqa: E402

TOL = 1e-10
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
BERT_TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(autouse=True)
def float64_rmsnorm(monkeypatch):
    """transformers' LlamaRMSNorm computes in float32 even in a float64 model: keep float64,
    so that LLaMA outputs can be compared at 1e-10."""
    from transformers.models.llama import modeling_llama

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def base(name: str, seed: int = 0) -> torch.nn.Module:
    """A zoo model in float64 with every parameter perturbed (no zero biases, no unit norms)."""
    model = zoo.build(name, seed).model.double().eval()
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def planted(model: torch.nn.Module, seed: int = 3):
    spec = pg.compile(model)
    perm = spec.random_permutation(seed)
    b = copy.deepcopy(model)
    b.load_state_dict(pg.apply_permutation(spec, perm, model.state_dict()))
    return spec, perm, b


def make_adapter(model, config: LoraConfig, folder, seed: int = 0):
    """A PEFT adapter on ``model`` with every trainable tensor random (PEFT starts lora_B at zero)."""
    pm = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pm.save_pretrained(str(folder))
    return folder


def ids(vocab: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def run(model, adapter_folder, x) -> torch.Tensor:
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_folder)).eval()
    with torch.no_grad():
        return pm(x).logits


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def check_carried(a, b, alignment, folder, out, x=None):
    """Carry ``folder`` to B at ``out``; the adapter on B must match the original on A."""
    x = ids() if x is None else x
    res = transport_adapter(alignment, folder, out=out, base_new="release-B")
    ref = run(a, folder, x)
    assert rel(run(b, out, x), ref) < TOL
    assert rel(run(b, folder, x), ref) > 1e-3  # the original adapter on B is wrong: the test can fail
    return res


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["planted", "weight_matching"])
def test_llama_gqa_rope_adapter_exact(tmp_path, how):
    a = base("llama")
    spec, perm, b = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), tmp_path / "ad")
    al = (spec, perm) if how == "planted" else pg.align(a, b, solver="weight_matching")
    res = check_carried(a, b, al, folder, tmp_path / "out")
    assert len(res.targets) == 2 * len(LLAMA_TARGETS)
    assert res.targets["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.k_proj.weight"
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "release-B" and cfg["peft_type"] == "LORA"
    _, orig = read_adapter(folder)
    _, new = read_adapter(tmp_path / "out")
    assert new.keys() == orig.keys()
    assert all(new[k].shape == orig[k].shape for k in orig)  # the same size: still an adapter
    assert not all(torch.equal(new[k], orig[k]) for k in orig)


def test_gpt2_conv1d_fused_qkv_fan_in_fan_out_with_biases(tmp_path):
    a = base("gpt2")
    spec, perm, b = planted(a)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=GPT2_TARGETS, fan_in_fan_out=True, bias="all")
    folder = make_adapter(a, cfg, tmp_path / "ad")
    _, st = read_adapter(folder)
    assert any(k.endswith("ln_1.bias") for k in st)  # bias="all" carries every bias, LayerNorm's too
    res = check_carried(a, b, pg.align(a, b, solver="weight_matching"), folder, tmp_path / "out")
    assert {m.rsplit(".", 1)[-1] for m in res.targets} == set(GPT2_TARGETS)


def test_gpt2_orientation_from_modules_when_config_disagrees(tmp_path):
    """A config whose fan_in_fan_out contradicts the layers (as PEFT leaves it when a model mixes
    Linear and Conv1D targets) cannot orient square Conv1D weights: refused, unless the base is
    given as a module."""
    a = base("gpt2")
    spec, perm, b = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=GPT2_TARGETS, fan_in_fan_out=True), tmp_path / "ad")
    config, state = read_adapter(folder)
    config["fan_in_fan_out"] = False
    with pytest.raises(AdapterError, match="fan_in_fan_out"):
        transport_adapter((spec, perm), (config, state))
    res = transport_adapter((spec, perm), (config, state), base_a=a, out=tmp_path / "out")
    config["fan_in_fan_out"] = True
    res_true = transport_adapter((spec, perm), (config, state))
    assert all(torch.equal(res.state[k], res_true.state[k]) for k in state)
    assert rel(run(b, res.out, ids()), run(a, folder, ids())) < TOL


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(lora_bias=True, bias="lora_only")],
                         ids=["dora", "lora_bias"])
def test_bert_classifier_modules_to_save(tmp_path, extra):
    a = base("bert_classifier")
    spec, perm, b = planted(a)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"], **extra)
    folder = make_adapter(a, cfg, tmp_path / "ad")
    _, st = read_adapter(folder)
    assert any("classifier" in k for k in st)
    assert any("lora_magnitude_vector" in k for k in st) == bool(extra.get("use_dora"))
    res = check_carried(a, b, (spec, perm), folder, tmp_path / "out")
    # the modules_to_save copy of the classifier moves on its input axis; its class axis is fixed
    key = next(k for k in st if "classifier" in k and k.endswith("weight") and "original_module" not in k)
    assert not torch.equal(res.state[key], st[key])
    assert torch.equal(res.state[key].sort(dim=1).values, st[key].sort(dim=1).values)


def test_fixed_axes_are_kept_and_reported(tmp_path):
    """lm_head's vocabulary axis and the embedding's vocabulary axis are fixed by the spec:
    the factor on them is carried unchanged and reported; the factor on the hidden axis moves."""
    a = base("llama")
    spec, perm, b = planted(a)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "lm_head", "embed_tokens"])
    folder = make_adapter(a, cfg, tmp_path / "ad")
    res = check_carried(a, b, (spec, perm), folder, tmp_path / "out")
    _, orig = read_adapter(folder)
    head_b, head_a = "base_model.model.lm_head.lora_B.weight", "base_model.model.lm_head.lora_A.weight"
    emb_a, emb_b = ("base_model.model.model.embed_tokens.lora_embedding_A",
                    "base_model.model.model.embed_tokens.lora_embedding_B")
    assert head_b in res.kept and emb_a in res.kept
    assert "model output" in res.kept[head_b] and "embedding" in res.kept[emb_a]
    assert torch.equal(res.state[head_b], orig[head_b]) and torch.equal(res.state[emb_a], orig[emb_a])
    assert not torch.equal(res.state[head_a], orig[head_a]) and not torch.equal(res.state[emb_b], orig[emb_b])
    assert any("carried unchanged" in n for n in res.notes)
    # PEFT saved frozen copies of A's embedding weights: dropped, so B keeps its own
    assert not any(k.endswith("base_layer.weight") for k in res.state)
    assert any("frozen copies" in n for n in res.notes)


def test_transfusion_derived_spec_is_used(tmp_path):
    """transfusion aligns over a derived spec (Q/K and V/O share within-head groups): the
    adapter moves by that spec's trees, not by a separately compiled one."""
    a = base("bert")
    from permgraph.rewrites import shared_within_head

    derived = shared_within_head(pg.compile(a))
    assert set(derived.groups) != set(pg.compile(a).groups)
    perm = derived.random_permutation(7)
    b = copy.deepcopy(a)
    b.load_state_dict(pg.apply_permutation(derived, perm, a.state_dict()))
    folder = make_adapter(a, LoraConfig(r=4, target_modules=BERT_TARGETS), tmp_path / "ad")
    check_carried(a, b, Alignment(perm, derived), folder, tmp_path / "out")


def test_several_adapters_share_one_alignment(tmp_path):
    a = base("llama")
    _, _, b = planted(a)
    al = pg.align(a, b, solver="weight_matching")
    f1 = make_adapter(a, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "one", seed=1)
    f2 = make_adapter(a, LoraConfig(r=2, target_modules=["gate_proj", "down_proj"], use_rslora=True),
                      tmp_path / "two", seed=2)
    res = transport_adapter(al, [f1, f2], out=[tmp_path / "o1", tmp_path / "o2"], base_new="B")
    assert isinstance(res, list) and len(res) == 2
    x = ids()
    for folder, r in zip((f1, f2), res):
        assert rel(run(b, r.out, x), run(a, folder, x)) < TOL


# -- merge ----------------------------------------------------------------------------------------

def merged_reference(a, folder, spec, perm, alpha=1.0):
    """pi(A + alpha * dW): PEFT merges the original adapter into A, then the planted permutation."""
    pm = PeftModel.from_pretrained(copy.deepcopy(a), str(folder))
    merged = pm.merge_and_unload().state_dict()
    sa = a.state_dict()
    mixed = {k: sa[k] + alpha * (merged[k] - sa[k]) for k in sa}
    return pg.apply_permutation(spec, perm, mixed)


@pytest.mark.parametrize("name,cfg", [
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS + ["embed_tokens"])),
    ("gpt2", LoraConfig(r=4, lora_alpha=16, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_rslora=True)),
    ("bert", LoraConfig(r=4, target_modules=BERT_TARGETS, use_dora=True)),
    ("bert", LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True, alpha_pattern={"value": 32})),
    ("llama", LoraConfig(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"], use_dora=True)),
    ("gpt2", LoraConfig(r=4, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=True)),
], ids=["llama", "gpt2-rslora", "bert-dora", "bert-lora_bias-alpha_pattern", "llama-dora-embedding", "gpt2-dora"])
def test_merge_equals_permuted_peft_merge(tmp_path, name, cfg):
    """Merged: B + pi(dW) equals PEFT's merge into A, permuted; and the adapter form is exact too."""
    a = base(name)
    spec, perm, b = planted(a)
    folder = make_adapter(a, cfg, tmp_path / "ad")
    check_carried(a, b, (spec, perm), folder, tmp_path / "out")
    res = transport_adapter((spec, perm), folder, merge=True, base_b=b)
    assert res.merged and res.state.keys() == b.state_dict().keys()
    ref = merged_reference(a, folder, spec, perm)
    changed = 0
    for k, v in ref.items():
        assert rel(res.state[k], v) < TOL, k
        changed += not torch.equal(res.state[k], b.state_dict()[k])
    assert changed >= 4
    # the merged B gives the original adapter's outputs
    m = copy.deepcopy(b)
    m.load_state_dict(res.state)
    with torch.no_grad():
        assert rel(m(ids()).logits, run(a, folder, ids())) < TOL


def test_merge_alpha_scales_the_update(tmp_path):
    a = base("gpt2")
    spec, perm, b = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=GPT2_TARGETS, fan_in_fan_out=True), tmp_path / "ad")
    res = transport_adapter((spec, perm), folder, merge=True, base_b=b, alpha=0.5, out=tmp_path / "m.safetensors")
    ref = merged_reference(a, folder, spec, perm, alpha=0.5)
    assert all(rel(res.state[k], v) < TOL for k, v in ref.items())
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(on_disk[k], res.state[k]) for k in on_disk)
    # the adapter form with alpha=0.5 scales lora_B: the same update as the merge
    half = transport_adapter((spec, perm), folder, alpha=0.5, out=tmp_path / "half")
    mm = copy.deepcopy(b)
    mm.load_state_dict(res.state)
    with torch.no_grad():
        assert rel(run(b, half.out, ids()), mm(ids()).logits) < TOL


def test_rebase_full_values_with_both_bases(tmp_path):
    """With base_a and base_b, whole tensors carry their change: B + pi(X - A)."""
    a = base("gpt2")
    spec, perm, b = planted(a)
    b_other = copy.deepcopy(b)
    with torch.no_grad():
        for p in b_other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = LoraConfig(r=4, target_modules=GPT2_TARGETS, fan_in_fan_out=True, bias="all")
    folder = make_adapter(a, cfg, tmp_path / "ad")
    _, st = read_adapter(folder)
    key = "base_model.model.transformer.h.0.mlp.c_fc.base_layer.bias"
    param = "transformer.h.0.mlp.c_fc.bias"
    res = transport_adapter((spec, perm), folder, base_a=a, base_b=b_other)
    tau = pg.apply_permutation(spec, perm, {param: st[key] - a.state_dict()[param]})[param]
    assert rel(res.state[key], b_other.state_dict()[param] + tau) < TOL
    # on the planted B the re-based adapter is exact too
    check_carried(a, b, (spec, perm), folder, tmp_path / "out")
    res_planted = transport_adapter((spec, perm), folder, base_a=a, base_b=b)
    plain = transport_adapter((spec, perm), folder)
    assert all(rel(res_planted.state[k], plain.state[k]) < TOL for k in plain.state)


def test_dora_rebase_with_both_bases_is_exact_on_planted(tmp_path):
    a = base("bert")
    spec, perm, b = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=BERT_TARGETS, use_dora=True), tmp_path / "ad")
    res = transport_adapter((spec, perm), folder, base_a=a, base_b=b)
    plain = transport_adapter((spec, perm), folder)
    assert all(rel(res.state[k], plain.state[k]) < TOL for k in plain.state)


# -- refusals: clear errors, nothing written -------------------------------------------------------

def test_adapter_of_another_architecture_is_refused(tmp_path):
    a = base("llama")
    spec, perm, _ = planted(a)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).double()
    folder = make_adapter(other, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "ad")
    with pytest.raises(AdapterError, match="does not fit base A") as e:
        transport_adapter((spec, perm), folder, out=tmp_path / "out")
    assert "q_proj" in str(e.value)
    assert not (tmp_path / "out").exists()
    gpt = make_adapter(base("gpt2"), LoraConfig(r=4, target_modules=["c_attn"]), tmp_path / "gpt")
    with pytest.raises(AdapterError, match="no parameter"):
        transport_adapter((spec, perm), gpt, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [
    lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
], ids=["ia3", "prefix"])
def test_unsupported_peft_types_are_refused(tmp_path, make):
    a = base("llama")
    spec, perm, _ = planted(a)
    pm = get_peft_model(copy.deepcopy(a), make())
    pm.save_pretrained(str(tmp_path / "ad"))
    with pytest.raises(AdapterError, match="only LoRA adapters") as e:
        transport_adapter((spec, perm), tmp_path / "ad", out=tmp_path / "out")
    assert make().peft_type.value in str(e.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_untouched(tmp_path):
    a = base("bert")
    spec, perm, _ = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=["query"]), tmp_path / "ad")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists"):
        transport_adapter((spec, perm), folder, out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "out"]  # no temporary folder left


def test_several_adapters_one_bad_writes_nothing(tmp_path):
    a = base("bert")
    spec, perm, _ = planted(a)
    good = make_adapter(a, LoraConfig(r=4, target_modules=["query"]), tmp_path / "good")
    config, state = read_adapter(good)
    state = dict(state)
    k = next(iter(state))
    state[k] = state[k].clone()
    state[k][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        transport_adapter((spec, perm), [good, (config, state)], out=[tmp_path / "o1", tmp_path / "o2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_malformed_adapters_are_refused(tmp_path):
    a = base("bert")
    spec, perm, _ = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=["query"]), tmp_path / "ad")
    config, state = read_adapter(folder)
    with pytest.raises(AdapterError, match="no transport rule"):
        transport_adapter((spec, perm), (config, {**state, "base_model.model.bert.pooler.dense.lora_C.weight":
                                                  torch.zeros(2, 2, dtype=torch.float64)}))
    with pytest.raises(AdapterError, match="trainable_token_indices"):
        transport_adapter((spec, perm), ({**config, "trainable_token_indices": [1, 2]}, state))
    only_a = {k: v for k, v in state.items() if "lora_B" not in k}
    with pytest.raises(AdapterError, match="lacks lora_A or lora_B"):
        transport_adapter((spec, perm), (config, only_a))
    with pytest.raises(AdapterError, match="not a folder"):
        transport_adapter((spec, perm), tmp_path / "missing")
    with pytest.raises(AdapterError, match="merge=True needs base_b"):
        transport_adapter((spec, perm), folder, merge=True)


def test_soft_and_non_preserving_alignments_are_refused(tmp_path):
    a = base("bert")
    spec, perm, _ = planted(a)
    folder = make_adapter(a, LoraConfig(r=4, target_modules=["query"]), tmp_path / "ad")
    g = next(iter(spec.groups))
    n = spec.groups[g].size
    soft = Alignment(perm, spec, soft={g: torch.full((n, n), 1.0 / n, dtype=torch.float64)},
                     function_preserving=False)
    with pytest.raises(AdapterError, match="soft transport plans"):
        transport_adapter(soft, folder)
    with pytest.raises(AdapterError, match="not function-preserving"):
        transport_adapter(Alignment(perm, spec, function_preserving=False), folder)


def test_alpha_limits(tmp_path):
    a = base("bert")
    spec, perm, b = planted(a)
    dora = make_adapter(a, LoraConfig(r=4, target_modules=["query"], use_dora=True), tmp_path / "dora")
    with pytest.raises(AdapterError, match="DoRA"):
        transport_adapter((spec, perm), dora, alpha=0.5)
    assert transport_adapter((spec, perm), dora, alpha=0.5, merge=True, base_b=b).merged
    biased = make_adapter(a, LoraConfig(r=4, target_modules=["query"], bias="lora_only"), tmp_path / "bias")
    with pytest.raises(AdapterError, match="base_a and base_b"):
        transport_adapter((spec, perm), biased, alpha=0.5)
    res = transport_adapter((spec, perm), biased, alpha=0.5, base_a=a, base_b=b)
    assert res.state


def test_read_write_roundtrip_loads_in_peft(tmp_path):
    a = base("bert")
    folder = make_adapter(a, LoraConfig(r=4, target_modules=["query", "value"]), tmp_path / "ad")
    from permgraph.adapters import write_adapter

    config, state = read_adapter(folder)
    out = write_adapter(tmp_path / "copy", config, state)
    assert (out / "adapter_config.json").is_file() and (out / "permgraph_output.json").is_file()
    assert rel(run(a, out, ids()), run(a, folder, ids())) == 0.0
    with pytest.raises(InputError, match="exists"):
        write_adapter(tmp_path / "copy", config, state)
    write_adapter(tmp_path / "copy", config, state, force=True)  # replaces its own earlier output
