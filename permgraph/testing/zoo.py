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


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, mlp: int, norm: str, prenorm: bool, bias: bool,
                 fused_qkv: bool, rope: bool, gated: bool) -> None:
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.prenorm, self.rope, self.fused, self.gated = prenorm, rope, fused_qkv, gated
        self.causal = True
        make_norm = (lambda: nn.LayerNorm(d, bias=bias)) if norm == "layer" else (lambda: nn.RMSNorm(d))
        self.norm1, self.norm2 = make_norm(), make_norm()
        kv_dim = kv_heads * self.dh
        if fused_qkv:
            self.qkv = nn.Linear(d, d + 2 * kv_dim, bias=bias)
        else:
            self.q = nn.Linear(d, d, bias=bias)
            self.k = nn.Linear(d, kv_dim, bias=bias)
            self.v = nn.Linear(d, kv_dim, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        self.up = nn.Linear(d, (2 if gated else 1) * mlp, bias=bias)
        self.down = nn.Linear(mlp, d, bias=bias)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        t, dh = x.shape[-2], x.shape[-1]
        inv = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=x.dtype) / dh))
        freqs = torch.outer(torch.arange(t, dtype=x.dtype), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
        return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split([d, self.kv * self.dh, self.kv * self.dh], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, self.h, self.dh).transpose(1, 2)
        k = k.view(b, t, self.kv, self.dh).transpose(1, 2)
        v = v.view(b, t, self.kv, self.dh).transpose(1, 2)
        if self.rope:
            q, k = self._rope(q), self._rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kv != self.h)
        return self.o(y.transpose(1, 2).reshape(b, t, d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            g, u = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(g) * u)
        return self.down(F.gelu(self.up(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    """A configurable decoder: the property-based tests draw its settings at random."""

    def __init__(self, vocab: int = 40, d: int = 16, heads: int = 4, kv_heads: int = 4, layers: int = 2,
                 mlp: int = 24, norm: str = "layer", prenorm: bool = True, bias: bool = True,
                 tied: bool = False, fused_qkv: bool = False, rope: bool = False, gated: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(TinyBlock(d, heads, kv_heads, mlp, norm, prenorm, bias, fused_qkv, rope, gated)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class FusedQKVViT(nn.Module):
    """timm-style attention: qkv reshaped to (B, N, 3, H, d), permuted and unbound."""

    def __init__(self, d: int = 24, heads: int = 4, layers: int = 2, patch: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
            n2=nn.LayerNorm(d), fc1=nn.Linear(d, 2 * d), fc2=nn.Linear(2 * d, d))) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            b, n, d = x.shape
            qkv = blk["qkv"](blk["n1"](x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, n, d))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["n2"](x))))
        return self.head(self.norm(x)[:, 0])


class PatchViT(nn.Module):
    """A small ViT for small grayscale images (sklearn digits 8x8, Fashion-MNIST 28x28):
    patch embedding, class token, learned positions, pre-LN blocks with separate q/k/v."""

    def __init__(self, image: int = 8, patch: int = 2, d: int = 32, heads: int = 4, layers: int = 2,
                 mlp: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        n = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(d, heads, heads, mlp, "layer", True, True, False, False, False)
                                    for _ in range(layers))
        for blk in self.blocks:  # bidirectional attention for images
            blk.causal = False
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


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


def mixtral() -> tuple:
    """Mixture of experts: 4 experts, top-2 routing, GQA and RoPE; the batched expert path
    (grouped_mm has no float64 kernel on CPU)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=60, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg)
    model.set_experts_implementation("batched_mm")
    return model, None, FP32_NORM


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


def llava() -> tuple:
    """A vision-language model: a CLIP vision tower whose patch features replace the image tokens
    of a Llama (inputs derived: pixel values and as many image tokens as the tower yields)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=28, patch_size=14, hidden_size=24,
                           intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_index=63, vision_feature_layer=-1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg), None, FP32_NORM


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


def tiny_gqa_rope() -> tuple:
    m = TinyTransformer(d=32, heads=4, kv_heads=2, norm="rms", rope=True, fused_qkv=True, gated=True, tied=True)
    return m, (_ids(40),), EXACT


def fused_qkv_vit() -> tuple:
    return FusedQKVViT(), (torch.randn(2, 3, 16, 16),), EXACT


def patch_vit() -> tuple:
    return PatchViT(), (torch.rand(2, 8, 8),), EXACT


def eager(factory: Callable[[], tuple]) -> Callable[[], tuple]:
    """The same transformers model with eager attention (matmul, softmax, mask add)."""
    def build_eager() -> tuple:
        model, *rest = factory()
        model.config._attn_implementation = "eager"
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = "eager"
        return (model, *rest)
    return build_eager


ZOO: dict[str, Callable[[], tuple]] = {
    "patch_vit": patch_vit,
    "tiny_gqa_rope": tiny_gqa_rope,
    "fused_qkv_vit": fused_qkv_vit,
    "torch_encoder_post": torch_encoder_post,
    "torch_encoder_pre": torch_encoder_pre,
    "nanogpt": nanogpt,
    "bert": bert,
    "bert_classifier": bert_classifier,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "mixtral": mixtral,
    "qwen2": qwen2,
    "phi3": phi3,
    "vit": vit,
    "clip": clip,
    "llava": llava,
    "t5": t5,
    "gpt_neox": gpt_neox,
    "bert_eager": eager(bert),
    "gpt2_eager": eager(gpt2),
    "llama_eager": eager(llama),
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


# one-layer parts of the audio-language models in the derived-input tests (not in ZOO: their
# towers need derived audio inputs, which those tests check)
TINY_TEXT = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_WHISPER_AUDIO = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 4, "encoder_ffn_dim": 48,
                      "num_mel_bins": 16, "max_source_positions": 20}
_AUDIO_LMS = {"audioflamingo3": ("AudioFlamingo3", "audio_token_id"),
              "qwen2_audio": ("Qwen2Audio", "audio_token_index")}


def tiny_audio_lm(arch: str, seed: int = 0) -> nn.Module:
    """A tiny audio-language model (``arch``: audioflamingo3 or qwen2_audio): a one-layer Qwen2 text
    model, a one-layer Whisper-style tower (16 mel bins, 40 frames), audio token id 100."""
    import transformers

    name, tok = _AUDIO_LMS[arch]
    cfg = getattr(transformers, f"{name}Config")(**{tok: 100}, text_config=dict(TINY_TEXT),
                                                  audio_config=dict(TINY_WHISPER_AUDIO))
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval()

