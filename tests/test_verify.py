"""pg.verify itself: its float32-promoted mode, and what it refuses."""
import pytest
import torch
import torch.nn as nn

import permgraph as pg
from permgraph.errors import InputError
from permgraph.verify import output_error


class Float32Norm(nn.Module):
    """RMSNorm as transformers writes it: the variance in float32 whatever the model's dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, d: int = 96, h: int = 40, mix=None) -> None:
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(7, d), nn.Linear(d, h), nn.Linear(h, d)
        self.norm, self.head = Float32Norm(d), nn.Linear(d, 3)
        self.mix = mix

    def forward(self, x):
        x = self.inp(x)
        hidden = torch.relu(self.up(x))
        if self.mix is not None:
            hidden = self.mix(hidden)
        return self.head(self.norm(x + self.down(hidden)))


def test_float32_inside_limits_the_plain_check_not_the_promoted_one():
    torch.manual_seed(0)
    model, x = Block(), (torch.randn(64, 7),)
    spec = pg.compile(model, x)
    plain = pg.verify(model, spec, x, seed=1)
    promoted = pg.verify(model, spec, x, seed=1, promote_float32=True)
    assert 1e-12 < plain.max_rel_error < 1e-6  # float32 rounding of the reordered variance sum
    assert promoted.max_rel_error < 1e-14 and promoted.ok
    assert next(model.parameters()).dtype == torch.float32  # the model passed in is not modified


def test_promoted_check_still_fails_a_wrong_spec():
    """A spec compiled for a model whose hidden units are interchangeable, verified on one where
    they are not (a cumulative sum over them): both checks fail, the promoted one too."""
    torch.manual_seed(0)
    x = (torch.randn(64, 7),)
    spec = pg.compile(Block(), x)
    torch.manual_seed(0)
    mixed = Block(mix=lambda h: h.cumsum(-1))
    for promote in (False, True):
        rep = pg.verify(mixed, spec, x, seed=1, promote_float32=promote)
        assert not rep.ok and rep.max_rel_error > 1e-3


def test_non_finite_outputs_are_refused():
    torch.manual_seed(0)
    model, x = Block(), (torch.randn(64, 7),)
    spec = pg.compile(model, x)
    with torch.no_grad():
        model.down.bias[0] = float("nan")
    with pytest.raises(InputError, match="not finite"):
        pg.verify(model, spec, x)


class Filled(nn.Module):
    """A block whose last output column is masked with the dtype's minimum (logits of tokens a model
    never emits, as Chameleon's image tokens)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        cols = torch.arange(out.shape[-1]) == out.shape[-1] - 1
        return out.masked_fill(cols, torch.finfo(out.dtype).min)


def test_fill_values_neither_set_the_scale_nor_hide_an_error():
    """Relative to the largest output magnitude, an error is invisible beside a fill of -1.8e308: the
    fill values are left out of the scale (and must come out identical), so a wrong spec still fails and
    a right one passes as tightly as without them."""
    torch.manual_seed(0)
    x = (torch.randn(64, 7),)
    spec = pg.compile(Filled(Block()), x)
    torch.manual_seed(0)
    right = pg.verify(Filled(Block()), spec, x, seed=1, promote_float32=True)
    assert right.ok and right.max_rel_error < 1e-14 and right.output_scale < 1e3
    torch.manual_seed(0)
    wrong = pg.verify(Filled(Block(mix=lambda h: h.cumsum(-1))), spec, x, seed=1)
    assert not wrong.ok and wrong.max_rel_error > 1e-3
    before = [torch.tensor([1.0, -torch.finfo(torch.float64).max])]
    moved = [torch.tensor([-torch.finfo(torch.float64).max, 1.0])]
    assert output_error(before, moved)[0] == float("inf")  # a fill that moved: not the same function



class Noisy(nn.Module):
    """Samples as VITS and ViT-MAE do: tokens kept in the order of random scores, and noise added to the
    hidden units (the forward is a function of the weights, the input and one random draw)."""

    def __init__(self, noise: float = 0.1) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(6, 24), nn.Linear(24, 6), nn.Linear(6, 2)
        self.noise = noise

    def forward(self, x):
        keep = torch.rand(x.shape[:2]).argsort(-1)[:, :5]  # ViT-MAE's random masking
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        h = torch.relu(self.up(x))
        if self.noise:  # noise on the hidden units: they must stay fixed
            h = h + self.noise * torch.randn_like(h)
        return self.head(torch.tanh(self.down(h)))


def test_a_sampling_forward_is_checked_with_one_draw_for_both_calls():
    torch.manual_seed(0)
    model, x = Noisy().double(), (torch.randn(3, 8, 6, dtype=torch.float64),)
    spec = pg.compile(model, x)
    fixed = {(f.param, f.axis): f.reasons for f in spec.fixed}
    assert any("values vary" in r for r in fixed[("up.weight", 0)]), fixed  # the noise fixes the units
    state = torch.random.get_rng_state()
    rep = pg.verify(model, spec, x, seed=3)
    assert rep.ok and rep.max_rel_error < 1e-12, rep
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    # the same units are a symmetry without the noise, and no symmetry with it: the seeded check tells
    clean = Noisy(noise=0.0).double()
    clean.load_state_dict(model.state_dict())
    units = pg.compile(clean, x)
    assert ("up.weight", 0) not in {(f.param, f.axis) for f in units.fixed}
    assert pg.verify(clean, units, x, seed=3).ok
    assert not pg.verify(model, units, x, seed=3).ok


class DefaultDtypeQueries(nn.Module):
    """DAB-DETR's pattern: ``torch.zeros(shape)`` (torch's default dtype, float32) fed to a layer, and a
    tensor constant made in forward: the model runs in float32 only."""

    def __init__(self, mix=None) -> None:
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(7, 16), nn.Linear(16, 24), nn.Linear(24, 16)
        self.query, self.head = nn.Linear(16, 16), nn.Linear(16, 3)
        self.mix = mix

    def forward(self, x):
        h = self.inp(x)
        hidden = torch.relu(self.up(h))
        h = h + self.down(self.mix(hidden) if self.mix is not None else hidden)
        q = self.query(torch.zeros(h.shape)) * torch.tensor([0.5, 2.0, 1.5, 1.0, 0.25, 3.0, 1.0, 0.75] * 2)
        return self.head(h + q)


def test_a_float32_only_model_is_traced_as_it_runs_then_promoted():
    """Its float64 copy does not run, so the promoted check traces it in float32 and makes every float32
    in the graph float64: casts, dtype-less factories and tensor constants (float64 precision shows);
    a wrong spec still fails."""
    torch.manual_seed(0)
    model, x = DefaultDtypeQueries(), (torch.randn(5, 7),)
    with pytest.raises(RuntimeError, match="dtype"):
        DefaultDtypeQueries().double()(x[0].double())
    spec = pg.compile(model, x)
    assert 24 in spec.sizes.values()
    report = pg.verify(model, spec, x, seed=1, promote_float32=True)
    assert report.ok and report.max_rel_error < 1e-13, report
    assert next(model.parameters()).dtype == torch.float32  # the model passed in is not modified
    torch.manual_seed(0)
    mixed = DefaultDtypeQueries(mix=lambda h: h.cumsum(-1))
    rep = pg.verify(mixed, spec, x, seed=1, promote_float32=True)
    assert not rep.ok and rep.max_rel_error > 1e-3


class VmappedMask(nn.Module):
    """A band mask built with nested ``torch.vmap`` (transformers' or/and mask functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 12), nn.Linear(12, 3)

    def forward(self, x):
        i = torch.arange(x.shape[1])
        band = torch.vmap(torch.vmap(lambda q, k: (q >= k) & (q - k < 3), in_dims=(None, 0)), in_dims=(0, None))
        att = torch.where(band(i, i), 1.0, 0.0).to(x.dtype)
        return self.down(att @ torch.relu(self.up(x)))


def test_a_forward_with_vmap_is_checked_exactly():
    """The traced graph keeps functorch's nesting calls (their results go unused, but the batched calls
    need the levels they open), so its promoted copy runs."""
    torch.manual_seed(0)
    model, x = VmappedMask().double(), (torch.randn(2, 5, 4, dtype=torch.float64),)
    spec = pg.compile(model, x)
    assert 12 in spec.sizes.values()
    report = pg.verify(model, spec, x, seed=1, promote_float32=True)
    assert report.ok and report.max_rel_error < 1e-13, report


class _TwoOutputs(nn.Module):
    """An MLP that returns its hidden units' activations beside the result: freed, that output comes
    out permuted along the hidden group."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x):
        hidden = torch.tanh(self.up(x))
        return {"out": self.down(hidden), "hidden": hidden}


def test_free_outputs_are_checked_permuted_and_a_wrong_output_tree_fails():
    """``compile(outputs=["out"])`` leaves ``hidden`` free: the spec records its trees (batch fixed, the
    units' group) and verify checks ``f(perm(theta))["hidden"] == perm(f(theta)["hidden"])``. An output
    tree that claims no movement, or the wrong group, makes verify fail; the trees survive JSON."""
    from permgraph.ir import Fixed, G

    torch.manual_seed(0)
    model, x = _TwoOutputs().double(), torch.randn(4, 5, dtype=torch.float64)
    spec = pg.compile(model, (x,), outputs=["out"])
    (units,) = spec.groups
    assert spec.outputs == {"hidden": [Fixed(4), G(units)]}
    assert pg.verify(model, spec, (x,), seed=1).max_rel_error < 1e-14
    assert pg.PermSpec.from_json(spec.to_json()).outputs == spec.outputs
    wrong = pg.PermSpec.from_json(spec.to_json())
    wrong.outputs["hidden"] = [Fixed(4), Fixed(12)]  # claims the units stay in place
    assert pg.verify(model, wrong, (x,), seed=1).max_rel_error > 1e-3
    free = pg.compile(model, (x,), outputs=[])  # everything free: both outputs compared permuted
    assert set(free.outputs) == {"out", "hidden"} and free.outputs["out"][0] == Fixed(4)
    assert [free.groups[g].size for g in free.outputs["out"][1].groups()] == [3]  # the outputs move too
    assert pg.verify(model, free, (x,), seed=1).max_rel_error < 1e-14
    nothing = pg.PermSpec.from_json(free.to_json())
    nothing.outputs = {}  # a free output the spec did not type is not compared: nothing left to compare
    assert pg.verify(model, nothing, (x,), seed=1).max_rel_error == 0


def test_a_spec_whose_output_tree_names_an_unknown_group_is_refused():
    from permgraph.errors import FormatError

    model, x = _TwoOutputs().double(), torch.randn(4, 5, dtype=torch.float64)
    text = pg.compile(model, (x,), outputs=["out"]).to_json()
    text = text.replace('"outputs": {', '"outputs": {"x": [["g", "nope"]], ', 1)
    with pytest.raises(FormatError, match="output 'x' dim 0: unknown group 'nope'"):
        pg.PermSpec.from_json(text)


class _NoneBeforeHidden(nn.Module):
    """Returns None ahead of the tensors (a tower's ``hidden_states[0]`` in some forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, x):
        hidden = torch.tanh(self.up(x))
        return {"first": None, "hidden": hidden, "out": self.down(hidden)}


def test_outputs_after_a_none_output_are_fixed_and_typed_by_their_own_position():
    """The exported graph returns a None entry too: the outputs named after it are fixed (and freed)
    by their own position, not their neighbour's (fixing ``hidden`` fixed ``out`` before)."""
    from permgraph.ir import Fixed

    torch.manual_seed(0)
    model, x = _NoneBeforeHidden().double(), torch.randn(4, 5, dtype=torch.float64)
    spec = pg.compile(model, (x,), outputs=["hidden"])
    assert spec.info["outputs"] == ["hidden", "out"]  # the None entry is not an output to keep
    assert all(isinstance(t, Fixed) for t in spec.axes["up.weight"])  # the units are an output: fixed
    assert pg.verify(model, spec, (x,), seed=1).max_rel_error < 1e-14
    free = pg.compile(model, (x,), outputs=["out"])
    assert set(free.outputs) == {"hidden"} and len(free.groups) == 1
    assert "outputs kept unchanged: out; free (may come out permuted; verify compares them permuted): hidden" \
        in pg.explain(free)
    assert pg.verify(model, free, (x,), seed=1).max_rel_error < 1e-14
