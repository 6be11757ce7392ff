"""``permgraph transport --adapter``: LoRA adapters of release A carried to release B from the
command line, as adapters (loadable by PEFT on B) or merged; bad input refused with exit code 2."""
import copy
import hashlib

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import permgraph as pg  # noqa: E402
from permgraph.cli import main  # noqa: E402
from permgraph.testing import build  # noqa: E402


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    """A and B = a planted permutation of A (transformers folders), two random LoRA adapters on A."""
    root = tmp_path_factory.mktemp("adapters")
    a = build("llama").model.eval()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = pg.compile(a)
    b = copy.deepcopy(a)
    b.load_state_dict(pg.apply_permutation(spec, spec.random_permutation(7), a.state_dict()))
    a.save_pretrained(root / "A")
    b.save_pretrained(root / "B")
    for i, targets in enumerate([["q_proj", "v_proj", "o_proj", "down_proj"], ["k_proj", "gate_proj", "up_proj"]]):
        pm = get_peft_model(copy.deepcopy(a), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        pm.save_pretrained(str(root / f"lora{i}"))
    return root, a, b


def logits(model, adapter, x):
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    with torch.no_grad():
        return pm(input_ids=x).logits


def test_two_adapters_share_one_alignment(rel, tmp_path, capsys):
    root, a, b = rel
    before = digest(root)
    outs = [tmp_path / "lora0_B", tmp_path / "lora1_B"]
    code = main(["transport", "--base-old", str(root / "A"), "--base-new", str(root / "B"),
                 "--adapter", str(root / "lora0"), str(root / "lora1"), "--out", *map(str, outs),
                 "--solver", "weight_matching", "-q"])
    assert code == 0, capsys.readouterr().err
    x = torch.randint(0, 60, (2, 9))
    for i, out in enumerate(outs):
        ref = logits(a, root / f"lora{i}", x)
        got = logits(b, out, x)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits(b, root / f"lora{i}", x), ref, atol=1e-2)  # uncarried: wrong
        assert (out / "permgraph_output.json").is_file()
    assert digest(root) == before


def test_merge_writes_b_plus_the_carried_update(rel, tmp_path):
    root, a, b = rel
    out = tmp_path / "merged.safetensors"
    assert main(["transport", "--base-old", str(root / "A"), "--base-new", str(root / "B"), "--adapter",
                 str(root / "lora0"), "--out", str(out), "--merge", "--solver", "weight_matching", "-q"]) == 0
    merged = copy.deepcopy(b)
    merged.load_state_dict(load_file(str(out)), strict=False)
    x = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        got = merged(input_ids=x).logits
    assert torch.allclose(got, logits(a, root / "lora0", x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv, match", [
    (["--out", "o1"], "2 adapters need 2 --out paths"),
    (["--out", "o1", "o2", "--finetuned", "x"], "either --finetuned"),
])
def test_bad_adapter_calls(rel, tmp_path, capsys, monkeypatch, argv, match):
    root, _, _ = rel
    monkeypatch.chdir(tmp_path)
    code = main(["transport", "--base-old", str(root / "A"), "--base-new", str(root / "B"),
                 "--adapter", str(root / "lora0"), str(root / "lora1"), *argv])
    assert code == 2 and match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_not_an_adapter_is_refused(rel, tmp_path, capsys):
    root, _, _ = rel
    out = tmp_path / "o"
    code = main(["transport", "--base-old", str(root / "A"), "--base-new", str(root / "B"),
                 "--adapter", str(root / "A"), "--out", str(out)])
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*permgraph-*"))
