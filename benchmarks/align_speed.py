"""Alignment time for a ViT-B/16 shape (CPU or GPU) and a LLaMA-7B shape (GPU).

Two models with independently drawn random weights are aligned; prints sweeps,
time per sweep, and where the time goes (cost matrices, assignments, head matching,
objective, the rest), from ``Alignment.timings``.
Targets: ViT-B/16 with transfusion under 10 s on a 2-core CPU, under 5 s on a GPU;
LLaMA-7B shape under 60 s on a GPU.
Usage: python benchmarks/align_speed.py [--model vit-b16|llama7b] [--device cpu|cuda] [--solver transfusion]
       [--backend auto|lapjv|scipy|lap] [--workers N] [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import permgraph as pg


def build(name: str, seed: int, device: str, dtype: torch.dtype, tiny: bool = False):
    """The model at its real shape, or (``tiny``) the same architecture at a few thousand
    parameters: the code path of a run, for tests and smoke checks on any device."""
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    with torch.device(device):
        if name == "vit-b16":
            model = ViTForImageClassification(ViTConfig(
                image_size=32 if tiny else 224, patch_size=16, hidden_size=32 if tiny else 768,
                num_hidden_layers=2 if tiny else 12, num_attention_heads=4 if tiny else 12,
                intermediate_size=64 if tiny else 3072, num_labels=10 if tiny else 1000))
        else:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=128 if tiny else 32000, hidden_size=64 if tiny else 4096,
                intermediate_size=96 if tiny else 11008, num_hidden_layers=2 if tiny else 32,
                num_attention_heads=8 if tiny else 32, num_key_value_heads=2 if tiny else 8))
    return model.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit-b16", choices=["vit-b16", "llama7b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--solver", default="transfusion")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--workers", type=int, default=0, help="threads for assignments (0: one per core)")
    ap.add_argument("--repeat", type=int, default=1, help="align this many times; best and median printed")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="the solver's seed (the order of groups in each sweep)")
    ap.add_argument("--tiny", action="store_true", help="the same architecture at a tiny size (a smoke run)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    with torch.device("meta"):
        meta = build(args.model, 0, "meta", dtype, args.tiny)
    spec = pg.compile(meta)
    t_compile = time.perf_counter() - t0
    a = build(args.model, 0, args.device, dtype, args.tiny).state_dict()
    b = build(args.model, 1, args.device, dtype, args.tiny).state_dict()
    n = sum(v.numel() for v in a.values())
    if args.device == "cuda":
        torch.cuda.synchronize()
    runs = []
    for _ in range(args.repeat):
        al = pg.align(a, b, spec, solver=args.solver, backend=args.backend, max_iter=args.max_iter,
                      workers=args.workers, progress=args.progress, seed=args.seed)
        runs.append(al)
        if args.device == "cuda":
            torch.cuda.synchronize()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{args.model}: {n / 1e6:.0f} M params ({args.dtype}), {len(spec.groups)} groups, solver {args.solver}, "
          f"backend {al.settings['backend']}, workers {al.settings['workers']}, device {dev}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"  compile (meta)   {t_compile:7.2f} s")
    for k, al in enumerate(runs):
        t = al.timings
        sweeps = ", ".join(f"{t[f'sweep_{i}']:.2f}" for i in range(1, al.sweeps + 1) if f"sweep_{i}" in t)
        print(f"  run {k + 1}: align total {t['total']:7.2f} s   sweeps {al.sweeps} ({sweeps} s)")
        print(f"    cost matrices  {t['cost']:7.2f} s")
        print(f"    assignments    {t['lap']:7.2f} s   (waited for; their own time {t['lap_cpu']:.2f} s)")
        print(f"    head matching  {t['heads']:7.2f} s   (spectral SVDs / brute pair scores)")
        print(f"    objective      {t['objective']:7.2f} s")
        print(f"    other          {t['other']:7.2f} s   (bookkeeping)")
        print(f"    groups solved {al.settings['group_solves']['solved']}, reused (inputs unchanged) "
              f"{al.settings['group_solves']['reused']}; slowest {al.settings['slowest_groups']}")
        print(f"    objective {al.history[0]:.8g} -> {al.history[-1]:.8g}")
    totals = sorted(r.timings["total"] for r in runs)
    if len(runs) > 1:
        print(f"  best {totals[0]:.2f} s, median {statistics.median(totals):.2f} s over {len(runs)} runs")
    same = all(r.permutation.equal(runs[0].permutation) and r.history == runs[0].history for r in runs)
    print(f"  runs identical: {same}")

if __name__ == "__main__":
    main()
