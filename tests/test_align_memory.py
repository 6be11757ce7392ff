"""Bounded-memory alignment (permgraph.stream.load_for_align): safetensors inputs are compiled from
their config on the meta device and only the spec's parameters are read, in their own dtype; the
alignment equals the one of fully loaded models."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import permgraph as pg
from permgraph import stream
from permgraph.cli import main
from permgraph.loading import load_source, meta_model


def llama(seed: int, dtype=torch.float32, tied=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(seed: int):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()


@pytest.mark.parametrize("make", [llama, gpt2])
def test_meta_compile_gives_the_loaded_models_spec(tmp_path, make):
    make(0).save_pretrained(tmp_path / "m")
    meta = meta_model(tmp_path / "m")
    assert all(p.is_meta for p in meta.parameters())
    assert pg.compile(meta).to_json() == pg.compile(load_source(str(tmp_path / "m")).module).to_json()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_align_reads_only_spec_parameters_in_their_dtype(tmp_path, dtype):
    a, b = llama(0, dtype), llama(1, dtype)
    a.save_pretrained(tmp_path / "A")
    b.save_pretrained(tmp_path / "B", max_shard_size="20KB")
    (tmp_path / "A" / "model.safetensors").with_name("extra.txt").write_text("not a weight")
    got_a, got_b, spec = stream.load_for_align(str(tmp_path / "A"), str(tmp_path / "B"),
                                               lambda src: pg.compile(src.module))
    assert all(p.is_meta for p in got_a.module.parameters())
    for model, got in ((a, got_a), (b, got_b)):
        sd = model.state_dict()
        assert set(got.state) == set(spec.shapes) and "lm_head.weight" not in got.state  # tied: read once
        assert all(v.dtype == dtype and torch.equal(v, sd[k]) for k, v in got.state.items())
    assert main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "al.json"), "-q",
                 "--max-iter", "5"]) == 0
    ref = pg.align(a, b, max_iter=5)
    al = pg.Alignment.from_json((tmp_path / "al.json").read_text())
    assert al.spec.to_json() == ref.spec.to_json()
    assert all(torch.equal(al.permutation[g], ref.permutation[g]) for g in ref.spec.groups)


def test_meta_compile_failure_falls_back_to_loaded_models(tmp_path):
    llama(0).save_pretrained(tmp_path / "A")
    llama(1).save_pretrained(tmp_path / "B")
    seen = []

    def spec_of(src):
        seen.append(next(src.module.parameters()).is_meta)
        if seen[-1]:
            raise RuntimeError("cannot trace on meta")
        return pg.compile(src.module)

    a, b, spec = stream.load_for_align(str(tmp_path / "A"), str(tmp_path / "B"), spec_of)
    assert seen == [True, False] and not next(a.module.parameters()).is_meta and spec.groups


def test_solver_that_runs_the_model_gets_loaded_models(tmp_path):
    llama(0).save_pretrained(tmp_path / "A")
    llama(1).save_pretrained(tmp_path / "B")
    a, _, _ = stream.load_for_align(str(tmp_path / "A"), str(tmp_path / "B"), lambda s: pg.compile(s.module),
                                    needs_module=True)
    assert not next(a.module.parameters()).is_meta


def test_align_refuses_a_checkpoint_that_does_not_match_its_config(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    llama(0, tied=False).save_pretrained(tmp_path / "A")
    llama(1, tied=False).save_pretrained(tmp_path / "B")
    f = tmp_path / "B" / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    out = tmp_path / "al.json"
    assert main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not match its config.json" in err and "up_proj" in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if "permgraph-tmp" in p.name]


def test_weights_files_with_a_spec_file(tmp_path):
    from safetensors.torch import save_file

    a, b = llama(0, tied=False), llama(1, tied=False)
    spec = pg.compile(a)
    (tmp_path / "spec.json").write_text(spec.to_json())
    for name, m in (("a", a), ("b", b)):
        state = {k: v.contiguous() for k, v in m.state_dict().items()}
        save_file({**state, "extra.step": torch.zeros(1000)}, str(tmp_path / f"{name}.safetensors"))
    got_a, _, _ = stream.load_for_align(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                        lambda src: spec)
    assert got_a.module is None and set(got_a.state) == set(spec.shapes)  # the extra tensor is not read
    out = tmp_path / "al.json"
    assert main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--spec",
                 str(tmp_path / "spec.json"), "--out", str(out), "-q", "--max-iter", "5"]) == 0
    ref = pg.align(a, b, spec, max_iter=5)
    got = json.loads(out.read_text())
    assert got["format"] == "permgraph-alignment"
    al = pg.Alignment.from_json(out.read_text())
    assert all(torch.equal(al.permutation[g], ref.permutation[g]) for g in spec.groups)


PROBE = """
import sys, torch
from permgraph import stream
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
x = torch.ones(16 << 18); del x  # 16 MB freed: glibc raises its map threshold above 8 MB
if sys.argv[1] != "off":
    assert stream.map_threshold(stream.SMALL_MAPS)
if sys.argv[1] == "large":  # what the streaming loop sets after an alignment: heap reuse again
    assert stream.map_threshold(stream.LARGE_MAPS)
before = rss()
y = torch.ones(8 << 18); del y  # 8 MB, touched, freed
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_freed_parameter_sized_blocks_go_back_to_the_system():
    kept = {m: int(subprocess.run([sys.executable, "-c", PROBE, m], capture_output=True, text=True,
                                  check=True).stdout) for m in ("off", "on", "large")}
    assert kept["off"] > 4e6 and kept["on"] < 1e6 and kept["large"] > 4e6, kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sliced_scores_equal_whole_tensor_scores(monkeypatch, dtype):
    """WeightCosts widens and permutes one slice of a parameter at a time: every group's score
    matrix and the objective equal those computed on whole tensors, at a random permutation."""
    from permgraph.backends import get_backend
    from permgraph.solvers import weight_matching as wm_mod
    from permgraph.solvers.common import PermState

    a, b = llama(0, dtype, tied=False), llama(1, dtype, tied=False)
    spec = pg.compile(a)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    perm = spec.random_permutation(3)

    def scores(chunk):
        monkeypatch.setattr(wm_mod, "CHUNK", chunk)
        state = PermState(spec, get_backend("scipy"))
        state.perm = perm
        costs = wm_mod.WeightCosts(state, pa, pb, torch.float64)
        return {g: costs.cost(g) for g in spec.groups}, costs.objective()

    whole, obj_whole = scores(1 << 40)
    sliced, obj_sliced = scores(37)  # smaller than one row of the embedding: slices of one row each
    assert sum(1 for _ in wm_mod.WeightCosts(PermState(spec, get_backend("scipy")), pa, pb, torch.float64)
               .pairs("model.embed_tokens.weight", perm, keep=1)) == 96
    for g in spec.groups:
        assert torch.allclose(sliced[g], whole[g], rtol=1e-12, atol=1e-12), g
    assert obj_sliced == pytest.approx(obj_whole, rel=1e-12)
