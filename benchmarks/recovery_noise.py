"""Planted-permutation recovery against noise, for every solver.

B = pi(A) + sigma * std(param) * noise, with pi drawn at random from the spec
(Q/K and V/O within-head permutations shared, so every solver can represent it).
Recovery = fraction of (parameter entry, permuted axis) pairs whose index along
that axis is the planted one (a unit-level score: 100% = exact, a random
permutation of n units scores about 1/n); rel.err = ||align(A) - pi(A)|| / ||pi(A)||. Models: 6-layer BERT-style
(no RoPE: heads and within-head order matter), 6-layer LLaMA-style (RoPE, GQA) and 4-layer Mixtral-style
(8 experts, top-2: the experts' order and each expert's own hidden units planted), random weights.
Usage: python benchmarks/recovery_noise.py [--seeds 3] [--models bert6,llama6,mixtral4]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import permgraph as pg
from permgraph.inputs import default_example_inputs
from permgraph.rewrites import shared_within_head

SOLVERS = [("transfusion (paper distance)", "transfusion", {}),
           ("transfusion (official +O)", "transfusion", {"head_distance": "official"}),
           ("transfusion (per site)", "transfusion", {"head_distance": "sites"}),
           ("wm spectral (+guard)", "weight_matching", {"heads": "spectral"}),
           ("wm spectral (no guard)", "weight_matching", {"heads": "spectral", "head_guard": False}),
           ("wm spectral (per-site distance)", "weight_matching", {"heads": "spectral", "head_distance": "sites"}),
           ("wm brute", "weight_matching", {"heads": "brute"}),
           ("wm lap", "weight_matching", {"heads": "lap"}),
           ("wm natural", "weight_matching", {"heads": "natural"}),
           ("wm flat (ablation)", "weight_matching", {"heads": "flat"}),
           ("ot hard", "ot", {}),
           ("activation matching", "activation_matching", {}),
           ("ot sinkhorn 0.05", "ot", {"reg": 0.05})]


def models():
    yield "bert6", BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=96, num_hidden_layers=6,
                                              num_attention_heads=6, intermediate_size=192))
    yield "llama6", LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=192,
                                                 num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2))
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=96, intermediate_size=96, num_hidden_layers=4,
                                           num_attention_heads=6, num_key_value_heads=2, num_local_experts=8,
                                           num_experts_per_tok=2))
    moe.set_experts_implementation("batched_mm")
    yield "mixtral4", moe


def unit_recovery(al, shared, perm, spec) -> float:
    """Probe with unique entries; compare each axis' source index with the planted one (axes of the
    parameter's view where it has a layout: an expert bank's experts x units)."""
    probe = {k: spec.from_view(k, torch.arange(math.prod(spec.view_shape(k)), dtype=torch.float64)
                               .reshape(spec.view_shape(k))) for k in spec.shapes}
    out = pg.apply_alignment(al, probe)
    ref = pg.apply_permutation(shared, perm, probe)
    hit = total = 0
    for k in spec.shapes:
        sh = spec.view_shape(k)
        o, r = spec.to_view(k, out[k]), spec.to_view(k, ref[k])
        stride = 1
        for d in reversed(range(len(sh))):
            if spec.axes[k][d].groups():
                a = (o.long() // stride) % sh[d]
                b = (r.long() // stride) % sh[d]
                hit += int((a == b).sum())
                total += a.numel()
            stride *= sh[d]
    return hit / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--solvers", default=None, help="comma-separated labels to run (default: all)")
    ap.add_argument("--sigmas", type=float, nargs="*", default=[0.0, 0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--models", default=None, help="comma-separated: bert6, llama6, mixtral4 (default: all)")
    args = ap.parse_args()
    print(__doc__.split("\n\n")[1].strip().replace("\n", " "))
    for name, model in models():
        if args.models and name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        spec = pg.compile(model)
        shared = shared_within_head(spec)
        sa = {k: v for k, v in model.state_dict().items()}
        print(f"\n## {name}: {len(spec.groups)} groups, {sum(v.numel() for v in sa.values()) / 1e6:.2f} M params, "
              f"{args.seeds} seeds\n")
        print("| solver | " + " | ".join(f"sigma={s}" for s in args.sigmas) + " | time/align |")
        print("|---|" + "---|" * (len(args.sigmas) + 1))
        for label, solver, opts in [r for r in SOLVERS if not args.solvers or r[0] in args.solvers.split(",")]:
            cells, times = [], []
            for sigma in args.sigmas:
                rec, err = [], []
                for seed in range(args.seeds):
                    gen = torch.Generator().manual_seed(100 + seed)
                    planted = pg.apply_permutation(shared, shared.random_permutation(seed), sa)
                    sb = {k: v + sigma * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                          and v.numel() > 1 else v for k, v in planted.items()}
                    t0 = time.perf_counter()
                    if solver == "activation_matching":
                        model_b = copy.deepcopy(model)
                        model_b.load_state_dict(sb)
                        data = [default_example_inputs(model, batch=8, seq=16, seed=s) for s in range(4)]
                        al = pg.align(model, model_b, spec, solver=solver, seed=seed, data=data, **opts)
                    else:
                        al = pg.align(sa, sb, spec, solver=solver, seed=seed, **opts)
                    times.append(time.perf_counter() - t0)
                    out = pg.apply_alignment(al, sa)
                    keys = [k for k in spec.shapes]
                    rec.append(unit_recovery(al, shared, shared.random_permutation(seed), spec) if not al.soft
                               else float("nan"))
                    num = sum(float((out[k].double() - planted[k].double()).pow(2).sum()) for k in keys)
                    den = sum(float(planted[k].double().pow(2).sum()) for k in keys)
                    err.append((num / den) ** 0.5)
                r = sum(rec) / len(rec)
                cells.append(("-" if r != r else f"{100 * r:.1f}%") + f" ({sum(err) / len(err):.3f})")
            print(f"| {label} | " + " | ".join(cells) + f" | {sum(times) / len(times):.2f} s |")
    print("\ncells: mean unit recovery (mean relative L2 error); '-': soft plans have no unit assignment")


if __name__ == "__main__":
    main()
