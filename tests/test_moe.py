"""Mixture of experts: each expert permutes its own hidden units (a group whose context, the expert
group, is another dim of the same parameters: layouts), only where every op keeps the units per
expert; and the views (layouts) round-trip through apply, JSON and the checks."""
import pytest
import torch

import permgraph as pg
from permgraph.errors import FormatError
from permgraph.ir import from_view, to_view


class TinyMoE(torch.nn.Module):
    """Top-2 routing over 4 experts, batched like transformers' ``batched_mm`` experts: each token's
    rows of the expert banks are gathered by the router's indices. ``variant`` adds an op that
    treats the hidden units alike across experts (``shared``: one scale vector for all experts) or
    moves rows away from the expert that selected them (``flip``); either must keep the units shared."""

    def __init__(self, d: int = 8, hidden: int = 6, experts: int = 4, variant: str = "") -> None:
        super().__init__()
        self.router = torch.nn.Linear(d, experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(experts, hidden, d))  # (E, I, D)
        self.b1 = torch.nn.Parameter(torch.randn(experts, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(experts, d, hidden))  # (E, D, I)
        self.scale = torch.nn.Parameter(torch.randn(hidden)) if variant == "shared" else None
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        logits = self.router(x)
        if self.variant == "grouped":  # DeepSeek-V3's group-limited routing: experts in the best group only
            best = logits.view(t, 2, -1).amax(-1).topk(1, dim=-1).indices
            keep = torch.zeros(t, 2, dtype=x.dtype).scatter(1, best, 1.0)
            keep = keep.unsqueeze(-1).expand(t, 2, logits.shape[-1] // 2).reshape(t, -1)
            logits = logits.masked_fill(keep == 0, -1e9)
        weights, idx = logits.topk(2, dim=-1)
        ids = idx.reshape(-1)
        rows = x.repeat_interleave(2, dim=0)
        h = torch.bmm(self.w1[ids], rows.unsqueeze(-1)).squeeze(-1) + self.b1[ids]
        h = torch.tanh(h)
        if self.scale is not None:
            h = h * self.scale
        if self.variant == "flip":
            h = h.flip(0)
        y = torch.bmm(self.w2[ids], h.unsqueeze(-1)).squeeze(-1)
        return (y * weights.softmax(-1).reshape(-1, 1)).view(t, 2, d).sum(1)


def _moe(variant: str = "") -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyMoE(variant=variant).double().eval(), torch.randn(5, 8, dtype=torch.float64)


def _units(spec: pg.PermSpec) -> pg.spec.Group:
    (units,) = [g for g in spec.groups.values() if g.size == 6]
    return units


def test_each_expert_permutes_its_own_units():
    model, x = _moe()
    spec = pg.compile(model, (x,))
    experts = next(g for g in spec.groups.values() if g.role == "experts")
    units = _units(spec)
    assert units.ctx == (experts.name,) and units.role == "units" and spec.perm_shape(units.name) == (4, 6)
    assert spec.layouts == {"w1": ((0, 1), (2,)), "b1": ((0, 1),), "w2": ((0, 2), (1,))}
    perm = spec.random_permutation(1)
    assert len({tuple(r.tolist()) for r in perm[units.name]}) > 1  # the experts' units move differently
    for seed in range(3):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok
    assert "units per experts" in pg.explain(spec) and "w1[0*1]" in pg.explain(spec)


def test_grouped_routing_refines_experts_and_units_follow_both():
    """Group-limited routing views the experts as (groups, experts per group): two expert groups
    (the second per group), and each expert's units take both as context."""
    model, x = _moe("grouped")
    spec = pg.compile(model, (x,))
    experts = [g.name for g in spec.groups.values() if g.role == "experts"]
    units = _units(spec)
    assert len(experts) == 2 and set(units.ctx) == set(experts) and spec.perm_shape(units.name) == (2, 2, 6)
    for seed in range(3):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok


@pytest.mark.parametrize("variant", ["shared", "flip"])
def test_units_stay_shared_where_an_op_treats_them_alike_across_experts(variant):
    model, x = _moe(variant)
    spec = pg.compile(model, (x,))
    assert _units(spec).ctx == () and not spec.layouts
    assert any(g.role == "experts" for g in spec.groups.values())  # the experts still move whole
    for seed in range(3):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok


def test_per_expert_units_would_change_the_shared_scale_model():
    """The check above can fail: the per-expert spec of the plain model, applied to the model with one
    scale vector for all experts (the scale left in place), changes its function."""
    plain, x = _moe()
    spec = pg.compile(plain, (x,))
    shared, _ = _moe("shared")
    shared.load_state_dict({**plain.state_dict(), "scale": shared.scale.detach()})
    perm = spec.random_permutation(2)
    moved = pg.apply_permutation(spec, perm, shared.state_dict())
    before = shared(x)
    shared.load_state_dict(moved)
    assert (shared(x) - before).abs().max() > 1e-3


def test_planted_per_expert_permutation_is_recovered():
    from permgraph.testing.zoo import build

    zm = build("mixtral")
    spec = pg.compile(zm.model)
    units = [g for g in spec.groups.values() if g.role == "units"]
    assert len(units) == 2 and all(len(g.ctx) == 1 for g in units)
    sa = zm.model.state_dict()
    sb = pg.apply_permutation(spec, spec.random_permutation(7), sa)
    for solver in ("weight_matching", "transfusion", "wm_brute", "ot"):
        al = pg.align(sa, sb, spec, solver=solver)
        out = pg.apply_permutation(al.spec, al.permutation, sa)
        assert all(torch.equal(out[k], sb[k]) for k in sb), solver


def test_views_round_trip_and_apply_in_either_shape():
    model, x = _moe()
    spec = pg.compile(model, (x,))
    w = model.w1.detach()
    assert torch.equal(from_view(to_view(w, spec.layouts["w1"]), spec.layouts["w1"], tuple(w.shape)), w)
    assert spec.view_shape("w2") == (4 * 6, 8) and spec.to_view("w2", model.w2).shape == (24, 8)
    perm = spec.random_permutation(3)
    real = pg.apply_permutation(spec, perm, {"w2": model.w2.detach()})["w2"]
    viewed = pg.apply_permutation(spec, perm, {"w2": spec.to_view("w2", model.w2.detach())})["w2"]
    assert torch.equal(spec.to_view("w2", real), viewed)
    with pytest.raises(pg.errors.InputError, match="same architecture"):
        pg.apply_permutation(spec, perm, {"w2": model.w2.detach()[:, :, :3]})
    again = pg.PermSpec.from_json(spec.to_json())
    assert again.layouts == spec.layouts
    assert pg.apply_permutation(again, perm, {"w2": model.w2.detach()})["w2"].equal(real)


@pytest.mark.parametrize("layout, match", [
    ([[0, 1]], "partition"),             # dim 2 missing
    ([[0, 1], [1, 2]], "partition"),     # dim 1 twice
    ([[0, 1], ["2"]], "partition"),      # not an integer
    ([[0, 2], [1]], "tree covers"),      # a partition, but the trees describe the other view
])
def test_corrupt_layouts_are_refused(layout, match):
    import json

    model, x = _moe()
    d = json.loads(pg.compile(model, (x,)).to_json())
    d["layouts"]["w1"] = layout
    with pytest.raises(FormatError, match=match):
        pg.PermSpec.from_json(json.dumps(d))


def test_default_solver_recovers_a_planted_permutation_of_a_deeper_moe():
    """Four layers, eight experts: coordinate descent from the identity used to stop with the
    residual wrong (each expert's units chasing it); the warm start without the expert banks
    aligns the residual first."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=100, hidden_size=96, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)).eval()
    model.set_experts_implementation("batched_mm")
    spec = pg.compile(model)
    sa = model.state_dict()
    for seed in (0, 1):  # seed 1's sweep order ended with the residual wrong before the warm start
        sb = pg.apply_permutation(spec, spec.random_permutation(seed), sa)
        al = pg.align(sa, sb, spec, seed=seed)
        out = pg.apply_permutation(spec, al.permutation, sa)
        assert all(torch.equal(out[k], sb[k]) for k in sb), (seed, al.summary())


def test_llama4_experts_fed_by_repeat_move_as_a_group_each_with_its_own_units():
    """Llama 4 feeds every expert every token: ``x.repeat(E, 1)`` scaled by the router's scores, viewed as
    ``(E, tokens, hidden)`` for the banks' ``bmm``. The copies' order is free (any order gives the same
    tensor), so the experts move with the router's rows, and each expert permutes its own units."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    model = Llama4ForCausalLM(cfg).eval().double()
    x = torch.randint(0, 128, (2, 7))
    spec = pg.compile(model, (x,))
    experts = [g for g in spec.groups.values() if g.role == "experts"]
    units = [g for g in spec.groups.values() if g.role == "units"]
    assert len(experts) == 2 and all(g.size == 4 for g in experts), spec.explain()
    assert len(units) == 2 and all(len(g.ctx) == 1 and g.ctx[0] in {e.name for e in experts} for g in units)
    router = next(p for p in spec.shapes if p.endswith("layers.0.feed_forward.router.weight"))
    assert len(spec.axes[router][0].groups()) == 1 and spec.axes[router][0].groups()[0] in {e.name for e in experts}
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, promote_float32=True).ok
    sa = model.state_dict()
    sb = pg.apply_permutation(spec, spec.random_permutation(3), sa)
    out = pg.apply_permutation(spec, pg.align(sa, sb, spec).permutation, sa)
    assert all(torch.equal(out[k], sb[k]) for k in sb)


def test_experts_routed_without_top_k_are_named_experts():
    """PhiMoE routes with a sparse mixer (no ``topk``): its experts are still the banks' leading dim, indexing
    each expert's units on a later dim, and are named and typed as experts, not heads."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    torch.manual_seed(0)
    model = PhimoeForCausalLM(PhimoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval().double()
    x = torch.randint(0, 128, (2, 7))
    spec = pg.compile(model, (x,))
    experts = [g for g in spec.groups.values() if g.role == "experts"]
    units = [g for g in spec.groups.values() if g.role == "units"]
    assert [g.size for g in experts] == [4] and experts[0].name.endswith("mlp.experts"), spec.explain()
    assert [g.ctx for g in units] == [(experts[0].name,)]
    assert all(g.role != "heads" or "self_attn" in g.name for g in spec.groups.values())
    assert pg.verify(model, spec, (x,), promote_float32=True).ok


class LoopedMoE(torch.nn.Module):
    """Experts as a ``ModuleList`` of MLPs run in a Python loop, each weighted by its slice of the
    router's top-2 gates (the common hand-written form). The order of experts is a symmetry the
    compiler does not yet infer: the loop reads the gates one position at a time."""

    def __init__(self, d: int = 8, hidden: int = 6, experts: int = 4) -> None:
        super().__init__()
        self.router = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d))
            for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        top, idx = gates.topk(2, dim=-1)
        gates = torch.zeros_like(gates).scatter(-1, idx, top)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            out = out + gates[..., i:i + 1] * expert(x)
        return x + out


def test_looped_experts_keep_their_order_with_a_reason_and_permute_their_own_units():
    torch.manual_seed(0)
    model, x = LoopedMoE().double().eval(), torch.randn(5, 8, dtype=torch.float64)
    spec = pg.compile(model, (x,))
    (router,) = [f for f in spec.fixed if f.param == "router.weight" and f.axis == 0]
    assert router.reasons and "single positions" in router.reasons[0]
    units = [g for g in spec.groups.values() if g.size == 6]
    # one group per expert, each moving its own hidden units, named after its module
    assert sorted(g.name for g in units) == [f"experts.{i}" for i in range(4)]
    assert {m.param for g in units for m in spec.members(g.name)} == {
        f"experts.{i}.{j}.{k}" for i in range(4) for j in (0, 2) for k in ("weight", "bias")} - {
        f"experts.{i}.2.bias" for i in range(4)}
    for seed in range(3):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok
    assert "single positions" in pg.explain(spec)
