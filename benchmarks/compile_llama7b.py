"""Compile time of a LLaMA-7B-shaped model on the meta device (no weights allocated).

Prints the figure; the issue's target is under 10 s on a 2-core machine.
Usage: python benchmarks/compile_llama7b.py [--layers 32]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import permgraph as pg
from permgraph.build import build_spec
from permgraph.infer import infer
from permgraph.trace import trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    traced = trace(model)
    t1 = time.perf_counter()
    result = infer(traced.graph, traced.inputs)
    t2 = time.perf_counter()
    spec = build_spec(result, traced.param_shapes, traced.aliases, traced.info)
    t3 = time.perf_counter()
    total = t3 - t0
    t4 = time.perf_counter()
    pg.compile(model)
    again = time.perf_counter() - t4
    print(f"LLaMA-7B-shaped ({args.layers} layers, hidden 4096, 32 heads, 8 kv heads, MLP 11008; "
          f"{n_params / 1e9:.2f} B params on meta), {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"  trace (torch.export) {t1 - t0:6.2f} s")
    print(f"  infer (axis algebra) {t2 - t1:6.2f} s   ({len(list(traced.graph.nodes))} graph nodes)")
    print(f"  build spec           {t3 - t2:6.2f} s")
    print(f"  total                {total:6.2f} s   (second pg.compile call: {again:.2f} s; target < 10 s)")
    print(f"  {len(spec.groups)} groups, {spec.covered_fraction():.1%} of parameter entries permuted")


if __name__ == "__main__":
    main()
