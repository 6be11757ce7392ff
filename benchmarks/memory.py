"""Peak memory of ``permgraph transport`` and ``permgraph align`` on LLaMA-shaped folders.

Builds releases A, A_ft (A plus noise) and B (A plus other noise; saved sharded) of a
LLaMA-shaped model of about 0.5 GB and 2 GB on disk, runs the command line in a
subprocess and prints its peak resident memory (``ru_maxrss``) divided by the size
of one checkpoint, then extrapolates to a 7B model in bf16 (13.5 GB on disk).

    python benchmarks/memory.py                      # 0.5 GB and 2 GB, float32
    python benchmarks/memory.py --gb 0.5 --dtype bfloat16 --keep /tmp/llama-mem

Targets (issue "Real checkpoints at 7B scale"): transport with --permutation at most
1.5x one checkpoint (inputs are read tensor by tensor, never held whole); align at
most 2.5x (A and B). Align is measured with a cheap solver (weight matching, a few
sweeps): memory, not quality, is the point.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 32000
BYTES_7B_BF16 = 6.74e9 * 2
_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def llama_config(gb: float, dtype: str):
    """A LLaMA config whose checkpoint takes about ``gb`` GB in ``dtype``: params = 2 V h + L (4 h^2 + 3 h I)."""
    from transformers import LlamaConfig

    width = 4 if dtype == "float32" else 2
    h = 768 if gb * 4 / width <= 1 else 1536
    inter = 4 * h * 2 // 3 // 256 * 256
    per_layer = 4 * h * h + 3 * h * inter
    layers = max(1, round((gb * 1e9 / width - 2 * VOCAB * h) / per_layer))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=h // 64, num_key_value_heads=h // 64, max_position_embeddings=256,
                       tie_word_embeddings=False, torch_dtype=dtype)


def build_releases(root: Path, gb: float, dtype: str) -> int:
    """Folders A, A_ft, B under ``root``; returns the size in bytes of one checkpoint's weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(gb, dtype)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(root / "A")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
        model.save_pretrained(root / "A_ft")
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    size = weights_bytes(root / "A")
    model.save_pretrained(root / "B", max_shard_size=max(size // 3, 1 << 20))  # B sharded
    del model
    return size


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def peak_rss(argv: list[str]) -> tuple[int, int, float]:
    """(peak RSS in bytes, exit code, seconds) of ``argv`` run in a fresh process."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS, *argv], capture_output=True, text=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MAXRSS_KB"))
    _, kb, code = line.split()
    if int(code) != 0:
        sys.stderr.write(out.stdout + out.stderr)
    return int(kb) * 1024, int(code), time.perf_counter() - t0


def run(root: Path, gb: float, dtype: str) -> list[dict]:
    size = build_releases(root, gb, dtype)
    pg = [sys.executable, "-m", "permgraph"]
    al = root / "al.json"
    solve = ["--solver", "weight_matching", "--max-iter", "3", "-q"]
    cases = {
        "align": pg + ["align", str(root / "A"), str(root / "B"), "--out", str(al), *solve],
        "transport --permutation": pg + ["transport", "--base-old", str(root / "A"), "--finetuned",
                                         str(root / "A_ft"), "--base-new", str(root / "B"), "--out",
                                         str(root / "out_perm"), "--permutation", str(al), "-q"],
        "transport (align + stream)": pg + ["transport", "--base-old", str(root / "A"), "--finetuned",
                                            str(root / "A_ft"), "--base-new", str(root / "B"), "--out",
                                            str(root / "out_align"), *solve],
    }
    rows = []
    for name, argv in cases.items():
        rss, code, secs = peak_rss(argv)
        rows.append({"case": name, "gb": round(size / 1e9, 3), "dtype": dtype, "exit": code,
                     "peak_rss_gb": round(rss / 1e9, 3), "x_checkpoint": round(rss / size, 2),
                     "seconds": round(secs, 1), "7b_bf16_gb": round(rss / size * BYTES_7B_BF16 / 1e9, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, nargs="+", default=[0.5, 2.0], help="checkpoint sizes on disk")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep", default=None, help="build the folders here and keep them")
    args = p.parse_args()
    rows = []
    for gb in args.gb:
        if args.keep:
            root = Path(args.keep) / f"{gb}gb-{args.dtype}"
            root.mkdir(parents=True, exist_ok=True)
            rows += run(root, gb, args.dtype)
        else:
            with tempfile.TemporaryDirectory(prefix="permgraph-mem-") as d:
                rows += run(Path(d), gb, args.dtype)
    print(f"\n{'case':28} {'GB':>6} {'dtype':>9} {'peak RSS':>9} {'x ckpt':>7} {'s':>6} {'7B bf16 (GB)':>13}")
    for r in rows:
        print(f"{r['case']:28} {r['gb']:6.2f} {r['dtype']:>9} {r['peak_rss_gb']:9.2f} {r['x_checkpoint']:7.2f} "
              f"{r['seconds']:6.1f} {r['7b_bf16_gb']:13.1f}")
    print(f"7B bf16 checkpoint: {BYTES_7B_BF16 / 1e9:.1f} GB; extrapolation = peak RSS / checkpoint x that. "
          "The fixed overhead of Python, torch and transformers (about 0.4 GB) and the per-tensor working "
          "set (a few float32 copies of the embedding) make small folders look worse than large ones")


if __name__ == "__main__":
    main()
