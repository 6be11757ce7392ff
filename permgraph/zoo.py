"""Small models of every architecture the compiler must handle, with their inputs.

Each factory returns ``(model, example_inputs, tolerance[, outputs])``: the
relative error allowed in float64 (looser where transformers computes a norm in
float32), and the outputs that must stay unchanged when not all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

EXACT = 1e-12   # pure float64 computation
FP32_NORM = 1e-5  # RMSNorm / T5LayerNorm upcast to float32 inside a float64 model


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.attn = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.fc = nn.Linear(d, 4 * d, bias=bias)
        self.fc_out = nn.Linear(4 * d, d, bias=bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """Karpathy-style GPT: fused qkv, learned positions, lm_head tied to the embedding."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, block: int = 16,
                 bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(NanoBlock(d, heads, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


class EncoderClassifier(nn.Module):
    """torch.nn.TransformerEncoder with an input projection and a classifier."""

    def __init__(self, d_in: int = 12, d: int = 32, heads: int = 4, layers: int = 2, classes: int = 5,
                 norm_first: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=48, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(dim=1))


def _ids(vocab: int, b: int = 2, t: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


def torch_encoder_post() -> tuple:
    return EncoderClassifier(norm_first=False), (torch.randn(2, 7, 12),), EXACT


def torch_encoder_pre() -> tuple:
    return EncoderClassifier(norm_first=True), (torch.randn(2, 7, 12),), EXACT


def nanogpt() -> tuple:
    return NanoGPT(), (_ids(50),), EXACT


def bert() -> tuple:
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32)
    return BertForMaskedLM(cfg), None, EXACT


def bert_classifier() -> tuple:
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg), None, EXACT


def gpt2() -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg), None, EXACT


def llama() -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg), None, FP32_NORM


def mistral() -> tuple:
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    return MistralForCausalLM(cfg), None, FP32_NORM


def qwen2() -> tuple:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(cfg), None, FP32_NORM


def phi3() -> tuple:
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return Phi3ForCausalLM(cfg), None, FP32_NORM


def vit() -> tuple:
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    return ViTForImageClassification(cfg), None, EXACT


def clip() -> tuple:
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=24, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=20)
    return CLIPModel(cfg), None, EXACT, ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]


def t5() -> tuple:
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg), None, FP32_NORM, ["logits"]


def gpt_neox() -> tuple:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=32)
    return GPTNeoXForCausalLM(cfg), None, EXACT


ZOO: dict[str, Callable[[], tuple]] = {
    "torch_encoder_post": torch_encoder_post,
    "torch_encoder_pre": torch_encoder_pre,
    "nanogpt": nanogpt,
    "bert": bert,
    "bert_classifier": bert_classifier,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "phi3": phi3,
    "vit": vit,
    "clip": clip,
    "t5": t5,
    "gpt_neox": gpt_neox,
}


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    inputs: object
    tolerance: float
    outputs: list[str] | None = None


def build(name: str, seed: int = 0) -> ZooModel:
    """A zoo model with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    model, inputs, tol, *outs = ZOO[name]()
    return ZooModel(name, model.eval(), inputs, tol, outs[0] if outs else None)
