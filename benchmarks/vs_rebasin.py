"""permgraph vs the PyPI `rebasin` package (0.0.47) on a model it handles: an MLP.

Model B is a planted permutation of model A plus small noise; both tools align
(rebasin permutes B towards A; permgraph finds pi with pi(A) ~ B). Reports wall
time (including tracing / spec building), and whether A's function is preserved
and the planted match recovered. Then tries rebasin on a transformer.
Usage: pip install rebasin==0.0.47 && python benchmarks/vs_rebasin.py
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

import permgraph as pg


def mlp(widths=(784, 1024, 1024, 1024, 10)) -> nn.Module:
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    try:
        from rebasin import PermutationCoordinateDescent
    except ImportError:
        raise SystemExit("pip install rebasin==0.0.47 first") from None
    torch.manual_seed(0)
    x = torch.randn(64, 784)
    a = mlp().eval()
    spec = pg.compile(a, (x,))
    planted = pg.apply_permutation(spec, spec.random_permutation(1), a.state_dict())
    b = mlp().eval()
    b.load_state_dict({k: v + 0.01 * v.std() * torch.randn_like(v) for k, v in planted.items()})
    ref_a, ref_b = a(x), b(x)

    t0 = time.perf_counter()
    spec2 = pg.compile(a, (x,))
    al = pg.align(a, b, spec2, solver="weight_matching")
    ours = time.perf_counter() - t0
    aligned = copy.deepcopy(a)
    aligned.load_state_dict(pg.apply_permutation(spec2, al.permutation, a.state_dict()))
    ours_ok = torch.allclose(aligned(x), ref_a, atol=1e-5)
    ours_dist = sum(float((aligned.state_dict()[k] - b.state_dict()[k]).norm()) for k in planted)

    b2 = copy.deepcopy(b)
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a, b2, x)
    pcd.rebasin()
    theirs = time.perf_counter() - t0
    theirs_ok = torch.allclose(b2(x), ref_b, atol=1e-5)
    theirs_dist = sum(float((b2.state_dict()[k] - a.state_dict()[k]).norm()) for k in planted)
    base = sum(float((b.state_dict()[k] - a.state_dict()[k]).norm()) for k in planted)

    print(f"MLP 784-1024-1024-1024-10, planted permutation + 1% noise, CPU {torch.get_num_threads()} threads")
    print(f"| tool | wall time | function preserved | weight distance after (before {base:.1f}) |")
    print("|---|---|---|---|")
    print(f"| permgraph weight_matching | {ours:.2f} s | {ours_ok} | {ours_dist:.2f} |")
    print(f"| rebasin 0.0.47 PermutationCoordinateDescent | {theirs:.2f} s | {theirs_ok} | {theirs_dist:.2f} |")
    print(f"time ratio rebasin / permgraph: {theirs / ours:.2f}")

    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    ta = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    xs = torch.randn(2, 5, 64)
    spec_t = pg.compile(ta, (xs,))
    tb = copy.deepcopy(ta)  # a planted permutation of A plus 1% noise
    tb.load_state_dict({k: v + 0.01 * v.std() * torch.randn_like(v) if v.numel() > 1 else v for k, v in
                        pg.apply_permutation(spec_t, spec_t.random_permutation(2), ta.state_dict()).items()})
    dist0 = sum(float((tb.state_dict()[k] - ta.state_dict()[k]).norm()) for k in spec_t.shapes)
    with torch.no_grad():
        before = tb(xs)
    w_before = {k: v.clone() for k, v in tb.state_dict().items()}
    try:
        pcd = PermutationCoordinateDescent(ta, tb, xs)
        pcd.rebasin()
        with torch.no_grad():
            err = float((tb(xs) - before).abs().max())
        moved = [k for k, v in tb.state_dict().items() if not torch.equal(v, w_before[k])]
        dist = sum(float((tb.state_dict()[k] - ta.state_dict()[k]).norm()) for k in spec_t.shapes)
        print(f"rebasin on nn.TransformerEncoder (B = planted permutation of A + 1% noise): ran; "
              f"{len(moved)} of {len(w_before)} tensors changed; weight distance {dist0:.2f} -> {dist:.2f}; "
              f"output change of B: {err:.3g}")
    except Exception as e:  # noqa: BLE001 - report whatever rebasin does
        print(f"rebasin on nn.TransformerEncoder: {type(e).__name__}: {str(e)[:200]}")
    al_t = pg.align(ta, tb, spec_t)
    moved_a = pg.apply_alignment(al_t, ta.state_dict())
    dist = sum(float((tb.state_dict()[k] - moved_a[k]).norm()) for k in spec_t.shapes)
    rep = pg.verify(ta, al_t.spec, (xs,), permutation=al_t.permutation)
    print(f"permgraph on the same pair: {al_t.summary()}; weight distance {dist0:.2f} -> {dist:.2f}; {rep}")


if __name__ == "__main__":
    main()
