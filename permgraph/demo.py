"""``permgraph demo``: compile, explain and verify a zoo of small architectures.

Runs offline in seconds: every model is built from a config with random
weights, compiled into its spec, and checked (a random permutation drawn from
the spec must leave the outputs unchanged, compared in float64).
"""
from __future__ import annotations

import time

from permgraph.compiler import compile as compile_spec
from permgraph.verify import verify
from permgraph.zoo import ZOO, build

QUICK = ("nanogpt", "gpt2", "llama", "vit")


def run_demo(quick: bool = False) -> int:
    names = QUICK if quick else tuple(ZOO)
    first = build("llama")
    print(compile_spec(first.model, first.inputs).explain())
    print()
    print(f"{'architecture':<20} {'groups':>6} {'permuted':>9} {'compile s':>9} {'max rel err (f64)':>18}  verdict")
    failures = 0
    for name in names:
        zm = build(name)
        t0 = time.perf_counter()
        spec = compile_spec(zm.model, zm.inputs, outputs=zm.outputs)
        dt = time.perf_counter() - t0
        rep = verify(zm.model, spec, zm.inputs, tolerance=zm.tolerance)
        failures += not rep.ok
        print(f"{name:<20} {len(spec.groups):>6} {spec.covered_fraction():>9.1%} {dt:>9.2f} "
              f"{rep.max_rel_error:>18.2e}  {'ok' if rep.ok else 'FAILED'}")
    print()
    print("every spec checked: a random permutation leaves the outputs unchanged" if not failures
          else f"{failures} architectures FAILED verification")
    return 0 if not failures else 1
