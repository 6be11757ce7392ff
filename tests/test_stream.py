"""Streaming transport (permgraph.stream, permgraph.shards): bit-identical to pg.transport, sharded
output that from_pretrained loads, and the faults of long runs (missing or changing shards, a full
disk, NaN mid-stream) leave nothing behind with exit code 2."""
import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import permgraph as pg
from permgraph import shards, stream
from permgraph.cli import main

TMP_GLOB = ".*permgraph-*"


def tiny(tied: bool, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_moe(seed: int):
    """A one-layer Mixtral: 4 experts, top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=60, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def releases(root, tied: bool, dtype: torch.dtype, sharded: bool):
    """A, A_ft, B (a permutation of A plus noise) and the alignment file; B sharded if asked."""
    a = tiny(tied, dtype, 0)
    spec = pg.compile(tiny(tied, torch.float32, 0))
    perm = spec.random_permutation(3)
    ft, b = tiny(tied, dtype, 0), tiny(tied, dtype, 0)
    ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in a.state_dict().items()})
    moved = pg.apply_permutation(spec, perm, a.state_dict())
    b.load_state_dict({k: v + 0.001 * torch.randn_like(v) for k, v in moved.items()})
    kw = {"max_shard_size": "20KB"} if sharded else {}
    a.save_pretrained(root / "A", **kw)
    ft.save_pretrained(root / "A_ft")
    b.save_pretrained(root / "B", **kw)
    (root / "B" / "tokenizer_config.json").write_text("{}")
    al = pg.Alignment(perm, spec)
    (root / "al.json").write_text(al.to_json())
    return a, ft, b, al


def transport_args(root, out, *extra):
    return ["transport", "--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"), "--base-new",
            str(root / "B"), "--out", str(out), "--permutation", str(root / "al.json"), "-q", *extra]


def read_all(path) -> dict:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharded, tied", [(False, False), (True, False), (True, True)])
def test_streaming_equals_in_memory_and_loads(tmp_path, dtype, sharded, tied):
    a, ft, b, al = releases(tmp_path, tied, dtype, sharded)
    out = tmp_path / "out"
    assert main(transport_args(tmp_path, out, "--max-shard-size", "30KB", "--alpha", "0.7")) == 0
    ref = pg.transport(a, ft, b, al, alpha=0.7)
    got = read_all(out)
    assert set(got) == set(read_all(tmp_path / "B"))  # what B's checkpoint holds (tied names dropped)
    for k, v in got.items():
        assert v.dtype == dtype and torch.equal(v, ref[k]), k
    index = json.loads((out / shards.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and (out / "tokenizer_config.json").exists()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    loaded = LlamaForCausalLM.from_pretrained(out, dtype=dtype).state_dict()
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k


def test_single_file_output_and_unsharded_default(tmp_path):
    a, ft, b, al = releases(tmp_path, False, torch.float32, True)
    assert main(transport_args(tmp_path, tmp_path / "o.safetensors")) == 0
    assert main(transport_args(tmp_path, tmp_path / "o")) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.safetensors")) == ["model.safetensors"]
    ref = pg.transport(a, ft, b, al)
    for got in (read_all(tmp_path / "o.safetensors"), read_all(tmp_path / "o")):
        assert all(torch.equal(v, ref[k]) for k, v in got.items())


def test_soft_plans_stream_as_in_memory(tmp_path):
    a, ft, b, al = releases(tmp_path, False, torch.float32, False)
    g = next(n for n, grp in al.spec.groups.items() if not grp.ctx)
    n = al.spec.groups[g].size
    t = torch.rand(n, n, dtype=torch.float64)
    soft = pg.Alignment(al.permutation, al.spec, function_preserving=False, soft={g: t / t.sum(1, keepdim=True)})
    (tmp_path / "al.json").write_text(soft.to_json())
    assert main(transport_args(tmp_path, tmp_path / "o", "--allow-non-preserving")) == 0
    ref = pg.transport(a, ft, b, pg.Alignment.from_json(soft.to_json()), allow_non_preserving=True)
    assert all(torch.equal(v, ref[k]) for k, v in read_all(tmp_path / "o").items())


def test_shard_writer_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.zeros(0, 4),
               "d": torch.tensor([True, False])}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    w = shards.ShardWriter(tmp_path / "x.safetensors", specs, {"format": "pt"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    got = read_all(tmp_path / "x.safetensors")
    ck = shards.Checkpoint(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], v) and torch.equal(ck.read(k), v) for k, v in tensors.items())
    assert shards.parse_size("5GB") == 5 * 10 ** 9 and shards.parse_size("1MiB") == 1 << 20
    assert shards.plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


# -- faults ------------------------------------------------------------------------------------

@pytest.fixture
def rel(tmp_path):
    releases(tmp_path, False, torch.float32, True)
    return tmp_path


def refused(rel, argv, capsys, match):
    out = rel / "o"
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert not out.exists() and not list(rel.glob(TMP_GLOB))
    return err


def test_missing_shard_is_named_before_any_work(rel, capsys):
    victim = sorted((rel / "B").glob("model-*.safetensors"))[1]
    victim.unlink()
    refused(rel, transport_args(rel, rel / "o"), capsys, victim.name)


def test_shard_that_changes_during_the_run(rel, capsys, monkeypatch):
    real = stream._one
    victim = sorted((rel / "A").glob("model-*.safetensors"))[0]

    def touching(*a, **kw):
        os.utime(victim, ns=(1, 1))
        return real(*a, **kw)

    monkeypatch.setattr(stream, "_one", touching)
    refused(rel, transport_args(rel, rel / "o"), capsys, "changed while permgraph was reading")


def test_full_disk_leaves_nothing(rel, capsys, monkeypatch):
    calls, real = [], shards.ShardWriter.write

    def full(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", full)
    refused(rel, transport_args(rel, rel / "o", "--max-shard-size", "10KB"), capsys, "nothing was written")


def test_nan_in_the_last_tensor_leaves_nothing(rel, capsys):
    from safetensors.torch import load_file, save_file

    last = sorted((rel / "A_ft").glob("*.safetensors"))[-1]
    state = load_file(str(last))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(last), metadata={"format": "pt"})
    refused(rel, transport_args(rel, rel / "o"), capsys, "NaN or inf")


def test_new_head_falls_back_to_memory(rel, capsys):
    from safetensors.torch import load_file, save_file

    f = rel / "A_ft" / "model.safetensors"
    state = load_file(str(f))
    state["score.weight"] = torch.zeros(3, 32)
    save_file(state, str(f), metadata={"format": "pt"})
    spec = pg.Alignment.from_json((rel / "al.json").read_text()).spec
    with pytest.raises(stream.NotStreamable, match="score.weight"):
        stream.prepare(str(rel / "A"), [str(f)], str(rel / "B"), spec, 1.0)


# -- chunked computation -----------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 45, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks_equal_in_memory(tmp_path, monkeypatch, chunk, dtype):
    """Small chunks split every tensor into many row blocks (permuted and unpermuted dim 0, 1-D
    norms): still bit-identical, with two fine-tunes summed and alpha patterns."""
    monkeypatch.setattr(stream, "CHUNK", chunk)
    a, ft, b, al = releases(tmp_path, True, dtype, True)
    ft2 = tiny(True, dtype, 0)
    ft2.load_state_dict({k: v - 0.03 * torch.randn_like(v) for k, v in a.state_dict().items()})
    ft2.save_pretrained(tmp_path / "A_ft2")
    argv = transport_args(tmp_path, tmp_path / "o", "--alpha", "*.mlp.*=0.25,*=1.5")
    argv[argv.index(str(tmp_path / "A_ft")) + 1:argv.index(str(tmp_path / "A_ft")) + 1] = [str(tmp_path / "A_ft2")]
    assert main(argv) == 0
    ref = pg.transport(a, [ft, ft2], b, al, alpha={"*.mlp.*": 0.25, "*": 1.5})
    got = read_all(tmp_path / "o")
    assert got and all(torch.equal(v, ref[k]) for k, v in got.items())
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(got[up], b.state_dict()[up])


def test_permutation_checked_once_and_indices_reused(tmp_path, monkeypatch):
    _, _, _, al = releases(tmp_path, False, torch.float32, False)
    calls = {"check": 0, "index": 0}
    real_check, real_index = stream.check_permutation, stream.axis_index

    def check(*a):
        calls["check"] += 1
        return real_check(*a)

    def index(*a):
        calls["index"] += 1
        return real_index(*a)

    monkeypatch.setattr(stream, "check_permutation", check)
    monkeypatch.setattr(stream, "axis_index", index)
    maps = []
    monkeypatch.setattr(stream, "map_threshold", maps.append)
    threads = torch.get_num_threads()
    assert main(transport_args(tmp_path, tmp_path / "o")) == 0
    trees = {t for ts in al.spec.axes.values() for t in ts if t.groups()}
    assert calls == {"check": 1, "index": len(trees)} and len(trees) < len(al.spec.axes)
    assert torch.get_num_threads() == threads  # restored after the run
    assert maps == [stream.LARGE_MAPS]  # chunk temporaries reuse heap memory


def test_huge_finite_values_are_not_refused(tmp_path, monkeypatch):
    """1e30 squared overflows float32: the cheap finiteness test fails, the exact one passes."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(stream, "CHUNK", 64)
    a, ft, b, al = releases(tmp_path, False, torch.float32, False)
    for who, sign in (("A", 1), ("A_ft", -1)):
        f = tmp_path / who / "model.safetensors"
        state = load_file(str(f))
        state["model.layers.1.mlp.down_proj.weight"][3, :5] = sign * 1e30
        save_file(state, str(f), metadata={"format": "pt"})
    assert main(transport_args(tmp_path, tmp_path / "o")) == 0
    ref = pg.transport(load_file(str(tmp_path / "A" / "model.safetensors")),
                       load_file(str(tmp_path / "A_ft" / "model.safetensors")), b.state_dict(), al)
    got = read_all(tmp_path / "o")
    assert all(torch.equal(v, ref[k]) for k, v in got.items())
    assert got["model.layers.1.mlp.down_proj.weight"].abs().max() > 1e29


def test_inf_in_base_b_is_named(rel, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(stream, "CHUNK", 64)
    f = sorted((rel / "B").glob("model-*.safetensors"))[-1]
    state = load_file(str(f))
    name = sorted(state)[0]
    state[name].view(-1)[-1] = float("-inf")
    save_file(state, str(f), metadata={"format": "pt"})
    err = refused(rel, transport_args(rel, rel / "o"), capsys, "base B")
    assert name in err


def test_row_reads_and_block_writes(tmp_path):
    x = torch.randn(7, 3, 2).to(torch.bfloat16)
    specs = {"x": (x.dtype, tuple(x.shape)), "s": (torch.float32, ()), "e": (torch.float32, (0, 5))}
    w = shards.ShardWriter(tmp_path / "x.safetensors", specs, {})
    w.write("x", iter([x[:2], x[2:3], x[3:]]))
    w.write("s", iter([torch.tensor(2.5)]))
    w.write("e", iter([]))
    w.close()
    ck = shards.Checkpoint(tmp_path / "x.safetensors")
    buf = torch.empty(1000, dtype=torch.uint8)
    assert torch.equal(ck.read("x"), x) and torch.equal(ck.read("x", (2, 6), buf), x[2:6])
    assert ck.read("s", (0, 1)).item() == 2.5 and ck.read("e", (0, 0)).shape == (0, 5)
    with pytest.raises(IndexError):
        ck.read("x", (5, 8))
    w = shards.ShardWriter(tmp_path / "y.safetensors", {"x": specs["x"]}, {})
    with pytest.raises(RuntimeError, match="got 6 rows, expected 7"):
        w.write("x", iter([x[:6]]))
    w = shards.ShardWriter(tmp_path / "z.safetensors", {"x": specs["x"]}, {})
    with pytest.raises(RuntimeError, match="a block of 'x'"):
        w.write("x", iter([x[:2].float()]))


def test_checkpoint_that_transformers_converts_on_load_is_transported_in_memory(tmp_path, capsys):
    """save_pretrained writes Mixtral in the hub's layout (experts.N.w1/w2/w3, block_sparse_moe), which
    from_pretrained merges into expert banks: not streamable tensor by tensor, so transported in memory
    (said on stderr), written back in that layout, and equal to pg.transport."""
    a, ft, b = tiny_moe(0), tiny_moe(0), tiny_moe(0)
    spec = pg.compile(a)
    perm = spec.random_permutation(5)
    ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in a.state_dict().items()})
    b.load_state_dict(pg.apply_permutation(spec, perm, a.state_dict()))
    for name, m in (("A", a), ("A_ft", ft), ("B", b)):
        m.save_pretrained(tmp_path / name)
    assert any(".experts.0.w1." in k for k in read_all(tmp_path / "A"))  # the converted layout on disk
    (tmp_path / "al.json").write_text(pg.Alignment(perm, spec).to_json())
    assert main(transport_args(tmp_path, tmp_path / "o")[:-1]) == 0
    assert "converts when loading" in capsys.readouterr().err
    ref = pg.transport(a, ft, b, pg.Alignment(perm, spec))
    loaded = type(b).from_pretrained(tmp_path / "o").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())
    assert set(read_all(tmp_path / "o")) == set(read_all(tmp_path / "B"))


def test_moe_experts_with_per_expert_units_stream_as_in_memory(tmp_path, monkeypatch):
    """Mixtral's expert tensors are viewed with the expert dim merged into the units' dim (each expert
    permutes its own hidden units): streamed whole, still bit-identical to pg.transport."""
    monkeypatch.setattr(stream, "CHUNK", 64)
    a, ft, b = tiny_moe(0), tiny_moe(0), tiny_moe(0)
    spec = pg.compile(a)
    assert spec.layouts and any(g.ctx for g in spec.groups.values() if g.role == "units")
    perm = spec.random_permutation(5)
    ft.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in a.state_dict().items()})
    b.load_state_dict({k: v + 0.001 * torch.randn_like(v)
                       for k, v in pg.apply_permutation(spec, perm, a.state_dict()).items()})
    from safetensors.torch import save_file

    for name, m in (("A", a), ("A_ft", ft), ("B", b)):  # module names (save_pretrained writes per-expert w1/w2/w3)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    al = pg.Alignment(perm, spec)
    (tmp_path / "al.json").write_text(al.to_json())
    files = {str(tmp_path / n): str(tmp_path / f"{n}.safetensors") for n in ("A", "A_ft", "B")}
    argv = [files.get(x, x) for x in transport_args(tmp_path, tmp_path / "o.safetensors")]
    assert main(argv) == 0
    ref = pg.transport(a, ft, b, al)
    got = read_all(tmp_path / "o.safetensors")
    assert got and all(torch.equal(v, ref[k]) for k, v in got.items() if k in ref)
    up = "model.layers.0.mlp.experts.gate_up_proj"
    assert up in got and not torch.equal(got[up], b.state_dict()[up])
