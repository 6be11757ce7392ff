"""Peak memory of ``permgraph transport`` and ``permgraph align`` on LLaMA-shaped folders.

Builds releases A, A_ft (A plus noise) and B (A plus other noise; saved sharded) of a
LLaMA-shaped model of about 0.5 GB and 2 GB on disk, runs the command line in a
subprocess and prints its peak resident memory (``ru_maxrss``) divided by the size
of one checkpoint, then extrapolates to a 7B model in bf16 (13.5 GB on disk).

    python benchmarks/memory.py                      # 0.5 GB and 2 GB, float32
    python benchmarks/memory.py --gb 0.5 --dtype bfloat16 --keep /tmp/llama-mem
    python benchmarks/memory.py --keep /tmp/llama-mem --cases "transport --permutation"

Targets (issue "Real checkpoints at 7B scale"): transport with --permutation at most
1.5x one checkpoint (inputs are read tensor by tensor, never held whole); align at
most 2.5x (A and B). Align is measured with a cheap solver (weight matching, a few
sweeps): memory, not quality, is the point.
"""
from __future__ import annotations

import argparse
import json
import os
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
    """Folders A, A_ft, B under ``root`` (kept ones are reused); returns the size in bytes of one checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    done = root / "built.json"
    if done.is_file() and json.loads(done.read_text()) == {"gb": gb, "dtype": dtype}:
        return weights_bytes(root / "A")
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
    done.write_text(json.dumps({"gb": gb, "dtype": dtype}))
    return size


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def peak_rss(argv: list[str]) -> tuple[int, int, float, dict]:
    """(peak RSS in bytes, exit code, seconds, the command's --json summary) of ``argv`` in a fresh process."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS, *argv], capture_output=True, text=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MAXRSS_KB"))
    _, kb, code = line.split()
    if int(code) != 0:
        sys.stderr.write(out.stdout + out.stderr)
    summary = next((json.loads(ln) for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), {})
    return int(kb) * 1024, int(code), time.perf_counter() - t0, summary


CASES = ("align", "transport --permutation", "transport (align + stream)")


def run(root: Path, gb: float, dtype: str, cases: list[str]) -> list[dict]:
    size = build_releases(root, gb, dtype)
    pg = [sys.executable, "-m", "permgraph"]
    al = root / "al.json"
    solve = ["--solver", "weight_matching", "--max-iter", "3"]
    io = ["--base-old", str(root / "A"), "--finetuned", str(root / "A_ft"), "--base-new", str(root / "B")]
    argv = {
        "align": pg + ["align", str(root / "A"), str(root / "B"), "--out", str(al), "--force", *solve, "--json"],
        "transport --permutation": pg + ["transport", *io, "--out", str(root / "out_perm"), "--force",
                                         "--permutation", str(al), "--json"],
        "transport (align + stream)": pg + ["transport", *io, "--out", str(root / "out_align"), "--force",
                                            *solve, "--json"],
    }
    if "transport --permutation" in cases and "align" not in cases and not al.is_file():
        subprocess.run(argv["align"], check=True, capture_output=True)  # the alignment it needs, not measured
    rows = []
    for name in [c for c in CASES if c in cases]:
        rss, code, secs, summary = peak_rss(argv[name])
        streamed = summary.get("stream_seconds", {})
        stream_s = sum(v for k, v in streamed.items() if k in ("read", "compute", "write"))
        rows.append({"case": name, "gb": round(size / 1e9, 3), "dtype": dtype, "exit": code,
                     "peak_rss_gb": round(rss / 1e9, 3), "x_checkpoint": round(rss / size, 2),
                     "seconds": round(secs, 1), "stream_s_per_gb": round(stream_s / (size / 1e9), 1) or None,
                     "7b_bf16_gb": round(rss / size * BYTES_7B_BF16 / 1e9, 1), "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fit_7b(rows: list[dict]) -> dict[str, float]:
    """Per case and dtype measured at two or more sizes: peak RSS = c0 + c1 * size fitted
    (least squares), evaluated at a 7B bf16 checkpoint's size."""
    out = {}
    for case in CASES:
        pts = [(r["gb"], r["peak_rss_gb"]) for r in rows if r["case"] == case and r["exit"] == 0]
        if len({x for x, _ in pts}) < 2:
            continue
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        c1 = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[case] = round(my + c1 * (BYTES_7B_BF16 / 1e9 - mx), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, nargs="+", default=[0.5, 2.0], help="checkpoint sizes on disk")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--keep", default=None, help="build the folders here and keep them (reused when present)")
    args = p.parse_args()
    rows = []
    for gb in args.gb:
        if args.keep:
            root = Path(args.keep) / f"{gb}gb-{args.dtype}"
            root.mkdir(parents=True, exist_ok=True)
            rows += run(root, gb, args.dtype, args.cases)
        else:
            with tempfile.TemporaryDirectory(prefix="permgraph-mem-") as d:
                rows += run(Path(d), gb, args.dtype, args.cases)
    print(f"\n{'case':28} {'GB':>6} {'dtype':>9} {'peak RSS':>9} {'x ckpt':>7} {'s':>6} {'s/GB':>5} "
          f"{'7B bf16 (GB)':>13} {'load':>5}")
    for r in rows:
        print(f"{r['case']:28} {r['gb']:6.2f} {r['dtype']:>9} {r['peak_rss_gb']:9.2f} {r['x_checkpoint']:7.2f} "
              f"{r['seconds']:6.1f} {r['stream_s_per_gb'] or '-':>5} {r['7b_bf16_gb']:13.1f} {r['load']:5.1f}")
    print(f"7B bf16 checkpoint: {BYTES_7B_BF16 / 1e9:.1f} GB. '7B bf16' column = peak RSS / checkpoint x that "
          "(pessimistic: the fixed overhead of Python, torch and transformers, about 0.4 GB, is scaled too). "
          "s/GB: the streaming loop's seconds (read, compute, write) per GB of one checkpoint; "
          "load: the 1-minute load average when the case ended (2 cores shared)")
    for case, gb in fit_7b(rows).items():
        print(f"7B bf16, fitted (peak = c0 + c1 x size over the sizes measured): {case}: {gb:.2f} GB "
              f"= {gb / (BYTES_7B_BF16 / 1e9):.2f}x")


if __name__ == "__main__":
    main()
