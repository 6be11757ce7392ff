"""The demo (``make demo``): re-base a fine-tune onto a new release, on real data, in seconds on a CPU.

1. Two small ViT "releases" are trained on scikit-learn's digits: A (seed 0, 40% of
   the training set) and B (seed 1, all of it, like a newer release).
2. A is fine-tuned on a shifted task (digits rotated by 90 degrees): tau = A_ft - A.
3. The spec is compiled and explained; A is aligned to B by each solver.
4. tau is transported: B + pi(tau); accuracy on the task and on the original
   digits (support), and the loss barrier between pi(A) and B.
Every step is seeded. ``--quick`` trains less (for tests).

Usage: python examples/digits_demo.py [--quick] [--task rotate90|invert|flip|relabel] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import permgraph as pg
from permgraph.solvers import get_solver
from permgraph.testing.zoo import PatchViT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import TASKS, barrier, digits, evaluate, train, with_state  # noqa: E402

SOLVERS = ("transfusion", "weight_matching", "ot", "activation_matching", "wm_flat")  # registry presets


def run_demo(quick: bool = False, task: str = "rotate90", seed: int = 0) -> int:
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    epochs, ft_epochs = (8, 4) if quick else (60, 20)
    train_set, test_set = digits(seed=seed)
    task_train, task_test = TASKS[task](train_set), TASKS[task](test_set)

    def release(s: int, data) -> PatchViT:
        torch.manual_seed(s)
        return train(PatchViT(), data, epochs=epochs, seed=s)

    print(f"training releases on sklearn digits ({len(train_set)} train / {len(test_set)} test images) ...")
    model_a = release(seed, train_set.subset(int(0.4 * len(train_set)), seed))
    model_b = release(seed + 1, train_set)
    a = {k: v.clone() for k, v in model_a.state_dict().items()}
    b = {k: v.clone() for k, v in model_b.state_dict().items()}
    finetuned = train(with_state(model_a, a), task_train, epochs=ft_epochs, lr=1e-3, seed=seed + 2)
    a_ft = {k: v.clone() for k, v in finetuned.state_dict().items()}
    t_train = time.perf_counter() - t_start

    spec = pg.compile(model_a, (test_set.x[:2],))
    print()
    print(spec.explain())
    print()
    print(pg.verify(model_a, spec, (test_set.x[:4],), tolerance=1e-12))
    print()

    def scores(state) -> tuple[float, float]:
        m = with_state(model_a, state)
        return evaluate(m, task_test)[1], evaluate(m, test_set)[1]

    rows = [("A (release, seed 0, 40% data)", *scores(a), None, None),
            ("A fine-tuned on the task (A_ft)", *scores(a_ft), None, None),
            ("B zero-shot (release, seed 1, all data)", *scores(b), None, None)]
    no_align = pg.transport(a, a_ft, b, spec.identity(), spec=spec)
    bar, _, _ = barrier(model_a, a, b, test_set)
    rows.append(("B + tau (no alignment)", *scores(no_align), bar, 0.0))
    data = [(s.x[i:i + 64],) for s in (task_train, train_set) for i in range(0, 256, 64)]
    for name in SOLVERS:
        t0 = time.perf_counter()
        entry = get_solver(name)
        label = entry.label + ("" if entry.fixed.get("heads") != "flat" else ", not function-preserving")
        extra = {"data": data} if entry.needs_data else {}
        al = pg.align(model_a, model_b, spec, solver=name, seed=seed, **extra)
        dt = time.perf_counter() - t0
        moved = pg.transport(a, a_ft, b, al, allow_non_preserving=True)  # the flat ablation is compared too
        bar, _, _ = barrier(model_a, pg.apply_alignment(al, a), b, test_set)
        rows.append((f"B + pi(tau): {label}", *scores(moved), bar, dt))
    b_task, b_support = rows[2][1], rows[2][2]
    print(f"task: digits '{task}'; accuracy in %, gains over B zero-shot in brackets; barrier: test-loss "
          f"barrier between pi(A) and B")
    print(f"{'model':<72} {'task acc':>16} {'support acc':>16} {'barrier':>8} {'align s':>8}")
    for name, task_acc, sup_acc, bar, dt in rows:
        gain_t = f"({100 * (task_acc - b_task):+.1f})" if name.startswith("B +") else ""
        gain_s = f"({100 * (sup_acc - b_support):+.1f})" if name.startswith("B +") else ""
        print(f"{name:<72} {100 * task_acc:>7.1f} {gain_t:>8} {100 * sup_acc:>7.1f} {gain_s:>8} "
              f"{'' if bar is None else f'{bar:.3f}':>8} {'' if dt is None else f'{dt:.2f}':>8}")
    print(f"\nseed {seed}, {torch.get_num_threads()} threads, {time.perf_counter() - t_start:.0f} s in all "
          f"({t_train:.0f} s training)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="train less (seconds instead of minutes)")
    ap.add_argument("--task", default="rotate90", choices=sorted(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    return run_demo(quick=args.quick, task=args.task, seed=args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
