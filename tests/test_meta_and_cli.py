"""Specs without weights (meta device), and the command line."""
import json
import subprocess
import sys

import torch

import permgraph as pg
from permgraph.cli import main
from permgraph.testing.zoo import build


def test_meta_device_compiles_to_the_same_spec():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cfg)
    cpu_model = LlamaForCausalLM(cfg)
    a, b = pg.compile(meta_model), pg.compile(cpu_model)
    assert all(p.is_meta for p in meta_model.parameters())
    assert json.loads(a.to_json())["groups"] == json.loads(b.to_json())["groups"]
    assert a.axes == b.axes


def test_meta_device_decoder_with_cross_attention_compiles_to_the_same_spec():
    """Derived inputs probe the forward (random encoder states kept when the outputs change); on the
    meta device there are no values to compare, and the spec must still be the one real weights give."""
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, is_decoder=True, add_cross_attention=True)
    with torch.device("meta"):
        meta_model = BertLMHeadModel(cfg)
    a, b = pg.compile(meta_model), pg.compile(BertLMHeadModel(cfg))
    assert json.loads(a.to_json())["groups"] == json.loads(b.to_json())["groups"]
    assert a.axes == b.axes and a.covered_fraction() > 0.99


def factory():
    zm = build("nanogpt")
    return zm.model, zm.inputs


def test_cli_explain_compile_verify(tmp_path, capsys):
    ref = "test_meta_and_cli:factory"
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    assert main(["explain", ref]) == 0
    assert "residual" in capsys.readouterr().out
    out = tmp_path / "spec.json"
    assert main(["compile", ref, "--out", str(out)]) == 0
    spec = pg.PermSpec.from_json(out.read_text())
    assert spec.groups
    assert main(["compile", ref, "--out", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["explain", str(out)]) == 0
    assert main(["verify", ref, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["ok"] and rep["max_rel_error"] < 1e-12


def test_cli_bad_model_reference(capsys):
    assert main(["explain", "/no/such/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", "nosuchmodule:fn"]) == 2
    assert "cannot import factory" in capsys.readouterr().err


def test_cli_transformers_folder(tmp_path, capsys):
    zm = build("llama")
    zm.model.save_pretrained(tmp_path / "llama")
    assert main(["verify", str(tmp_path / "llama")]) == 0
    assert "verify OK" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "llama"), "--exact", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["ok"] and rep["tolerance"] == 1e-10 and rep["max_rel_error"] < 1e-12


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "permgraph", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "explain" in r.stdout and "Exit codes" in r.stdout
