"""Which function-preserving weight-based method to default to: the loss barrier between
pi(A) and B on sklearn digits for several seeds (independent releases A and B per seed).

    python benchmarks/default_solver.py --seeds 0 1 2 3 4

Prints one row per method (barrier per seed, mean); lower is better. Trains small PatchViTs
(examples/digits_demo.py's model and recipe, 60 epochs); about a minute per seed on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import permgraph as pg
from permgraph.testing.zoo import PatchViT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from experiments import barrier, digits, train  # noqa: E402

METHODS = (  # label, solver, options: all function-preserving, weights only
    ("weight_matching (paper distance)", "weight_matching", {}),
    ("weight_matching (official +O)", "weight_matching", {"head_distance": "official"}),
    ("weight_matching (per site)", "weight_matching", {"head_distance": "sites"}),
    ("transfusion (paper distance)", "transfusion", {}),
    ("transfusion (official +O)", "transfusion", {"head_distance": "official"}),
    ("natural heads", "wm_natural", {}),
    ("brute-force heads", "wm_brute", {}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows: dict[str, list[float]] = {label: [] for label, _, _ in METHODS}
    unaligned = []
    for seed in args.seeds:
        train_set, test_set = digits(seed=seed)
        torch.manual_seed(seed)
        model_a = train(PatchViT(), train_set.subset(int(0.4 * len(train_set)), seed), epochs=args.epochs, seed=seed)
        torch.manual_seed(seed + 1)
        model_b = train(PatchViT(), train_set, epochs=args.epochs, seed=seed + 1)
        a, b = model_a.state_dict(), model_b.state_dict()
        spec = pg.compile(model_a, (test_set.x[:2],))
        unaligned.append(barrier(model_a, a, b, test_set)[0])
        for label, solver, opts in METHODS:
            al = pg.align(a, b, spec, solver=solver, seed=seed, **opts)
            rows[label].append(barrier(model_a, pg.apply_alignment(al, a), b, test_set)[0])
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nloss barrier between pi(A) and B on sklearn digits, seeds {args.seeds}, {args.epochs} epochs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':36s} " + " ".join(f"{'s' + str(s):>7s}" for s in args.seeds) + f" {'mean':>7s}")
    for label, vals in [("no alignment", unaligned), *rows.items()]:
        print(f"{label:36s} " + " ".join(f"{v:7.3f}" for v in vals) + f" {statistics.mean(vals):7.3f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
