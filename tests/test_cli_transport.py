"""The transport command line on transformers folders written here, and its bad-input cases."""
import json

import pytest
import torch

import permgraph as pg
from permgraph.cli import main
from permgraph.testing.zoo import build


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    from transformers import LlamaForCausalLM

    a = build("llama").model
    spec = pg.compile(a)
    a.save_pretrained(root / "A")
    ft = build("llama").model
    ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in a.state_dict().items()})
    ft.save_pretrained(root / "A_ft")
    b = build("llama").model
    b.load_state_dict(pg.apply_permutation(spec, spec.random_permutation(5), a.state_dict()))
    b.save_pretrained(root / "B")
    (root / "B" / "tokenizer_config.json").write_text("{}")
    return root, LlamaForCausalLM


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_transport_round_trip(folders, capsys):
    root, cls = folders
    out = root / "B_ft"
    code = main(["transport", "--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"),
                 "--base-new", str(root / "B"), "--out", str(out), "--solver", "weight_matching", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["function_preserving"] and summary["objective_after"] >= summary["objective_before"]
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    moved = cls.from_pretrained(out).eval()
    ft = cls.from_pretrained(root / "A_ft").eval()
    ids = torch.randint(0, 60, (2, 8))
    assert torch.allclose(logits(moved, ids), logits(ft, ids), atol=1e-4)


def test_align_then_transport_with_saved_alignment(folders, tmp_path):
    root, cls = folders
    al_file = tmp_path / "al.json"
    assert main(["align", str(root / "A"), str(root / "B"), "--out", str(al_file), "-q"]) == 0
    al = pg.Alignment.from_json(al_file.read_text())
    assert al.settings["solver"] == "weight_matching"  # the default
    out = tmp_path / "out.safetensors"
    assert main(["transport", "--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"),
                 "--base-new", str(root / "B"), "--out", str(out), "--permutation", str(al_file), "-q"]) == 0
    from safetensors.torch import load_file

    state = load_file(str(out))
    assert set(state) >= set(cls.from_pretrained(root / "B").state_dict()) - {"lm_head.weight"}


def test_existing_output_needs_force(folders, capsys):
    root, _ = folders
    out = root / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["transport", "--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"),
                 "--base-new", str(root / "B"), "--out", str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_mismatched_architecture_writes_nothing(folders, tmp_path, capsys):
    root, _ = folders
    build("gpt2").model.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    code = main(["transport", "--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"),
                 "--base-new", str(tmp_path / "gpt2"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "base B: missing 'model.embed_tokens.weight'" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_corrupt_and_missing_files(folders, tmp_path, capsys):
    root, _ = folders
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    code = main(["transport", "--base-old", str(root / "A"), "--finetuned", str(bad),
                 "--base-new", str(root / "B"), "--out", str(tmp_path / "o")])
    assert code == 2 and "cannot read weights" in capsys.readouterr().err
    code = main(["transport", "--base-old", str(root / "nope"), "--finetuned", str(root / "A_ft"),
                 "--base-new", str(root / "B"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nan_weights_are_refused(folders, tmp_path, capsys):
    root, _ = folders
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "A_ft" / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    code = main(["transport", "--base-old", str(root / "A"), "--finetuned", str(tmp_path / "nan.safetensors"),
                 "--base-new", str(root / "B"), "--out", str(tmp_path / "o")])
    assert code == 2 and "NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
