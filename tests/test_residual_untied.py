"""TransFusion's residual step: untied residual sites (spec, inference, solver, transport, CLI)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import permgraph as pg
from permgraph.errors import FormatError, InputError
from permgraph.infer import residual_shortcuts
from permgraph.permutation import apply_permutation, compose
from permgraph.rewrites import shared_within_head, untied_residual
from permgraph.spec import PermSpec, site_groups
from permgraph.testing import ZOO
from permgraph.trace import trace


def _f64(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _site(spec: PermSpec, param: str, axis: int) -> str:
    (g,) = untied_residual(spec).axes[param][axis].groups()
    return g


# -- what the spec records ------------------------------------------------------------

def test_llama_sites_are_the_residual_addends(zoo_compiled):
    zm, spec = zoo_compiled("llama")
    layers = zm.model.config.num_hidden_layers
    m = "model.layers.{}."
    parent = {s: g for s, g in site_groups(spec).items() if s != g}
    assert set(parent.values()) == {"residual"} and len(parent) == 2 * layers + 1
    assert f"{2 * layers + 1} residual sites" in spec.explain()
    # the stream read by layer l's attention is the one written before it
    assert _site(spec, "model.embed_tokens.weight", 1) == _site(spec, m.format(0) + "input_layernorm.weight", 0) \
        == _site(spec, m.format(0) + "self_attn.q_proj.weight", 1)
    for i in range(layers):
        attn_out = _site(spec, m.format(i) + "self_attn.o_proj.weight", 0)
        assert attn_out == _site(spec, m.format(i) + "post_attention_layernorm.weight", 0) \
            == _site(spec, m.format(i) + "mlp.up_proj.weight", 1)
        mlp_out = _site(spec, m.format(i) + "mlp.down_proj.weight", 0)
        nxt = m.format(i + 1) + "input_layernorm.weight" if i + 1 < layers else "model.norm.weight"
        assert mlp_out == _site(spec, nxt, 0)
        assert len({attn_out, mlp_out, _site(spec, m.format(i) + "self_attn.q_proj.weight", 1)}) == 3


def test_tied_embeddings_tie_the_first_and_last_sites(zoo_compiled):
    zm, spec = zoo_compiled("gpt2")
    first = _site(spec, "transformer.wte.weight", 1)
    assert first == _site(spec, "transformer.ln_f.weight", 0)  # lm_head is wte: one parameter, one site
    assert first != _site(spec, "transformer.h.0.attn.c_proj.weight", 1)


def test_shortcuts_are_additions_through_a_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4, 8))
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            x = x + self.pos                        # independent terms: not a shortcut
            g = x + 0.044715 * x * x * x            # inside an activation: not a shortcut
            return g + self.fc(torch.tanh(g))       # a residual addition

    tr = trace(Net(), (torch.randn(2, 4, 8),))
    adds = [n for n in tr.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    found = residual_shortcuts(tr.graph)
    assert len(found) == 1 and list(found)[0] is adds[-1]


def test_additions_of_data_dependent_sizes_keep_the_residual_sites():
    """Rows picked by a mask have a size known only at run time; an addition that broadcasts a
    one-row branch over them is compared by the sizes' expressions, not guarded on their values
    (MiniCPM-V's packed images: inference of the sites used to fail there)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 4)

        def forward(self, x, keep):
            h = x[keep]                                                  # (u0, 8)
            h = h + self.b(torch.relu(self.a(x.mean(0, keepdim=True))))  # (u0, 8) + (1, 8)
            return self.out(h).sum(0)

    torch.manual_seed(0)
    model, x = Net().double(), torch.randn(6, 8, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    spec = pg.compile(model, (x, keep))
    assert "residual_sites_missing" not in spec.info
    (hidden,) = spec.axes["a.weight"][0].groups()  # the branch's hidden units move together
    assert spec.axes["b.weight"][1].groups() == [hidden]
    assert pg.verify(model, spec, (x, keep)).ok


def test_spec_json_keeps_sites_and_validates_them(zoo_compiled):
    _, spec = zoo_compiled("llama")
    back = PermSpec.from_json(spec.to_json())
    assert back.residual_sites == spec.residual_sites
    d = json.loads(spec.to_json())
    p = next(iter(d["residual_sites"]))
    d["residual_sites"][p] = [["g", "model.layers.0.mlp"] for _ in d["residual_sites"][p]]
    with pytest.raises(FormatError, match="residual site|axis tree"):
        PermSpec.from_dict(d)
    del d["residual_sites"]
    old = PermSpec.from_dict(d)
    with pytest.raises(InputError, match="compile it again"):
        untied_residual(old)


# -- what the untied space is ---------------------------------------------------------------

class PreLN(nn.Module):
    """Pre-LN residual MLP blocks, written out so the shortcut matrices can be inserted."""

    def __init__(self, d=12, h=20, blocks=3, n_in=7, n_out=5):
        super().__init__()
        self.inp = nn.Linear(n_in, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(d, h) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(h, d) for _ in range(blocks))
        self.out = nn.Linear(d, n_out)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.3)

    def forward(self, x, shortcut=None):
        x = self.inp(x)
        for i in range(len(self.fc1)):
            y = self.fc2[i](torch.relu(self.fc1[i](self.ln[i](x))))
            x = (x if shortcut is None else shortcut(i, x)) + y
        return self.out(x)


def test_untied_permutation_preserves_the_function_with_shortcut_permutations():
    """The paper's claim (App. A.3): with every residual addend permuted on its own, pi(A) computes A's
    function once each identity shortcut becomes P_out P_in^T; without them it does not."""
    torch.manual_seed(0)
    model = PreLN().double().eval()
    x = torch.randn(6, 7, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    untied = untied_residual(spec)
    perm = untied.random_permutation(5)
    moved = PreLN().double().eval()
    moved.load_state_dict(apply_permutation(untied, perm, model.state_dict()))

    def site(p):
        (g,) = untied.axes[p][0].groups()
        return perm[g]

    def shortcut(i, h):  # h is in the basis of block i's input; the sum is in fc2's output basis
        p_in = site(f"ln.{i}.weight") if i else site("inp.weight")
        p_out = site(f"fc2.{i}.weight")
        return h[:, torch.argsort(p_in)[p_out]]

    ref = model(x)
    torch.testing.assert_close(moved(x, shortcut), ref, rtol=1e-12, atol=1e-12)
    assert (moved(x) - ref).abs().max() > 1e-3  # the plain architecture changes


@pytest.mark.parametrize("name", sorted(ZOO))
def test_untied_with_sites_at_their_stream_permutation_is_the_tied_permutation(zoo_compiled, name):
    zm, spec = zoo_compiled(name)
    assert spec.residual_sites, spec.info.get("residual_sites_missing")
    untied, parent = untied_residual(spec), site_groups(spec)
    assert len(untied.groups) > len(spec.groups)  # every zoo model has residual additions
    tied = spec.random_permutation(1)
    lifted = pg.Permutation({g: tied[parent.get(g, g)] for g in untied.groups})
    sd = zm.model.state_dict()
    a, b = apply_permutation(spec, tied, sd), apply_permutation(untied, lifted, sd)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- solving -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "mixtral"])
def test_weight_matching_recovers_planted_untied_permutations(zoo_compiled, name):
    zm, spec = zoo_compiled(name)
    untied = untied_residual(spec)
    a = _f64(zm.model.state_dict())
    planted = untied.random_permutation(4)
    al = pg.align(a, apply_permutation(untied, planted, a), spec, residual="untied")
    assert al.spec.info.get("residual") == "untied" and not al.function_preserving and al.carries_task_vectors()
    assert al.permutation.equal(planted), [g for g in untied.groups if not torch.equal(al.permutation[g], planted[g])]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_transfusion_recovers_planted_untied_permutations_of_its_space(zoo_compiled, name):
    zm, spec = zoo_compiled(name)
    untied = untied_residual(spec)
    shared = shared_within_head(untied)
    a = _f64(zm.model.state_dict())
    planted = shared.random_permutation(6)
    b = apply_permutation(shared, planted, a)
    al = pg.align(a, b, spec, solver="transfusion", residual="untied")
    moved = apply_permutation(al.spec, al.permutation, a)
    assert all(torch.equal(moved[k], b[k]) for k in b)


def test_untied_objective_is_never_below_the_tied_one(zoo_compiled):
    zm, spec = zoo_compiled("bert")
    from permgraph.testing import build

    a = _f64(zm.model.state_dict())
    b = _f64(build("bert", seed=1).model.state_dict())
    tied = pg.align(a, b, spec)
    untied = pg.align(a, b, spec, residual="untied")
    assert untied.settings["objective_tied"] == pytest.approx(tied.history[-1])
    assert untied.history[-1] >= tied.history[-1] - 1e-6
    assert set(untied.settings["objective_by_start"]) == {"tied", "unit features"}


def test_compose_applies_first_then_second(zoo_compiled):
    zm, spec = zoo_compiled("t5")  # heads with within-head context groups
    f, s = spec.random_permutation(1), spec.random_permutation(2)
    sd = zm.model.state_dict()
    x = apply_permutation(spec, s, apply_permutation(spec, f, sd))
    y = apply_permutation(spec, compose(spec, f, s), sd)
    assert all(torch.equal(x[k], y[k]) for k in x)


# -- using the result --------------------------------------------------------------------------

def test_untied_alignment_is_refused_for_models_and_carried_for_task_vectors(zoo_compiled):
    zm, spec = zoo_compiled("llama")
    a = _f64(zm.model.state_dict())
    untied = untied_residual(spec)
    b = apply_permutation(untied, untied.random_permutation(2), a)
    al = pg.align(a, b, spec, residual="untied")
    with pytest.raises(InputError, match="untied residual"):
        pg.apply_alignment(al, a)
    assert set(pg.apply_alignment(al, a, allow_non_preserving=True)) == set(a)
    tau = {k: torch.randn_like(v) * 0.01 if v.is_floating_point() else v for k, v in a.items()}
    ft = {k: a[k] + tau[k] if a[k].is_floating_point() else a[k] for k in a}
    out = pg.transport(a, ft, b, al)  # accepted without allow_non_preserving: its intended use
    want = apply_permutation(al.spec, al.permutation, tau)
    for k in out:
        if a[k].is_floating_point():
            torch.testing.assert_close(out[k], b[k] + want[k])
    back = pg.Alignment.from_json(al.to_json())
    assert back.untied_residual and back.carries_task_vectors() and back.permutation.equal(al.permutation)
    assert "untied residual" in al.summary()


def test_bad_residual_option_is_an_input_error(zoo_compiled):
    zm, spec = zoo_compiled("llama")
    sd = zm.model.state_dict()
    with pytest.raises(InputError, match="residual must be"):
        pg.align(sd, sd, spec, residual="loose")


def test_cli_align_and_transport_with_untied_residual(tmp_path, capsys):
    from permgraph.cli import main
    from permgraph.testing import build

    a = build("llama").model
    spec = pg.compile(a)
    untied = untied_residual(spec)
    a.save_pretrained(tmp_path / "A")
    ft = build("llama").model
    ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in a.state_dict().items()})
    ft.save_pretrained(tmp_path / "A_ft")
    b = build("llama").model
    b.load_state_dict(apply_permutation(untied, untied.random_permutation(3), a.state_dict()))
    b.save_pretrained(tmp_path / "B")
    al_file = tmp_path / "al.json"
    assert main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(al_file), "-q",
                 "--residual", "untied", "--device", "cpu"]) == 0
    al = pg.Alignment.from_json(al_file.read_text())
    assert al.untied_residual and not al.function_preserving
    out = tmp_path / "B_ft"
    assert main(["transport", "--base-old", str(tmp_path / "A"), "--finetuned", str(tmp_path / "A_ft"),
                 "--base-new", str(tmp_path / "B"), "--out", str(out), "--permutation", str(al_file), "-q"]) == 0
    from transformers import LlamaForCausalLM

    got = LlamaForCausalLM.from_pretrained(out).state_dict()
    sa, sft, sb = a.state_dict(), ft.state_dict(), b.state_dict()
    want = apply_permutation(al.spec, al.permutation, {k: sft[k] - sa[k] for k in sa})
    for k in sb:
        torch.testing.assert_close(got[k], sb[k] + want[k])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "x.json"),
              "--residual", "loose"])
    code = main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "x.json"),
                 "--workers", "-1"])
    assert code == 2 and "workers must be" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "x.json"),
                     "--device", "cuda"])
        assert code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
