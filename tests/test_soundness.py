"""The core invariant: a random permutation drawn from a spec leaves the outputs unchanged."""
import pytest
import torch

import permgraph as pg
from permgraph.testing.zoo import ZOO


@pytest.fixture(scope="module", params=sorted(ZOO))
def compiled(request, zoo_compiled):
    return zoo_compiled(request.param)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_permutation_preserves_outputs(compiled, seed):
    zm, spec = compiled
    rep = pg.verify(zm.model, spec, zm.inputs, seed=seed, tolerance=zm.tolerance)
    assert rep.ok, f"{zm.name}: {rep}"


def test_permutation_actually_moves_weights(compiled):
    zm, spec = compiled
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in zm.model.state_dict().items()
          if v.is_floating_point()}
    perm = spec.random_permutation(3)
    out = pg.apply_permutation(spec, perm, sd)
    moved = [k for k in sd if not torch.equal(sd[k], out[k])]
    # every parameter with a permuted axis must change (random weights have no ties)
    expect = {k for k in sd if spec.axes_of(k) and any(t.groups() for t in spec.axes_of(k))}
    assert expect and expect <= set(moved) | {k for k in expect if sd[k].numel() <= 1}


def test_wrong_permutation_is_detected(compiled):
    """verify must be able to fail: permuting one member of a group alone breaks the model."""
    zm, spec = compiled
    group = max(spec.groups.values(), key=lambda g: len(spec.members(g.name)))
    member = next(m for m in spec.members(group.name) if spec.shapes[m.param] and len(spec.shapes[m.param]) == 2)
    sd = {k: v.double() for k, v in zm.model.state_dict().items()}
    n = sd[member.param].shape[member.axis]
    bad = dict(sd)
    for k in sd:  # tied names too, or loading would restore the original
        if spec.canonical(k) == member.param:
            bad[k] = sd[k].roll(1, dims=member.axis)
    model = zm.model.double()
    try:
        model.load_state_dict(bad)
        from permgraph.inputs import resolve_inputs
        from permgraph.verify import _cast, _outputs
        args, kwargs = resolve_inputs(zm.model, zm.inputs)
        args, kwargs = _cast(args, torch.float64), _cast(kwargs, torch.float64)
        keep = set(spec.info["fixed_outputs"])
        after = [x for name, x in _outputs(model, args, kwargs) if name in keep]
        model.load_state_dict(sd)
        before = [x for name, x in _outputs(model, args, kwargs) if name in keep]
        err = max(float((a - b).abs().max()) for a, b in zip(before, after))
        assert n > 1 and err > 1e-6
    finally:
        model.float()


def test_exact_with_float32_casts_promoted(compiled):
    """The spec is exact, not just within float32 rounding: with the graph's casts to float32
    (transformers' RMSNorm, softmax upcasts) promoted to float64, outputs agree to 1e-10."""
    zm, spec = compiled
    rep = pg.verify(zm.model, spec, zm.inputs, seed=2, promote_float32=True)
    assert rep.ok and rep.tolerance == 1e-10, f"{zm.name}: {rep}"
