"""Paper benchmark 3 on text: LLaMA-style character models (RoPE, GQA, built with transformers
from a config). Releases A (seed 0, half the corpus) and B (seed 1, all of it) are trained on
Python standard-library source; A is fine-tuned on English documentation (Debian
python3.11-doc reST sources). Reports task loss (documentation) and support loss (source) for
B, B + tau and B + pi(tau) per solver, with alpha chosen on a validation split, plus the loss
barrier between pi(A) and B. With peft installed, also a LoRA fine-tune of A (r=8 on attention
and MLP) carried to B as an adapter (pg.transport_adapter; evaluated merged), next to the
full-fine-tune transport. Appends to docs/results.md.
Usage: apt-get install python3.11-doc && python benchmarks/text_rebasin.py [--steps 600]
"""
from __future__ import annotations

import argparse
import copy
import os
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import permgraph as pg

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


def corpus(files: list[Path], limit: int) -> str:
    out, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        out.append(t)
        n += len(t)
        if n >= limit:
            break
    return "".join(out)[:limit]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


def batches(data: torch.Tensor, n: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        yield torch.stack([data[i:i + SEQ] for i in idx])


def new_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(model, data, steps: int, lr: float, seed: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for x in batches(data, steps, 32, seed):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def loss_of(template, state, data, n=16) -> float:
    m = copy.deepcopy(template)
    m.load_state_dict(state)
    m.eval()
    return sum(float(m(input_ids=x, labels=x).loss) for x in batches(data, n, 32, 999)) / n


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_finetune(a_model, data, steps: int):
    """A LoRA fine-tune of A (r=8, attention and MLP) as (config, adapter state); None without peft."""
    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    except ImportError:
        print("peft is not installed: skipping the LoRA adapter rows (pip install 'permgraph[peft]')")
        return None
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(a_model), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    train(model, data, steps, 3e-3, 2)
    return model.peft_config["default"], {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def lora_row(label, alignment, adapter, b, template, doc_val, doc_test, src_test, base_task, base_sup) -> str:
    """B + alpha * pi(dW) from the carried adapter, alpha chosen on validation like the full transport."""
    def merged(alpha):
        return pg.transport_adapter(alignment, adapter, merge=True, base_b=b, alpha=alpha,
                                    allow_non_preserving=True).state
    try:
        best = min(((loss_of(template, merged(al_), doc_val), al_) for al_ in (0.25, 0.5, 1.0, 1.5)),
                   key=lambda r: r[0])
    except ValueError as e:  # soft plans cannot carry adapters
        return f"| {label} | - | refused: {str(e).split(':')[0]} | - |"
    out = merged(best[1])
    return (f"| {label} | {best[1]} | {loss_of(template, out, doc_test) - base_task:+.3f} | "
            f"{loss_of(template, out, src_test) - base_sup:+.3f} |")


def lora_table(rows, adapter, a, spec, template, doc_test, ft_steps: int) -> list[str]:
    if adapter is None:
        return []
    own = pg.transport_adapter((spec, spec.identity()), adapter, merge=True, base_b=a).state  # A + dW
    return [f"LoRA fine-tune of A (r=8, lora_alpha=16 on q/k/v/o/gate/up/down, {ft_steps} steps, lr 3e-3; "
            f"A + LoRA on its own: task {loss_of(template, own, doc_test):.3f}) carried to B as an adapter "
            "(`pg.transport_adapter`, evaluated merged: B + alpha * pi(dW)):", "",
            "| method | alpha | task loss change | support loss change |", "|---|---|---|---|", *rows, ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--docs", default="/usr/share/doc/python3.11/html/_sources",
                    help="folder of reST sources for the fine-tuning task (apt-get install python3.11-doc)")
    ap.add_argument("--src", default=sysconfig.get_paths()["stdlib"], help="folder of Python source (releases)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    src_files = sorted(Path(args.src).rglob("*.py"))
    src = encode(corpus(src_files, 3_000_000))
    doc = encode(corpus(sorted(Path(args.docs).rglob("*.txt")), 1_500_000))
    split = int(0.9 * len(src))
    src_train, src_test = src[:split], src[split:]
    cut1, cut2 = int(0.8 * len(doc)), int(0.9 * len(doc))
    doc_train, doc_val, doc_test = doc[:cut1], doc[cut1:cut2], doc[cut2:]
    a_model = train(new_model(0), src_train[: len(src_train) // 2], args.steps, 3e-3, 0)
    b_model = train(new_model(1), src_train, args.steps, 3e-3, 1)
    a = {k: v.clone() for k, v in a_model.state_dict().items()}
    b = {k: v.clone() for k, v in b_model.state_dict().items()}
    ft = train(copy.deepcopy(a_model), doc_train, args.ft_steps, 1e-3, 2)
    a_ft = {k: v.clone() for k, v in ft.state_dict().items()}
    adapter = lora_finetune(a_model, doc_train, args.ft_steps)
    t_train = time.perf_counter() - t0
    spec = pg.compile(a_model)
    template = new_model(0)
    rows, lora_rows = [], []
    base_task, base_sup = loss_of(template, b, doc_test), loss_of(template, b, src_test)
    methods = [("no alignment", None, {}), ("transfusion", "transfusion", {}),
               ("weight matching (spectral)", "weight_matching", {"heads": "spectral"}),
               ("weight matching (natural heads)", "weight_matching", {"heads": "natural"}),
               ("optimal transport (exact)", "ot", {}),
               ("transfusion, official head distance (+O)", "transfusion", {"head_distance": "official"}),
               ("transfusion, per-site head distance", "transfusion", {"head_distance": "sites"}),
               ("transfusion, untied residual", "transfusion", {"residual": "untied"}),
               ("weight matching (spectral), untied residual", "weight_matching",
                {"heads": "spectral", "residual": "untied"})]
    for label, solver, opts in methods:
        al = spec.identity() if solver is None else pg.align(a, b, spec, solver=solver, **opts)
        kw = {"spec": spec} if solver is None else {"allow_non_preserving": True}
        moved_a = a if solver is None else pg.apply_alignment(al, a, allow_non_preserving=True)
        mid = {k: 0.5 * moved_a[k] + 0.5 * b[k] if b[k].is_floating_point() else b[k] for k in b}
        bar = loss_of(template, mid, src_test) - 0.5 * (loss_of(template, moved_a, src_test) + base_sup)
        best = min(((loss_of(template, pg.transport(a, a_ft, b, al, alpha=al_, **kw), doc_val), al_)
                    for al_ in (0.25, 0.5, 1.0, 1.5)), key=lambda r: r[0])
        out = pg.transport(a, a_ft, b, al, alpha=best[1], **kw)
        untied = solver is not None and al.untied_residual  # pi(A) is not A's function: its barrier is moot
        rows.append(f"| {label} | {best[1]} | {loss_of(template, out, doc_test) - base_task:+.3f} | "
                    f"{loss_of(template, out, src_test) - base_sup:+.3f} | "
                    f"{f'({bar:.3f}: pi(A) is not A)' if untied else f'{bar:.3f}'} |")
        if adapter is not None:
            lora_rows.append(lora_row(label, (spec, al) if solver is None else al, adapter, b, template,
                                      doc_val, doc_test, src_test, base_task, base_sup))
    lines = ["", "## 3. Text: LLaMA-style character models (RoPE, GQA)", "",
             f"Generated by `python benchmarks/text_rebasin.py --steps {args.steps} --ft-steps {args.ft_steps}` "
             f"on CPU ({os.cpu_count()} cores). Model: LlamaForCausalLM, 3 layers, width 128, 8 heads, 4 kv heads, "
             f"vocabulary 128 (ASCII), sequences of {SEQ}. A: seed 0, half of 2.7M characters of stdlib "
             f"source; B: seed 1, all of it; {args.steps} steps of 32 sequences. A_ft: {args.ft_steps} steps on "
             "python3.11-doc reST. Losses in nats per character; changes relative to B "
             f"(B: task {base_task:.3f}, support {base_sup:.3f}; A_ft on its own: task "
             f"{loss_of(template, a_ft, doc_test):.3f}). Lower is better.", "",
             "| method | alpha | task loss change | support loss change | midpoint barrier |",
             "|---|---|---|---|---|", *rows, "",
             *lora_table(lora_rows, adapter, a, spec, template, doc_test, args.ft_steps),
             f"Time {time.perf_counter() - t0:.0f} s ({t_train:.0f} s training).", ""]
    print("\n".join(lines))
    with open(ROOT / "docs" / "results.md", "a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
