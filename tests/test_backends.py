"""Every LAP backend returns an optimal assignment, the same as scipy where it is unique."""
import pytest
import torch

from permgraph.backends import available_backends, get_backend

BACKENDS = ["scipy", "lap", "torch"] + (["lapjv"] if "lapjv" in available_backends() else [])


def value(s, p):
    return float(s.gather(-1, p[..., None]).sum())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 200])
def test_random_scores_match_scipy(name, n):
    s = torch.randn(3, n, n, generator=torch.Generator().manual_seed(n))
    ref = get_backend("scipy").solve_batch(s)
    got = get_backend(name).solve_batch(s)
    assert torch.equal(got, ref)
    assert sorted(got[0].tolist()) == list(range(n))


@pytest.mark.parametrize("name", BACKENDS)
def test_structured_tie_free_costs(name):
    # a planted permutation on a noisy diagonal-dominant matrix: unique optimum
    n = 50
    gen = torch.Generator().manual_seed(0)
    p = torch.randperm(n, generator=gen)
    s = torch.rand(n, n, generator=gen) * 0.1
    s[torch.arange(n), p] += 1.0
    assert torch.equal(get_backend(name).solve(s), p)


@pytest.mark.parametrize("name", BACKENDS)
def test_integer_costs_with_ties_reach_the_optimal_value(name):
    s = torch.randint(0, 3, (4, 30, 30), generator=torch.Generator().manual_seed(1)).double()
    ref = get_backend("scipy").solve_batch(s)
    got = get_backend(name).solve_batch(s)
    assert value(s, got) == value(s, ref)


def test_auto_and_errors():
    assert get_backend("auto").name == ("lapjv" if "lapjv" in available_backends() else "scipy")
    assert get_backend("auto", torch.device("cuda")).name == "torch"
    with pytest.raises(ValueError, match="unknown LAP backend"):
        get_backend("nope")
    assert {"scipy", "torch"} <= set(available_backends())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_backend_on_gpu():
    s = torch.randn(8, 128, 128, device="cuda")
    got = get_backend("torch").solve_batch(s)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), get_backend("scipy").solve_batch(s.cpu()))

