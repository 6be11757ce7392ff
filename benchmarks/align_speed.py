"""Alignment time for a ViT-B/16 shape (CPU or GPU) and a LLaMA-7B shape (GPU).

Two models with independently drawn random weights are aligned; prints sweeps,
time per sweep, and where the time goes (cost matrices vs assignments).
Targets: ViT-B/16 with transfusion under 60 s on a 2-core CPU, under 5 s on a GPU;
LLaMA-7B shape under 3 minutes on a GPU.
Usage: python benchmarks/align_speed.py [--model vit-b16|llama7b] [--device cpu|cuda] [--solver transfusion]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import permgraph as pg


def build(name: str, seed: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    with torch.device(device):
        if name == "vit-b16":
            model = ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, hidden_size=768,
                                                        num_hidden_layers=12, num_attention_heads=12,
                                                        intermediate_size=3072, num_labels=1000))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                                 num_hidden_layers=32, num_attention_heads=32,
                                                 num_key_value_heads=8))
    return model.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit-b16", choices=["vit-b16", "llama7b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--solver", default="transfusion")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-iter", type=int, default=100)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    with torch.device("meta"):
        meta = build(args.model, 0, "meta", dtype)
    spec = pg.compile(meta)
    t_compile = time.perf_counter() - t0
    a = build(args.model, 0, args.device, dtype).state_dict()
    b = build(args.model, 1, args.device, dtype).state_dict()
    n = sum(v.numel() for v in a.values())
    if args.device == "cuda":
        torch.cuda.synchronize()
    al = pg.align(a, b, spec, solver=args.solver, backend=args.backend, max_iter=args.max_iter)
    t = al.timings
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{args.model}: {n / 1e6:.0f} M params ({args.dtype}), {len(spec.groups)} groups, solver {args.solver}, "
          f"backend {al.settings['backend']}, device {dev}, torch {torch.__version__}")
    print(f"  compile (meta)   {t_compile:7.2f} s")
    print(f"  align total      {t['total']:7.2f} s   sweeps {al.sweeps}, {t['total'] / max(al.sweeps, 1):.2f} s/sweep")
    print(f"    cost matrices  {t['cost']:7.2f} s")
    print(f"    assignments    {t['lap']:7.2f} s")
    print(f"    other          {t['total'] - t['cost'] - t['lap']:7.2f} s   (objective, spectral SVDs, bookkeeping)")
    print(f"  objective {al.history[0]:.6g} -> {al.history[-1]:.6g}")


if __name__ == "__main__":
    main()
