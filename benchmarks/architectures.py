"""Breadth benchmark: every transformers model type, compiled with the plain call and verified.

For each model type in ``transformers.CONFIG_MAPPING`` that has a base model class
(``AutoModel``), build it from a small config (hidden sizes, layers, heads, experts and
vocabularies shrunk generically; the config class's defaults when shrinking breaks it),
perturb the weights after init (so norms and scales are not all 1), cast to float64,
compile with ``pg.compile(model)`` (inputs derived from the config), and check that a
random permutation from the spec leaves the outputs unchanged (``pg.verify``, two seeds).

Each model runs in a worker subprocess under a per-model time limit; results are written
one JSON line per type as they come (so a long run can be read while it goes on), and
``docs/architectures.md`` is generated from them.

    python benchmarks/architectures.py                      # all types, 2 jobs
    python benchmarks/architectures.py --types llama,bert   # a subset (results merged into the file)
    python benchmarks/architectures.py --report-only        # regenerate the markdown from the results
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "architectures.jsonl"
REPORT = ROOT / "docs" / "architectures.md"

# -- small configs ----------------------------------------------------------------------------------

LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
          "num_decoder_layers", "num_encoder_layers", "depth", "num_blocks")
HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "model_dim", "d_embed")
FFN = ("intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "mlp_dim",
       "ffn_hidden_size", "hidden_dim")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
         "decoder_attention_heads")
KV_HEADS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SMALL = {
    **{k: 2 for k in LAYERS}, **{k: 64 for k in HIDDEN}, **{k: 96 for k in FFN}, **{k: 4 for k in HEADS},
    **{k: 2 for k in KV_HEADS}, **{k: 4 for k in EXPERTS},
    "head_dim": 16, "kv_channels": 16, "d_kv": 16, "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "max_position_embeddings": 128, "n_positions": 128, "vocab_size": 256, "vocab_size_per_layer_input": 256,
    "hidden_size_per_layer_input": 16, "latent_query_num": 8,  # a resampler's queries: image tokens (Kosmos-2)
    "entity_vocab_size": 256, "encoder_hash_byte_group_vocab": 256,  # LUKE's entities, BLT's hashed n-grams
    "d_latents": 64, "num_self_attends_per_block": 2,  # Perceiver's latent width and self-attention layers
    "output_embedding_size": 64,  # RemBERT's decoupled output embedding
    "downsample_hidden_size": 32,  # Qwen3-ASR/Omni audio towers' 3x3 conv stem (480 channels: minutes in float64)
    "pred_hidden_size": 64, "pred_num_hidden_layers": 2, "pred_num_attention_heads": 4,  # V-JEPA 2's predictor
}


def _free_ids(vocab: int, *configs):
    """Ids of ``vocab`` that none of ``configs`` uses as a special token, the top ones first."""
    taken = {v for c in configs for v in _token_ids(c) if isinstance(v, int)}
    return (i for i in range(vocab - 1, -1, -1) if i not in taken)


_TOKEN_KEYS = ("token_id", "token_index", "_token_ids")  # config keys of special token ids


def _token_ids(cfg) -> list[int]:
    out = []
    for k, v in vars(cfg).items():
        if k.endswith(_TOKEN_KEYS):
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, int):
                    out.append(x)
    return out


def _shrink(cfg, layers_only: bool, outer_ids: tuple[int, ...] = ()) -> None:
    """Shrink ``cfg`` and its sub-configs. A vocabulary shrinks with its config's own special token ids
    moved into it (``_own_ids_below``); one that the image token ids of the configs around it index is
    kept (a VLM's ``image_token_id`` lives on the outer config, the vocabulary on a sub-config; derived
    inputs put image tokens in ``input_ids``), except ``text_config``'s, whose outer ids ``_consistent``
    moves into the shrunk vocabulary."""
    from transformers import PretrainedConfig

    if "allow_global_per_layer_attribute_access" in dir(cfg):  # heterogeneous configs (Gemma 4): per-layer
        _set(cfg, "allow_global_per_layer_attribute_access", True)  # values follow the global ones we set
    ids = tuple(outer_ids) + tuple(_token_ids(cfg))
    images = tuple(outer_ids) + tuple(v for k, v in vars(cfg).items() if isinstance(v, int)
                                      and ("image_token" in k or "video_token" in k))  # derived inputs use these
    text = getattr(cfg, "text_config", None)
    for v in list(vars(cfg).values()):  # ``text_config``'s vocabulary shrinks: _consistent moves the ids into it
        if isinstance(v, PretrainedConfig):
            _shrink(v, layers_only, () if v is text else images)
    moved = False
    for k, small in SMALL.items():
        v = getattr(cfg, k, None)
        if not isinstance(v, int) or isinstance(v, bool) or v <= small:
            continue
        if layers_only and k not in LAYERS and k not in EXPERTS:
            continue
        if k.startswith("vocab_size") and any(t >= small for t in ids):
            if any(t >= small for t in outer_ids):  # another config's placeholders: the vocabulary kept
                continue
            if not moved:  # the config's own special tokens (bos, eos, pad...) moved into the small vocabulary
                _own_ids_below(cfg, small)
                moved = True
        try:
            setattr(cfg, k, small)
        except Exception:  # noqa: BLE001 - read-only properties
            pass
    for k in ("width_coefficient", "depth_coefficient"):  # EfficientNet's compound scaling (B7's 2.0, 3.1): B0's
        if isinstance(getattr(cfg, k, None), float) and getattr(cfg, k) > 1 and not layers_only:
            _set(cfg, k, 1.0)
            if k == "width_coefficient" and isinstance(getattr(cfg, "hidden_dim", None), int):
                _set(cfg, "hidden_dim", 1280)  # the top conv's width at B0's scale, which its norm reads
    if isinstance(getattr(cfg, "qk_rope_head_dim", None), int) and not layers_only:  # multi-head latent attention
        for k, v in (("qk_rope_head_dim", 8), ("qk_nope_head_dim", 16), ("v_head_dim", 16), ("kv_lora_rank", 32),
                     ("q_lora_rank", 48), ("head_dim", 8), ("qk_head_dim", 24)):
            if getattr(cfg, k, None) is not None:
                try:
                    setattr(cfg, k, v)
                except Exception:  # noqa: BLE001
                    pass
        if isinstance(getattr(cfg, "num_key_value_heads", None), int):  # latent attention: one kv head per head
            _set(cfg, "num_key_value_heads", cfg.num_attention_heads)
        rope = getattr(cfg, "rope_parameters", None)  # a partial rotary over head_dim that is the rope part
        part = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None  # (Mistral 4's half)
        if isinstance(part, float) and 0 < part < 1 and getattr(cfg, "head_dim", None) is not None:
            _set(cfg, "head_dim", int(cfg.qk_rope_head_dim / part))
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if isinstance(getattr(cfg, "first_k_dense_replace", None), int) and isinstance(n_layers, int) \
            and cfg.first_k_dense_replace >= n_layers:  # DeepSeek-V3, GLM-4.5: keep one MoE layer
        _set(cfg, "first_k_dense_replace", n_layers - 1)
    heads, dim = getattr(cfg, "num_heads", None), getattr(cfg, "embed_dim", None)  # a Swin's stages double the
    if isinstance(heads, (list, tuple)) and isinstance(dim, int) and not layers_only \
            and any(not isinstance(h, int) or h <= 0 or (dim << i) % h for i, h in enumerate(heads)):  # width: heads
        _set(cfg, "num_heads", [2 << i for i in range(len(heads))])  # that divide each stage's shrunk width
    if isinstance(getattr(cfg, "num_kv_shared_layers", None), int) and isinstance(n_layers, int) \
            and cfg.num_kv_shared_layers >= n_layers:  # Gemma 3n: the last layers reuse an earlier one's cache
        _set(cfg, "num_kv_shared_layers", n_layers // 2)
    if isinstance(getattr(cfg, "insert_layer_id", None), int) and isinstance(n_layers, int) \
            and cfg.insert_layer_id >= n_layers:  # MiniCPM-V's window-attention merger: inside the shrunk tower
        _set(cfg, "insert_layer_id", 0)
    if isinstance(getattr(cfg, "n_group", None), int) and not layers_only:  # group-limited routing: groups
        _set(cfg, "n_group", 2)  # must divide the (shrunk) experts
        _set(cfg, "topk_group", 1)
    if (getattr(cfg, "num_experts_per_tok", 0) is None and not layers_only  # DeepSeek-V2's default config
            and any(isinstance(getattr(cfg, e, None), int) for e in EXPERTS)):
        _set(cfg, "num_experts_per_tok", SMALL["num_experts_per_tok"])
    for k in ("layer_types", "mlp_layer_types"):  # per-layer lists follow the layer count
        v = getattr(cfg, k, None)
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(v, list) and isinstance(n, int) and len(v) > n:
            try:
                setattr(cfg, k, v[:n])
            except Exception:  # noqa: BLE001
                pass


def _own_ids_below(cfg, vocab: int) -> None:
    """The special token ids at or above ``vocab`` of ``cfg`` and of its sub-configs that have no vocabulary
    of their own (Phi-4 multimodal's image and audio placeholders live on its vision and audio configs)
    moved to free top ids (equal ids stay equal): a 150k text vocabulary kept for its bos/eos ids was most
    of a small model's parameters."""
    configs, todo = [], [cfg]
    while todo:
        c = todo.pop()
        configs.append(c)
        todo += [v for v in _subconfigs(c) if not hasattr(v, "vocab_size")]
    free, new = _free_ids(vocab, *configs), {}
    for c in configs:
        for k, v in list(vars(c).items()):
            if not k.endswith(_TOKEN_KEYS):
                continue
            vs = v if isinstance(v, (list, tuple)) else [v]
            if not any(type(x) is int and x >= vocab for x in vs):
                continue
            for x in vs:
                if type(x) is int and x >= vocab and x not in new:
                    new[x] = next(free)
            out = [new.get(x, x) if type(x) is int else x for x in vs]
            _set(c, k, type(v)(out) if isinstance(v, (list, tuple)) else out[0])


def _set(cfg, k: str, v) -> None:
    try:
        setattr(cfg, k, v)
    except Exception:  # noqa: BLE001 - read-only properties
        pass


def _consistent(cfg, model_type: str) -> None:
    """A multimodal config's parts made to agree again after shrinking (and where the class
    defaults disagree): placeholder tokens inside the text vocabulary, the vision or audio tower's
    output width the text width, an audio projector's cross-attention width the tower's, M-RoPE
    sections the rotary width, Gemma 3's pooled tokens per image a divisor of its patch grid,
    deepstack layers inside the tower."""
    text, vision = getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)
    vocab = getattr(text, "vocab_size", None) if text is not None else None
    if isinstance(vocab, int):  # the outer config's special tokens (image, video, audio placeholders, their
        # start/end markers) in the vocabulary, the top ids of the shrunk one; a placeholder id the class
        # leaves unset (Voxtral's audio, MiniCPM-V's image and video: None) given one, as every checkpoint does
        ids = {k: v for k, v in vars(cfg).items()
               if (k.endswith("token_id") or k.endswith("token_index"))
               and (v is None and k in ("audio_token_id", "audio_token_index") and _audio_tower(cfg)
                    or v is None and k in _VISION_PLACEHOLDERS and vision is not None
                    or isinstance(v, int) and not isinstance(v, bool) and v >= vocab)}
        free = _free_ids(vocab, cfg, text)
        for k in ids:
            _set(cfg, k, next(free))
    for c in [cfg, *_subconfigs(cfg)]:  # a partial rotary's width inside the (shrunk) head (CodeGen, GPT-J);
        # a config with its own head_dim sizes heads apart from the width
        width, heads = (next((getattr(c, k) for k in keys if isinstance(getattr(c, k, None), int)), None)
                        for keys in (HIDDEN, HEADS))
        rot = getattr(c, "rotary_dim", None)
        if isinstance(rot, int) and width and heads and not hasattr(c, "head_dim") and rot > width // heads:
            _set(c, "rotary_dim", width // heads)
    audio = getattr(cfg, "audio_config", None)
    depths, patch = getattr(audio, "depths", None), getattr(audio, "patch_embeds_hidden_size", None)
    if isinstance(depths, (list, tuple)) and depths and isinstance(patch, int) \
            and patch << len(depths) - 1 != audio.hidden_size:  # CLAP's HTSAT: stages that double the patch
        _set(audio, "patch_embeds_hidden_size", audio.hidden_size >> len(depths) - 1)  # width end at hidden_size
    for c in _subconfigs(cfg):  # a VQ-VAE whose attention is as wide as its last stage (Emu3's: base_channels x the
        base, mult, width = (getattr(c, k, None) for k in ("base_channels", "channel_multiplier", "hidden_size"))
        if isinstance(base, int) and isinstance(mult, (list, tuple)) and mult and isinstance(width, int) \
                and base * mult[-1] != width:  # last multiplier): base channels that its group norms (32
            _set(c, "base_channels", max(width // mult[-1], 32))  # groups) divide, the width their last stage's
            _set(c, "hidden_size", c.base_channels * mult[-1])
    speech, dec = getattr(cfg, "speech_config", None), getattr(cfg, "decoder_config", None)  # CLVP's speech encoder
    if isinstance(getattr(speech, "vocab_size", None), int) and isinstance(getattr(dec, "vocab_size", None), int) \
            and speech.vocab_size < dec.vocab_size:  # reads the codes its decoder's argmax picks: all of them
        _set(speech, "vocab_size", dec.vocab_size)
    for c in _subconfigs(cfg):  # CLVP's encoders rotate max(projection_dim / (2 x heads), 32) channels of a head:
        if getattr(c, "use_rotary_embedding", False) is True and isinstance(getattr(c, "projection_dim", None), int) \
                and isinstance(getattr(c, "hidden_size", None), int) and c.hidden_size < 128:  # heads of 32
            _set(c, "num_attention_heads", c.hidden_size // 32)  # channels, a projection as wide as the
            _set(c, "projection_dim", c.hidden_size)  # encoders (their embeddings' cosine)
    hidden = getattr(text, "hidden_size", None) if text is not None else None
    if isinstance(getattr(audio, "output_dim", None), int) and isinstance(hidden, int) and audio.output_dim != hidden:
        _set(audio, "output_dim", hidden)  # the audio tower's output width the text width (Qwen3-ASR)
    tower = vision if vision is not None else audio if audio is not None else getattr(cfg, "encoder_config", None)
    width = getattr(tower, "hidden_size", None)
    for sub in _subconfigs(cfg):  # a projector's cross-attention reads the tower (Granite Speech's, BLIP-2's
        # Q-Former; BLIP's text decoder)
        if isinstance(width, int) and sub is not tower and isinstance(getattr(sub, "encoder_hidden_size", None), int):
            _set(sub, "encoder_hidden_size", width)
    for c in _nested(cfg):  # a head that reads its audio tower's states (Nemotron 3 diarization's head_config,
        a = getattr(c, "audio_config", None)  # whose audio_hidden_size its config validates: the tower's width)
        for sub in _subconfigs(c):
            if isinstance(getattr(sub, "audio_hidden_size", None), int) and isinstance(getattr(a, "hidden_size", None),
                                                                                       int):
                _set(sub, "audio_hidden_size", a.hidden_size)
    for c in _nested(cfg):  # a SAM tower whose downsampling convolutions (DeepSeek-OCR 2's, Unlimited-OCR's: 512
        sam = getattr(c, "sam_config", None)  # and 1024, the default encoder width) feed the encoder beside it:
        enc = getattr(c, "encoder_config", None) if sam is not None else None  # ending at its shrunk width (read
        if isinstance(getattr(sam, "downsample_channels", None), (list, tuple)) \
                and isinstance(getattr(enc, "hidden_size", None), int):  # only beside a SAM: WavTokenizer's
            n = len(sam.downsample_channels)  # encoder_config is a property that builds and validates one)
            _set(sam, "downsample_channels", [enc.hidden_size >> (n - 1 - i) for i in range(n)])
    glob, local = getattr(cfg, "global_config", None), getattr(cfg, "encoder_config", None)  # BLT: the global
    if isinstance(getattr(local, "hidden_size_global", None), int) and isinstance(getattr(glob, "hidden_size", None),
                                                                                   int):  # transformer reads the
        _set(glob, "hidden_size", local.hidden_size * (getattr(local, "cross_attn_k", None) or 1))  # local encoder's
        if isinstance(getattr(glob, "head_dim", None), int):  # (its attention's heads: the width over the heads)
            _set(glob, "head_dim", glob.hidden_size // glob.num_attention_heads)
        for c in _subconfigs(cfg):  # patches (cross_attn_k per patch), the local ones its width
            if isinstance(getattr(c, "hidden_size_global", None), int):
                _set(c, "hidden_size_global", glob.hidden_size)
    vis_width = getattr(vision, "width_coefficient", None)  # ALIGN: its contrastive width is the EfficientNet's last
    if vis_width == 1.0 and isinstance(getattr(cfg, "projection_dim", None), int) \
            and isinstance(getattr(vision, "out_channels", None), (list, tuple)):  # stage's (at B0's scale when shrunk)
        _set(cfg, "projection_dim", vision.out_channels[-1])
    for c in [cfg, *_subconfigs(cfg)]:  # sliding-attention heads sized and no window (Step3p7, whose forward
        if isinstance(getattr(c, "num_sliding_attention_heads", None), int) \
                and "sliding_window" in vars(c) and c.sliding_window is None:  # builds the sliding mask always):
            _set(c, "sliding_window", 4)  # half the derived text
    width, coord, shape = (getattr(cfg, k, None) for k in ("hidden_size", "coordinate_size", "shape_size"))
    shrink = getattr(cfg, "channel_shrink_ratio", None)
    if isinstance(width, int) and (isinstance(shrink, int) and width % 6 or isinstance(coord, int)
                                   and isinstance(shape, int) and 4 * coord + 2 * shape != width):
        _set(cfg, "hidden_size", 96)  # six layout embeddings (LiLT's; LayoutLMv3's four coordinates and two
        for k in ("coordinate_size", "shape_size"):  # shapes) split the width: one that 6 divides, each a sixth
            if isinstance(getattr(cfg, k, None), int):
                _set(cfg, k, 16)
    if getattr(cfg, "visual_embed", False) is True and isinstance(getattr(cfg, "input_size", None), int) \
            and cfg.input_size > 32:  # LayoutLMv3's page image, sized by input_size: the derived images' 32 pixels
        _set(cfg, "input_size", 32)
    langs = getattr(cfg, "languages", None)  # per-language adapters and no default language (X-MOD's forward
    if "default_language" in vars(cfg) and cfg.default_language is None and isinstance(langs, (list, tuple)) \
            and langs:  # then needs lang_ids): the first language, as set_default_language would set
        _set(cfg, "default_language", langs[0])
    heads = getattr(cfg, "num_attention_heads", None)  # a decoder at the top that lacks the key/value heads its
    if isinstance(heads, int) and not hasattr(cfg, "num_key_value_heads") \
            and any(isinstance(getattr(c, "num_key_value_heads", None), int) for c in _subconfigs(cfg)):  # attention
        _set(cfg, "num_key_value_heads", heads)  # reads, its encoder's config has them (Moonshine Streaming): MHA
    enc = getattr(cfg, "encoder", None)  # an encoder-decoder of two sub-configs (T5Gemma): the decoder's
    dec = getattr(cfg, "decoder", None)  # cross-attention reads the (shrunk) encoder's width
    if isinstance(getattr(dec, "cross_attention_hidden_size", None), int) \
            and isinstance(getattr(enc, "hidden_size", None), int):
        _set(dec, "cross_attention_hidden_size", enc.hidden_size)
    if getattr(enc, "text_config", None) is not None and isinstance(getattr(dec, "vocab_size", None), int):
        _consistent(enc, model_type)  # an encoder that is a VLM (T5Gemma 2): its placeholders in its text's
        for k in ("image_token_index", "image_token_id", "eoi_token_index"):  # shrunk vocabulary, the outer
            if isinstance(getattr(cfg, k, None), int) and isinstance(getattr(enc, k, None), int):  # config's
                _set(cfg, k, getattr(enc, k))  # copies of them the same, the decoder's vocabulary the encoder's
        for c in (dec, cfg):
            if isinstance(getattr(c, "vocab_size", None), int):
                _set(c, "vocab_size", enc.text_config.vocab_size)
    if model_type in _DROPOUT_RATE_UNSET and text is not None and not hasattr(text, "dropout_rate"):
        _set(text, "dropout_rate", 0.0)
    if text is None and "text_config" not in vars(cfg) and "rope_parameters" in vars(cfg) \
            and getattr(cfg, "head_dim", None) is None:  # a VLM's text model on its own (Qwen2-VL's, GLM-4V's),
        _mrope(cfg, model_type)  # heads the width over the heads: its M-RoPE sections the shrunk rotary width
    for c in (cfg, text):
        if model_type in _HEAD_DIM_UNSET and c is not None and getattr(c, "head_dim", 0) is None:
            _set(c, "head_dim", c.hidden_size // c.num_attention_heads)
    attn = getattr(cfg, "attn_config", None)  # DBRX: its attention reads rope_theta from attn_config, which the
    if attn is not None and not hasattr(attn, "rope_theta") and isinstance(getattr(cfg, "rope_parameters", None), dict):
        _set(attn, "rope_theta", cfg.rope_parameters.get("rope_theta"))  # config keeps in rope_parameters
        if getattr(attn, "clip_qkv", 0) is None:  # and clamps to None, which torch refuses: the checkpoints' 8
            _set(attn, "clip_qkv", 8.0)
    kinds = getattr(text, "layer_types", None)  # a hybrid VLM's text keeps an attention layer (Qwen3.5's: linear
    if isinstance(kinds, list) and kinds and set(kinds) == {"linear_attention"} \
            and getattr(text, "model_type", None) == f"{model_type}_text" \
            and "full_attention" in (getattr(type(text)(), "layer_types", None) or ()):  # ones first; the VLM's
        _set(text, "layer_types", [*kinds[:-1], "full_attention"])  # forward reads an attention layer's cache)
    for c in (vision, cfg):  # deepstack layers inside a VLM's tower, or a tower on its own (Qwen3-VL's)
        n = getattr(c, "depth", None) or getattr(c, "num_hidden_layers", None)
        if isinstance(getattr(c, "deepstack_visual_indexes", None), (list, tuple)) and isinstance(n, int):
            _set(c, "deepstack_visual_indexes", [i for i in c.deepstack_visual_indexes if i < n] or [n - 1])
    if text is None or vision is None:
        return
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and 0 < patch and size // patch > 100:  # Pixtral's 1540
        _set(vision, "image_size", 16 * patch)  # pixels (the largest image it takes): derived images 16 patches a side
    mm = [v for v in _token_ids(cfg) if not isinstance(v, bool)]  # ids left outside (lists): a larger vocabulary
    if mm and isinstance(getattr(text, "vocab_size", None), int) and max(mm) >= text.vocab_size:
        _set(text, "vocab_size", max(mm) + 1)
    hidden = getattr(text, "hidden_size", None)
    for k in ("out_hidden_size", "text_hidden_size"):  # the tower's output width (HunYuan-VL's text_hidden_size)
        if isinstance(getattr(vision, k, None), int) and hidden:
            _set(vision, k, hidden)
    if hidden and any(isinstance(getattr(cfg, k, None), int) for k in ("image_token_id", "image_token_index")):
        for c in (cfg, vision):  # a VLM's projector into the text (PaliGemma's projection_dim): the text width
            if isinstance(getattr(c, "projection_dim", None), int) and c.projection_dim != hidden:
                _set(c, "projection_dim", hidden)
    _mrope(text, model_type)
    depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None)
    for k in ("vision_feature_layers", "vision_feature_layer"):  # the tower's layers whose features the projector
        layers = getattr(cfg, k, None)  # concatenates (VipLlava's -2, -5, -8, -11, 6): those inside the shrunk
        if isinstance(layers, (list, tuple)) and isinstance(depth, int) \
                and any(not -depth - 1 <= i <= depth for i in layers):  # tower's hidden states
            _set(cfg, k, type(layers)(i for i in layers if -depth - 1 <= i <= depth) or type(layers)([-1]))
    high = getattr(cfg, "high_res_vision_config", None)  # a second, high-resolution tower (DeepSeek-VL hybrid):
    n = getattr(high, "num_hidden_layers", None)  # the VLM reads its first global-attention layer's states
    if isinstance(getattr(high, "global_attn_indexes", None), (list, tuple)) and isinstance(n, int):
        _set(high, "global_attn_indexes", [i for i in high.global_attn_indexes if i < n] or [n - 1])
    ratio, width = getattr(vision, "pixel_shuffle_ratio", None), getattr(vision, "hidden_size", None)
    if isinstance(ratio, float) and isinstance(width, int) and isinstance(getattr(vision, "projector_input_dim", None),
                                                                           int):  # Llama 4: the pixel shuffle's
        _set(vision, "intermediate_size", int(width / ratio ** 2))  # MLP reads the width over ratio^2 (the tower's
        for k in ("projector_input_dim", "projector_output_dim", "vision_output_dim"):  # MLP's width too), its
            _set(vision, k, width)  # projector the shrunk width, which the VLM's projector reads
    scale, size, patch = (getattr(cfg, "scale_factor", None) or getattr(cfg, "pixel_shuffle_factor", None)
                          or getattr(cfg, "downsample_factor", None),
                          getattr(vision, "image_size", None), getattr(vision, "patch_size", None))
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (scale, size, patch)) \
            and (size // patch) % scale and size // patch >= scale:  # a pixel shuffle by scale_factor (Idefics3,
        _set(vision, "image_size", patch * scale * (size // patch // scale))  # SmolVLM; ModernVBERT's
        # pixel_shuffle_factor, Aya Vision's downsample_factor) needs whole blocks of patches
    tokens, size, patch = (getattr(cfg, "mm_tokens_per_image", None), getattr(vision, "image_size", None),
                           getattr(vision, "patch_size", None))
    if isinstance(tokens, int) and isinstance(size, int) and isinstance(patch, int):
        side = size // patch
        if side % math.isqrt(tokens) or math.isqrt(tokens) > side:
            per = next(d for d in range(side // 2, 0, -1) if side % d == 0)
            _set(cfg, "mm_tokens_per_image", per * per)
    table = getattr(cfg, "projector_patch_to_query_dict", None)  # a projector's queries per patch count (Aria's:
    if isinstance(table, dict) and isinstance(size, int) and isinstance(patch, int) and patch > 0:  # 1225, 4900
        n = (size // patch) ** 2  # patches): the shrunk tower's patch count, with as many queries (at most 16)
        if n not in table:
            _set(cfg, "projector_patch_to_query_dict", {n: min(n, 16)})
            _set(cfg, "max_value_projector_patch_to_query_dict", min(n, 16))


def _rope_per_kind(cfg) -> None:
    """Rope parameters that are neither global (no ``rope_type``) nor per layer kind (no dicts), as a class
    that reads them per kind leaves them (Cohere Compass's ``{}``; the M-RoPE sections ``_mrope`` set): the
    default rope for each layer kind, with those sections."""
    for c in (cfg, *_subconfigs(cfg)):
        rope, kinds = getattr(c, "rope_parameters", None), getattr(c, "layer_types", None)
        if isinstance(rope, dict) and "rope_type" not in rope and isinstance(kinds, list) and kinds \
                and all(isinstance(k, str) for k in kinds) and not any(isinstance(v, dict) for v in rope.values()):
            _set(c, "rope_parameters", {k: {"rope_type": "default", "rope_theta": 10000.0, **rope} for k in kinds})


# the names a VQ image tokenizer's codes have in a tokenizer's vocabulary, which the model reads from its config's
# vocabulary_map (None in the class: the checkpoints' map comes from their tokenizer)
_VQ_CODE_NAMES = {"chameleon": lambda i: "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z",
                  "emu3": lambda i: f"<|visual token {i:06d}|>"}


def _vocabulary_map(cfg, model_type: str) -> None:
    """A vocabulary map for a VQ image tokenizer's model (Chameleon, Emu3) that has none: the image placeholder
    ``<image>``, Emu3's end of row ``<|extra_200|>`` and 32 codes (the codebook shrunk to them), the top ids of
    the text vocabulary below the special tokens."""
    vq, text = getattr(cfg, "vq_config", None), getattr(cfg, "text_config", None) or cfg
    names = _VQ_CODE_NAMES.get(model_type)
    if names is None or vq is None or getattr(cfg, "vocabulary_map", 0) is not None or not isinstance(
            getattr(text, "vocab_size", None), int):
        return
    for k in ("num_embeddings", "codebook_size"):
        if isinstance(getattr(vq, k, None), int):
            _set(vq, k, 32)
    free = _free_ids(text.vocab_size, cfg, text)
    image, eol = next(free), next(free)
    vocab = {"<image>": image, "<|extra_200|>": eol, **{names(i): next(free) for i in range(32)}}
    _set(cfg, "vocabulary_map", vocab)
    _set(cfg, "image_token_id", image)


_VISION_PLACEHOLDERS = ("image_token_id", "video_token_id")  # BLIP-2's image_token_index: "sizes completed"

# config classes that leave head_dim None while their attention reads it (their checkpoints set it):
# the width over the heads, as elsewhere
_HEAD_DIM_UNSET = ("hunyuan_v1_dense", "hunyuan_v1_moe", "hunyuan_vl", "hunyuan_vl_text", "ministral")
# types whose text config lacks the dropout_rate its modules read (the outer T5Gemma 2 config sets it): 0
_DROPOUT_RATE_UNSET = ("t5gemma2_encoder",)


def _mrope(text, model_type: str) -> None:
    """M-RoPE sections (a VLM's text config) that split the (shrunk) rotary width."""
    hidden = getattr(text, "hidden_size", None)
    rope = getattr(text, "rope_parameters", None)
    heads = getattr(text, "num_attention_heads", None)
    mrope = "mrope_section" in rope or "mrope_section" in getattr(type(text), "ignore_keys_at_rope_validation", ()) \
        if isinstance(rope, dict) else False  # GLM-4V: M-RoPE sections from the class's default, not the config
    if isinstance(rope, dict) and ("vl" in model_type or mrope) and hidden and heads:
        rotary = int((getattr(text, "head_dim", None) or hidden // heads) * rope.get("partial_rotary_factor", 1.0))
        half = rotary // 2  # the sections split the rotary frequencies (a partial rotary's only)
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]


def _audio_tower(cfg) -> bool:
    """Whether ``cfg`` has an audio tower's sub-config (``audio_config``; Granite Speech's ``encoder_config``)."""
    from transformers import PretrainedConfig

    return any(isinstance(v, PretrainedConfig) and ("audio" in k or k == "encoder_config")
               for k, v in vars(cfg).items())


def _derived_image_side(cfg) -> int:
    """The side of the images the derived inputs give ``cfg``'s model (``permgraph.inputs``: the vision
    config's ``image_size`` or ``crop_size``, else 32 pixels)."""
    vcfg = next((getattr(cfg, k) for k in ("vision_config", "image_config") if getattr(cfg, k, None) is not None),
                cfg)
    size = getattr(vcfg, "image_size", None) or getattr(vcfg, "crop_size", None) or 32
    return size if isinstance(size, int) else size[0]


def _fit_derived_images(cfg) -> None:
    """Sizes that follow the derived images where the class's defaults assume larger ones: a windowed ViT
    backbone's windows (LW-DETR's ``num_windows`` a square, RF-DETR's one per side) a divisor of the
    image's patch grid (32-pixel images: 2 patches a side, no window otherwise)."""
    side = _derived_image_side(cfg)
    for c in (cfg, *_subconfigs(cfg)):
        n, patch = getattr(c, "num_windows", None), getattr(c, "patch_size", None)
        if not (isinstance(n, int) and isinstance(patch, int) and patch > 0 and side // patch > 0):
            continue
        grid, squared = side // patch, isinstance(getattr(c, "num_windows_side", None), int)
        per_side = c.num_windows_side if squared else n
        if per_side > 0 and grid % per_side == 0:
            continue
        w = next(d for d in range(min(per_side, grid), 0, -1) if grid % d == 0)
        _set(c, "num_windows", w * w if squared else w)
        if squared:
            _set(c, "num_windows_side", w)


def _detr_on_small_images(cfg) -> None:
    """A DETR whose ViT backbone's feature stages lie past its shrunk layers and whose queries outnumber
    the derived images' tokens (LW-DETR, RF-DETR: 32 pixels, 2 patches a side): a layer per stage, as
    many queries as a level has tokens; LW-DETR's projector as wide as the shrunk decoder."""
    _stages_inside(cfg.backbone_config)
    _set(cfg, "num_queries", (_derived_image_side(cfg) // cfg.backbone_config.patch_size) ** 2)
    if isinstance(getattr(cfg, "projector_in_channels", None), list):
        _set(cfg, "projector_in_channels", [cfg.d_model] * len(cfg.projector_scale_factors))
        _set(cfg, "projector_out_channels", cfg.d_model)


def _mimi_codec(cfg) -> None:
    """A Mimi codec inside a speech model (CSM, Kyutai speech-to-text): depthwise upsampling, one group per
    (shrunk) channel, and 8 filters at its first stage (64 doubled per stage: 23M parameters); CSM's depth
    decoder reads the shrunk backbone's width, not its default 2048."""
    codec = cfg.codec_config
    _set(codec, "upsample_groups", codec.hidden_size)
    _set(codec, "num_filters", 8)
    dec = getattr(cfg, "depth_decoder_config", None)
    if isinstance(getattr(dec, "backbone_hidden_size", None), int):
        _set(dec, "backbone_hidden_size", cfg.hidden_size)


def _vibevoice_codec(cfg) -> None:
    """VibeVoice's acoustic (and semantic) tokenizers: 32 filters doubled over 7 stages of up to 8 blocks
    (687M parameters): 4 filters, one block a stage (1.5M)."""
    for c in (cfg, *_subconfigs(cfg)):
        depths = getattr(c, "depths", None)
        ratios = getattr(c, "downsampling_ratios", getattr(c, "upsampling_ratios", None))
        if isinstance(getattr(c, "num_filters", None), int) and isinstance(depths, (list, tuple)) \
                and isinstance(ratios, (list, tuple)):
            _set(c, "num_filters", 4)
            _set(c, "depths", [1] * len(depths))


def _dac(cfg) -> None:
    """DAC's convolution widths (the encoder's 64 doubled per stride, the decoder's 1536 halved): 8 and 64."""
    _set(cfg, "encoder_hidden_size", 8)
    _set(cfg, "decoder_hidden_size", 64)


def _janus(cfg) -> None:
    """Janus's image-generation parts at the shrunk text width: the VQ-VAE's codebook (16384 codes) and
    channels, the generation aligner and head (2048 wide: 72M and 38M parameters)."""
    vq, width = cfg.vq_config, cfg.text_config.hidden_size
    for k, v in (("image_token_embed_dim", width), ("projection_dim", width), ("num_embeddings", 256),
                 ("base_channels", 32), ("latent_channels", 32)):
        _set(vq, k, v)


def _florence2(cfg) -> None:
    """Florence-2's DaViT stages (widths 128 to 1024, 9 blocks in the third: 90M parameters): a block
    each, widths 16 to 128, a head (and group) per 16 channels."""
    v = cfg.vision_config
    _set(v, "embed_dim", [16, 32, 64, 128])
    _set(v, "depths", [1, 1, 1, 1])
    _set(v, "num_heads", [1, 2, 4, 8])
    _set(v, "num_groups", [1, 2, 4, 8])


def _glm5_next_vision(cfg) -> None:
    """GLM-5 Next's vision tower on its own: its merger's output and MLP widths (1536, 10240) shrunk."""
    _set(cfg, "out_hidden_size", cfg.hidden_size)
    _set(cfg, "projection_intermediate_size", SMALL["intermediate_size"])


def _depth_pro(cfg) -> None:
    """DepthPro on the derived 32-pixel images (its patches are 384 pixels and its smallest scale a
    quarter): 8-pixel patches of 2-pixel ViT patches, the hooks inside the shrunk ViT, fusion widths
    shrunk (1024, 256)."""
    _set(cfg, "patch_size", _derived_image_side(cfg) // 4)
    _set(cfg, "intermediate_hook_ids", [1, 0])
    _set(cfg, "scaled_images_feature_dims", [64, 64, 32])
    _set(cfg, "intermediate_feature_dims", [32, 32])
    _set(cfg, "fusion_hidden_size", 32)
    for k in ("image_model_config", "patch_model_config", "fov_model_config"):
        sub = getattr(cfg, k, None)
        if sub is not None:
            _set(sub, "image_size", cfg.patch_size)
            _set(sub, "patch_size", 2)


def _autoformer(cfg) -> None:
    """Autoformer's auto-correlation adds its attention mask (built whenever the forward is exported) to
    weights of shape (heads, query length, head dim) viewed as (heads, query length, key length): sequence
    lengths equal to the head dim (32: 64 wide, 2 heads), the decoder's label and horizon half of it."""
    dim = cfg.d_model // cfg.encoder_attention_heads
    _set(cfg, "context_length", dim)
    _set(cfg, "label_length", dim // 2)
    _set(cfg, "prediction_length", dim // 2)


def _informer(cfg) -> None:
    """Informer's full attention (ProbSparse samples keys with torch.randint: no fixed output to verify)
    without distilling (its convolutions halve the encoder's states but not the exported mask)."""
    _set(cfg, "attention_type", "full")
    _set(cfg, "distil", False)


def _sam2(cfg) -> None:
    """SAM 2 on the derived 32-pixel images: its Hiera stages' widths from the shrunk width (the class
    keeps 96 to 768), the neck's channel list and FPN width to match (the mask decoder's), the feature
    sizes and the prompt encoder's image size those of 32 pixels (strides 4, 8, 16)."""
    vision, side = cfg.vision_config, _derived_image_side(cfg)
    hiera = vision.backbone_config
    widths = [hiera.hidden_size << i for i in range(len(hiera.embed_dim_per_stage))]
    _set(hiera, "embed_dim_per_stage", widths)
    _set(vision, "backbone_channel_list", widths[::-1])
    _set(vision, "fpn_hidden_size", cfg.mask_decoder_config.hidden_size)
    _set(vision, "backbone_feature_sizes", [[side >> i, side >> i] for i in (2, 3, 4)])
    _set(cfg.prompt_encoder_config, "image_size", side)


def _sam3(cfg) -> None:
    """SAM 3's vision neck (FPN) as wide as the shrunk parts that read it (its DETR encoder, the tracker's
    mask decoder), not the class's 256."""
    reader = getattr(cfg, "detr_encoder_config", None) or cfg.mask_decoder_config
    _set(cfg.vision_config, "fpn_hidden_size", reader.hidden_size)


def _dots3_note(cfg) -> None:
    """Dots3-Note's audio attention projects keys to the full width (its checkpoint: kv heads = heads); its
    stem's output width, which the class derives once (``downsample_hidden_size`` x ceil(mels / 8)), follows
    the shrunk ``downsample_hidden_size`` (stale, the tower failed on every derived audio input)."""
    audio = cfg.audio_config
    _set(audio, "num_key_value_heads", audio.num_attention_heads)
    _set(audio, "conv_output_size", audio.downsample_hidden_size * ((audio.feature_size + 7) // 8))


def _mha_audio(cfg) -> None:
    """Nemotron 3.5 Transcribe's audio towers (its ASR encoder, its diarization model's) size ``v_proj`` by the
    query heads and ``k_proj`` by the key/value heads (the checkpoints have as many of each): a key/value
    head per query head, as ``_kv_heads_refused`` finds for the towers on their own (its eager check does not
    reach the nested towers here, whose export then fails in SDPA's broadcast)."""
    for c in _nested(cfg):
        _one_kv_head_per_head(c)


def _neomme(cfg) -> None:
    """NeoMME's value embeddings go into its first and last full-attention layers, which the shrunk layer
    kinds (the class's first two: sliding ones) lack: a sliding layer then a full one."""
    for c in _nested(cfg):
        kinds, n = getattr(c, "layer_types", None), getattr(c, "num_hidden_layers", None)
        if isinstance(kinds, list) and isinstance(n, int) and "full_attention" not in kinds \
                and "full_attention" in (getattr(type(c)(), "layer_types", None) or ()):
            _set(c, "layer_types", [*kinds[:n - 1], "full_attention"])


def _qwen2_5_omni(cfg) -> None:
    """Qwen2.5-Omni's talker embeds tokens at the thinker's width (``embedding_size``: the class's 3584) and
    its BigVGAN vocoder starts at 1536 channels (115M parameters): the shrunk thinker's width and 128
    channels. (Its model class defines generate only, no forward: this gets it to that error.)"""
    _set(cfg.talker_config, "embedding_size", cfg.thinker_config.text_config.hidden_size)
    _set(cfg.token2wav_config.bigvgan_config, "upsample_initial_channel", 128)


def _pi0(cfg) -> None:
    """PI0's PaliGemma (its ``vlm_config``) made consistent as a PaliGemma of its own is (``_consistent``): its
    projector into the text (``projection_dim``, the class's 2048) the shrunk text width, its image placeholder
    inside the shrunk text vocabulary."""
    _consistent(cfg.vlm_config, "paligemma")


def _muse_spark_audio(cfg) -> None:
    """Muse Spark's audio tower is a pyramid of stages, one per layer (``num_hidden_layers`` is the number of
    stages, which its config validates: shrunk to 2, half the stages run and its norm reads the last stage's
    width): every stage kept with one block each, widths 8 to 64 (the class's 256 to 2048: 95M parameters), its
    output projection as wide as the last stage."""
    n = len(cfg.hidden_sizes)
    _set(cfg, "num_hidden_layers", n)
    _set(cfg, "depths", [1] * n)
    _set(cfg, "hidden_sizes", [min(8 << i, 64) for i in range(n)])
    _set(cfg, "out_hidden_size", 64)


def _minimax_m3_vl(cfg) -> None:
    """MiniMax-M3-VL: the projector merges spatial_merge_size^2 projected patches (``merged_hidden_size``: the
    text width x 4, the class's 24576) through ``projector_hidden_size`` (6144: 151M parameters), now the
    text width; the text's dense and shared-expert MLPs (12288, 3072), its partial rotary (64, past the
    shrunk 16-wide heads) and its block indexer's heads (128 wide) shrunk."""
    text = cfg.text_config
    _set(cfg, "projector_hidden_size", text.hidden_size)
    _set(cfg, "merged_hidden_size", text.hidden_size * cfg.vision_config.spatial_merge_size ** 2)
    for k, v in (("dense_intermediate_size", SMALL["intermediate_size"]),
                 ("shared_intermediate_size", SMALL["shared_expert_intermediate_size"]),
                 ("rotary_dim", text.head_dim), ("index_head_dim", text.head_dim)):
        _set(text, k, v)


def _muse(cfg) -> None:
    """Muse Glimmer and Muse Spark: the vision adapter reads the tower's pixel-shuffled states
    (``out_hidden_size``: the tower's width x merge_size^2, the class's 6144 = 1536 x 4) and is
    ``projector_hidden_size`` wide (4096: 42M parameters), now the text width; Muse Spark's MoE pools to
    ``moe_hidden_size`` (4096) before its experts, now the text width; its audio tower as
    ``_muse_spark_audio`` shrinks it on its own, writing text embeddings (the text width)."""
    text, vision = cfg.text_config, cfg.vision_config
    _set(cfg, "out_hidden_size", vision.hidden_size * vision.merge_size ** 2)
    _set(cfg, "projector_hidden_size", text.hidden_size)
    if isinstance(getattr(text, "moe_hidden_size", None), int):
        _set(text, "moe_hidden_size", text.hidden_size)
    audio = getattr(cfg, "audio_config", None)
    if audio is not None:
        _muse_spark_audio(audio)
        _set(audio, "out_hidden_size", text.hidden_size)


def _semantic_codec(cfg) -> None:
    """X-Codec 2 and NeuCodec quantise the acoustic and semantic encoders' states joined (``fc_encoder``'s
    output, ``hidden_size`` + the semantic encoder's width: the class's ``quantization_dim`` 2048 is 1024 +
    1024): the sum of the shrunk widths; the acoustic encoder's first width 8 (the class's 48, doubled per
    downsampling stride: 1536 channels at the fifth, 34M parameters)."""
    _set(cfg, "quantization_dim", cfg.hidden_size + cfg.semantic_model_config.hidden_size)
    _set(cfg, "encoder_hidden_size", 8)


def _wavtokenizer(cfg) -> None:
    """WavTokenizer quantises its encoder's states with no projection around the quantizer (its config
    validates ``codebook_dim == hidden_size``): the codebook as wide as the shrunk width. Its Vocos decoder
    (``decoder_*``: 12 ConvNeXt blocks 768 wide, 60M parameters; keys the generic table does not know) 2 blocks
    at the shrunk sizes."""
    _set(cfg, "codebook_dim", cfg.hidden_size)
    for k, v in (("decoder_hidden_size", SMALL["hidden_size"]),
                 ("decoder_intermediate_size", SMALL["intermediate_size"]),
                 ("decoder_num_layers", SMALL["num_hidden_layers"])):
        if isinstance(getattr(cfg, k, None), int):
            _set(cfg, k, v)


def _apertus1p5(cfg) -> None:
    """Apertus 1.5 embeds its image and audio tokenizers' codes as text tokens, offset by
    ``image_token_offset`` and ``audio_token_offset`` (131272 and 262344: the class's 266752-token
    vocabulary): codebooks of 32 codes each, offset to just above the shrunk vocabulary's middle (below the
    special tokens at its top); the VQ image tokenizer's convolutions (256 to 1024 channels, 4 blocks a
    stage: 185M parameters) 32 to 128 channels (its group norms' 32 groups), one block a stage; the
    WavTokenizer audio encoder's codebook as wide as its shrunk width (which its config validates)."""
    vq, audio, vocab = cfg.vision_config, cfg.audio_config, cfg.text_config.vocab_size
    for k, v in (("base_channels", 32), ("num_res_blocks", 1), ("latent_channels", 32), ("codebook_size", 32)):
        _set(vq, k, v)
    _set(audio, "codebook_size", 32)
    _wavtokenizer(audio)
    _set(cfg, "image_token_offset", vocab // 2)
    _set(cfg, "audio_token_offset", vocab // 2 + vq.codebook_size)


def _tvp(cfg) -> None:
    """TVP: its ResNet-50 backbone (23M parameters; a transformers ResNet the generic table leaves alone) a
    block a stage, 32 to 128 channels, its last three stages (stride 16: the derived 32-pixel frames' 2 x 2
    grid, which TVP's 2 x 2 max-pool takes to one cell; stride 32 leaves it nothing to pool); its frame-pad
    visual prompt (learned pads 96 pixels deep around 448-pixel frames, for 48 frames: 19M parameters) 4
    pixels deep around the derived 32-pixel frames, for 2 frames."""
    bb = cfg.backbone_config
    cfg.backbone_config = type(bb)(depths=[1, 1, 1], hidden_sizes=[32, 64, 128], embedding_size=16,
                                   layer_type=bb.layer_type, hidden_act=bb.hidden_act, out_features=["stage3"])
    _set(cfg, "max_img_size", 32)
    _set(cfg, "visual_prompt_size", 4)
    _set(cfg, "num_frames", 2)


def _doclayout_queries(cfg) -> None:
    """PP-DocLayoutV2's decoder queries (300, the top-k of the encoder's tokens) fewer than the derived
    32-pixel images' tokens: 16, as ``_fill_unset`` gives a DETR's."""
    _set(cfg, "num_queries", 16)


def _dia(cfg) -> None:
    """Dia's decoder cross-attends to the encoder with sizes of its own (1024 wide, 16 heads of 128): the
    shrunk encoder's width, its heads and head size."""
    enc, dec = cfg.encoder_config, cfg.decoder_config
    for k, v in (("cross_hidden_size", enc.hidden_size), ("cross_num_attention_heads", enc.num_attention_heads),
                 ("cross_num_key_value_heads", enc.num_key_value_heads), ("cross_head_dim", enc.head_dim)):
        _set(dec, k, v)


def _ernie_vl_sections(cfg) -> None:
    """ERNIE 4.5 VL's rotary embedding interleaves its height and width frequencies pairwise (stacked), so
    their M-RoPE sections are equal (its class's [22, 22, 20]): the 8 shrunk rotary frequencies as [3, 3, 2],
    not ``_mrope``'s [4, 2, 2]."""
    half = sum(cfg.text_config.rope_parameters["mrope_section"])
    side = (half + 1) // 3
    cfg.text_config.rope_parameters["mrope_section"] = [side, side, half - 2 * side]


def _grounding_dino(cfg) -> None:
    """Grounding DINO's queries (900, the top-k of the encoder's image tokens) fewer than the derived 32-pixel
    images' tokens: 16; its logits padded with -inf to ``max_text_len`` (256) only as long as the derived text
    (8 tokens), so the outputs are finite."""
    _set(cfg, "num_queries", 16)
    _set(cfg, "max_text_len", 8)


def _phi4_multimodal(cfg) -> None:
    """Phi-4 multimodal's conformer audio tower: its convolution widths (``ext_pw_out_channel``,
    ``depthwise_separable_out_channel``, ``nemo_conv_channels``: 1024, the default width) follow the shrunk
    width; the GLU's output feeds a depthwise convolution with one group per hidden unit, so any other
    width fails the audio forward. Crops of 56 pixels, not 448 (4 patches a side: 13 image tokens per
    image, not 545, in a text whose logits span the 200k vocabulary that the special tokens keep)."""
    _widths_follow(cfg.audio_config)
    _set(cfg.vision_config, "image_size", 56)
    _set(cfg.vision_config, "crop_size", 56)


# config arguments a type's class defaults lack for any forward (LW-DETR's default has no feature level:
# the checkpoints' one at scale 1); Gemma 4 Assistant's default config fails its own validation (a transformers
# bug: its default text config has per-layer inputs, which the assistant refuses): none, as its checkpoints have
# PP-OCR's text detectors leave their neck's intra-class blocks, upsampling factors and head kernels None: those of
# transformers' tests (the checkpoints' layout); PP-OCRv6's detectors' __post_init__ default their backbone to
# PP-LCNetV4 (a recognition backbone: one stage out, strides that halve the height only) where the class declares
# HGNetV2's (medium) or PP-LCNetV3's (small) four stages (a transformers bug): the declared one, PP-OCRv6 small's
# neck reading its stages' widths (PP-LCNetV3 at scale 0.75: 48 to 384, not the class's 12 to 360)
_PP_OCR_HGNET = {"model_type": "hgnet_v2", "arch": "L", "return_idx": [0, 1, 2, 3], "freeze_stem_only": True,
                 "freeze_at": 0, "freeze_norm": True, "lr_mult_list": [0, 0.05, 0.05, 0.05, 0.05],
                 "out_features": ["stage1", "stage2", "stage3", "stage4"]}
_PP_OCR_NECK = {
    "intraclass_block_config": {
        "reduce_channel": [1, 1, 0], "return_channel": [1, 1, 0],
        "vertical_long_to_small_conv_longratio": [[7, 1], [1, 1], [3, 0]],
        "vertical_long_to_small_conv_midratio": [[5, 1], [1, 1], [2, 0]],
        "vertical_long_to_small_conv_shortratio": [[3, 1], [1, 1], [1, 0]],
        "horizontal_small_to_long_conv_longratio": [[1, 7], [1, 1], [0, 3]],
        "horizontal_small_to_long_conv_midratio": [[1, 5], [1, 1], [0, 2]],
        "horizontal_small_to_long_conv_shortratio": [[1, 3], [1, 1], [0, 1]],
        "symmetric_conv_long_longratio": [[7, 7], [1, 1], [3, 3]],
        "symmetric_conv_long_midratio": [[5, 5], [1, 1], [2, 2]],
        "symmetric_conv_long_shortratio": [[3, 3], [1, 1], [1, 1]]},
    "scale_factor_list": [1, 2, 4, 8], "kernel_list": [3, 2, 2]}
_BASE_KWARGS: dict[str, dict] = {
    "lw_detr": {"projector_scale_factors": [1.0]},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "pp_ocrv5_server_det": _PP_OCR_NECK,
    "pp_ocrv6_medium_det": {**_PP_OCR_NECK, "backbone_config": _PP_OCR_HGNET},
    "pp_ocrv6_small_det": {"backbone_config": {"model_type": "pp_lcnet_v3", "scale": 0.75, "divisor": 16,
                                               "out_features": ["stage2", "stage3", "stage4", "stage5"],
                                               "out_indices": [2, 3, 4, 5]},
                           "layer_list_out_channels": [48, 96, 192, 384]},
    # PP-DocLayoutV2's forward reads a score threshold and a reading-order class per label, which the class leaves
    # None: 0.5 and the label itself for each of its 2 labels
    "pp_doclayout_v2": {"class_thresholds": [0.5, 0.5], "class_order": [0, 1]},
    # UVDoc's head concatenates every bridge stage's map, its backbone's default puts out the last only
    "uvdoc": {"backbone_config": {"model_type": "uvdoc_backbone", "out_features": [f"stage{i}" for i in range(1, 7)]}},
}
# per-type fixes of the shrunk ("small") config, where a cause is one type's own
_TYPE_FIXES = {"lw_detr": _detr_on_small_images, "rf_detr": _detr_on_small_images, "csm": _mimi_codec,
               "dots3_note": _dots3_note, "dac": _dac, "janus": _janus, "florence2": _florence2,
               "glm5_next_vision": _glm5_next_vision,
               "depth_pro": _depth_pro, "autoformer": _autoformer, "informer": _informer, "sam2": _sam2,
               "sam3": _sam3, "sam3_lite_text": _sam3, "sam3_tracker": _sam3, "pi0": _pi0,
               "muse_spark_audio": _muse_spark_audio, "xcodec2": _semantic_codec, "neucodec": _semantic_codec,
               "kyutai_speech_to_text": _mimi_codec,
               "pp_doclayout_v2": _doclayout_queries, "dia": _dia, "apertus1p5": _apertus1p5,
               "muse_glimmer": _muse, "muse_spark": _muse, "minimax_m3_vl": _minimax_m3_vl,
               "tvp": _tvp, "nemotron3_5_transcribe_audio": _mha_audio,
               "neomme": _neomme, "qwen2_5_omni": _qwen2_5_omni,
               "ernie4_5_vl_moe": _ernie_vl_sections, "grounding-dino": _grounding_dino,
               "mm-grounding-dino": _grounding_dino, "phi4_multimodal": _phi4_multimodal,
               **dict.fromkeys(("vibevoice", "vibevoice_asr", "vibevoice_acoustic_tokenizer",
                                "vibevoice_acoustic_tokenizer_encoder", "vibevoice_acoustic_tokenizer_decoder"),
                               _vibevoice_codec)}
# fixes the shrunk config needs before anything reads its sub-configs (WavTokenizer's encoder_config is a
# property that builds and validates one)
_SHRINK_FIXES = {"wavtokenizer": _wavtokenizer, "wavtokenizer_encoder": _wavtokenizer}


def configs(model_type: str):
    """Configs to try, smallest first: shrunk, layers only, defaults."""
    import copy

    from transformers import CONFIG_MAPPING
    from transformers.utils import is_timm_available

    base = CONFIG_MAPPING[model_type](**copy.deepcopy(_BASE_KWARGS.get(model_type, {})))
    timm = getattr(base, "backbone_config", None)
    if getattr(timm, "model_type", None) == "timm_backbone" and not is_timm_available():  # DETR's family: the
        base = CONFIG_MAPPING[model_type](use_timm_backbone=False)  # transformers backbone, at timm's stages
        if isinstance(getattr(timm, "out_indices", None), (list, tuple)):
            _set(base.backbone_config, "out_indices", list(timm.out_indices))
    out = []
    for layers_only in (False, True):
        c = copy.deepcopy(base)
        _shrink(c, layers_only)
        if not layers_only and model_type in _SHRINK_FIXES:
            _SHRINK_FIXES[model_type](c)
        _consistent(c, model_type)
        _rope_per_kind(c)
        _vocabulary_map(c, model_type)
        _fit_derived_images(c)
        if getattr(getattr(c, "backbone_config", None), "model_type", None) == "resnet" \
                and getattr(timm, "model_type", None) == "timm_backbone" and not layers_only:  # its stages small
            _set(c.backbone_config, "depths", [1] * len(c.backbone_config.depths))
            _set(c.backbone_config, "hidden_sizes", [32 * 2 ** i for i in range(len(c.backbone_config.depths))])
            _set(c.backbone_config, "embedding_size", 16)
        if not layers_only and model_type in _TYPE_FIXES:
            _TYPE_FIXES[model_type](c)
        out.append(("small" if not layers_only else "layers", c))
    out.append(("default", base))
    filled = copy.deepcopy(out[0][1])  # last: the shrunk config with the sizes its class leaves None set
    if _fill_unset(filled):  # (DeepSeek-like MoE's expert counts, ESM's vocabulary, Nemotron's kv heads)
        out.append(("small, sizes completed", filled))
    widths = copy.deepcopy(filled)  # then sizes that followed a default width follow the shrunk one
    if any([_widths_follow(c) for c in (widths, *_subconfigs(widths))]):
        out.append(("small, widths follow", widths))
    if _fewer_kv_heads(out[0][1]):  # then a key/value head per query head (ESM C's norms take the query width)
        mha = copy.deepcopy(out[0][1])
        _one_kv_head_per_head(mha)
        out.append(("small, kv heads = heads", mha))
    inside = copy.deepcopy(out[0][1])  # then a backbone's stages that its shrunk layers have (ZoeDepth's BEiT)
    if any([_stages_inside(c) for c in (inside, *_subconfigs(inside))]):
        out.append(("small, stages inside", inside))
    text = getattr(widths, "text_config", None)  # then a tower's sizes that equal the text's default width
    if text is not None:  # (Dots3-Note's adapters into the text): the shrunk text width
        texts = copy.deepcopy(widths)
        pair = [(type(text)(), texts.text_config)]
        if any([_widths_follow(c, pair) for c in _subconfigs(texts) if c is not texts.text_config]):
            out.append(("small, widths follow the text", texts))
    return out


_UNSET = {**SMALL, "top_k_experts": 2, "n_shared_experts": 1, "mask_token_id": 4, "pad_token_id": 1,  # ESM's tokens
          "prediction_length": 4, "context_length": 4,  # a lagged forecaster's horizon and history (TST)
          "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,  # Qwen4-Exp's token indexer
          "indexer_budget": 4, "indexer_compress_ratio": 2}  # (its attention layers need one)


def _fill_unset(cfg) -> bool:
    """Set the sizes (``SMALL``'s keys) that ``cfg`` and its sub-configs hold as None, None per-layer kinds to
    a short-convolution layer then attention ones (LFM2-MoE's), Mamba-2 heads to tile the shrunk expanded
    width, a DETR's queries to fewer than the small image's tokens, Mimi's upsampling groups to its width;
    whether any was set."""
    changed = False
    for c in (cfg, *_subconfigs(cfg)):
        for k, v in _UNSET.items():
            if k in vars(c) and getattr(c, k) is None:
                _set(c, k, v)
                changed = True
        n = getattr(c, "num_hidden_layers", None)
        if "layer_types" in vars(c) and c.layer_types is None and isinstance(n, int):
            _set(c, "layer_types", ["conv"] + ["full_attention"] * (n - 1))
            changed = True
        if "mlp_layer_types" in vars(c) and c.mlp_layer_types is None and isinstance(n, int):  # MLP kinds the
            _set(c, "mlp_layer_types", ["dense"] + ["sparse"] * (n - 1))  # class leaves None (DeepSeek-OCR 2's
            changed = True  # text): a dense layer then MoE ones, as first_k_dense_replace = 1 gives
        kinds = getattr(c, "layer_types", None)  # a hybrid of linear attention only (Granite-4's default):
        if isinstance(kinds, list) and kinds and set(kinds) == {"linear_attention"}:  # one attention layer,
            indexed = getattr(c, "indexer_budget", None) is not None  # whose cache the forward reads; an indexed
            _set(c, "layer_types", [*kinds[:-1], "indexed_attention" if indexed else "full_attention"])  # one
            changed = True  # where the indexer was completed above: Qwen4-Exp's cache has its own layer kind
        vocab = getattr(getattr(c, "text_config", None), "vocab_size", None)  # a VLM's image or video placeholder
        if isinstance(vocab, int) and getattr(c, "vision_config", None) is not None:  # the class leaves None (BLIP-2's
            # image, InstructBLIP Video's video)
            free = _free_ids(vocab, c, c.text_config)
            for k in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
                if k in vars(c) and getattr(c, k) is None:
                    _set(c, k, next(free))
                    changed = True
        width = getattr(c, "hidden_size", None)
        if isinstance(getattr(c, "upsample_groups", None), int) and isinstance(width, int) \
                and width % c.upsample_groups:  # Mimi's depthwise upsampling: one group per channel
            _set(c, "upsample_groups", width)
            changed = True
        if isinstance(getattr(c, "word_embed_proj_dim", None), int) and isinstance(width, int) \
                and c.word_embed_proj_dim != width:  # OPT's embedding width, which BLIP-2's projector writes
            _set(c, "word_embed_proj_dim", width)
            changed = True
        if isinstance(getattr(c, "num_queries", None), int) and c.num_queries > 16:  # a DETR's queries (top-k of
            _set(c, "num_queries", 16)  # the small image's tokens: RT-DETR, D-FINE)
            changed = True
        for heads, dim, expand in _SSM_HEADS:  # Mamba-2 heads that tile the expanded width (heads x head dim)
            h, d, e = (getattr(c, k, None) for k in (heads, dim, expand))
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (h, d, e, width)) and h * d != e * width:
                _set(c, dim, 16)
                _set(c, heads, e * width // 16)
                changed = True
    return changed


def _widths_follow(c, others: list = ()) -> bool:
    """Sizes that equal a default width where it is shrunk, the config's own ``hidden_size`` or a direct
    sub-config's (a ViT's ``pooler_output_size``, read by a dual encoder's projection; Kimi-K2.5's
    ``projection_hidden_size``, the vision tower's) or that of ``others`` ((default, shrunk) config pairs):
    the shrunk width (a default width two parts share with different shrunk widths is left alone); whether
    any was set."""
    from transformers import PretrainedConfig

    try:
        default = type(c)()
    except Exception:  # noqa: BLE001 - a config that needs arguments: nothing to compare with
        return False
    pairs = [(default, c), *others] + [(getattr(default, k, None), v) for k, v in vars(c).items()
                                       if isinstance(v, PretrainedConfig)]
    widths: dict[int, set[int]] = {}
    for d, now in pairs:
        old, new = getattr(d, "hidden_size", None), getattr(now, "hidden_size", None)
        if type(old) is int and type(new) is int and old != new:
            widths.setdefault(old, set()).add(new)
    follow = {k: news.pop() for k, v in vars(c).items() if type(v) is int and (news := set(widths.get(v, ())))
              and len(news) == 1 and k not in _UNSET and k != "hidden_size" and getattr(default, k, None) == v}
    for k, v in follow.items():
        _set(c, k, v)
    return bool(follow)


# (heads, head dim, expansion) of Mamba-2 mixers: Mamba2, Bamba and Granite-4 hybrids, Zamba2
_SSM_HEADS = (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
              ("n_mamba_heads", "mamba_headdim", "mamba_expand"))


def perturb(model, seed: int = 0) -> None:
    """Weights (and float buffers such as running stats) moved off their init values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith("running_var"):
                p.mul_(1 + 0.1 * noise.abs())
            elif name in dict(model.named_buffers()):
                if name.endswith("running_mean"):
                    p.add_(0.1 * noise)
            else:
                p.add_(0.05 * noise)


TASK_MAPPINGS = (  # the first task head a type has; the base model otherwise
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    # heads whose outputs are task outputs, not hidden states (a base model's hidden-state outputs fix its
    # residual stream); where such a head does not build, the base model is tried next
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)
_WITH_BASE_FALLBACK = TASK_MAPPINGS.index("MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES")


def model_classes(model_type: str) -> list:
    """The first task class; where its config class is not the type's (Llama 4's, Qwen3.5's causal LM takes
    the text sub-config), then the next task class that takes the type's config."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto

    out = []
    for i, m in enumerate(TASK_MAPPINGS):
        name = getattr(modeling_auto, m, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        cls = getattr(transformers, name, None) if name else None
        if cls is None or cls in out:
            continue
        try:
            config_class = getattr(cls, "config_class", None)
        except ImportError as e:  # a class that needs a package not installed (torchaudio)
            raise BuildError(f"ImportError: {str(e).strip().splitlines()[0]}") from None
        if not out:
            out.append(cls)
            if config_class in (None, CONFIG_MAPPING[model_type]):
                if i >= _WITH_BASE_FALLBACK and m != "MODEL_MAPPING_NAMES":
                    base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
                    base = getattr(transformers, str(base[0] if isinstance(base, (list, tuple)) else base), None)
                    return out + [base] if base is not None and base is not cls else out
                return out
        elif config_class is CONFIG_MAPPING[model_type]:
            return out + [cls]
    if not out:
        raise BuildError("no model class")
    return out


_DECODER_ONLY_HEAD = ("reformer",)  # the first task class asserts is_decoder=True


def build_model(model_type: str):
    """(model, config label, size) for the first config that builds and runs forward on derived inputs
    (with the next task class where the first's config class is not the type's and none builds)."""
    errors: list[str] = []
    for i, cls in enumerate(model_classes(model_type)):
        try:
            return _build(model_type, cls, errors, f"{cls.__name__} " if i else "")
        except BuildError:
            pass
    raise BuildError("; ".join(errors))


def _build(model_type: str, cls, errors: list[str], prefix: str = ""):
    import torch

    for label, cfg in configs(model_type):
        if model_type in _DECODER_ONLY_HEAD:
            cfg.is_decoder = True
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in cls._from_config(cfg).parameters())
            if n > 40_000_000:
                errors.append(f"{prefix}{label}: too large ({n / 1e6:.0f}M parameters)")
                continue
            try:
                out = _forward(model := _fresh(cls, cfg).double())
            except (RuntimeError, ValueError, AttributeError) as e:  # float32 tensors of the model's own: the
                model = _fresh(cls, cfg)  # model in float32 (also where derived inputs hid that error: no input
                try:  # layout they tried ran, and the forward failed otherwise on what was left, Kosmos-2's images)
                    out, label = _forward(model), f"{label} float32"
                except Exception:  # noqa: BLE001 - not a float64 problem: the float64 error says what is
                    if _FLOAT32_ONLY.search(str(e)):
                        raise
                    raise e from None
            if not _finite(out) and next(model.parameters()).dtype == torch.float64:  # float64's minimum in a
                m32 = _fresh(cls, cfg)  # float32 mask, 0 x -inf (CANINE's): the model in float32 where that is finite
                try:
                    out32 = _forward(m32)
                except Exception:  # noqa: BLE001 - no better in float32: the NaN stands
                    out32 = None
                if out32 is not None and _finite(out32):
                    model, out, label = m32, out32, f"{label} float32"
            if not _finite(out):
                raise ValueError("the forward gives NaN or inf outputs with this config")
            if _kv_heads_refused(model, cfg, cls):
                return _build_mha(cls, cfg, label)
            return model, label, n
        except Exception as e:  # noqa: BLE001 - any failure: try the next config
            errors.append(f"{prefix}{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    raise BuildError("; ".join(errors))


def _fresh(cls, cfg):
    """The model of ``cfg``, initialised from seed 0, in eval mode, its weights perturbed."""
    import torch

    torch.manual_seed(0)
    model = cls._from_config(cfg).eval()
    perturb(model)
    return model


def _finite(out) -> bool:
    import torch

    return all(bool(torch.isfinite(x).all()) for x in _float_leaves(out))


# a float64 model's forward that fails on float32 tensors it makes itself (a constant, a mask filled with
# float64's minimum): such a model is built, compiled and checked in float32 (the exact check still promotes
# the exported graph to float64)
_FLOAT32_ONLY = re.compile(r"Float and Double|float != double|\(float\) and bias type \(double\)|"
                           r"same dtype|to type float without overflow|expected scalar type")


def _forward(model):
    """The forward on derived inputs; models whose grouped_mm has no float64 kernel on CPU take the batched
    expert path (also where that kernel's error showed as another: the derived inputs' probes, which run the
    forward, then fell back to fewer inputs, Dots3-Note's to images without their placeholder tokens)."""
    import torch

    from permgraph.inputs import default_example_inputs
    from permgraph.trace import check_traceable

    check_traceable(model)  # a model without a forward (Bark): pg.compile's own error, not the inputs'
    try:
        with torch.no_grad():
            return model(**default_example_inputs(model))
    except Exception as e:
        if not hasattr(model, "set_experts_implementation"):
            raise
        model.set_experts_implementation("batched_mm")
        try:
            with torch.no_grad():
                return model(**default_example_inputs(model))
        except Exception:  # noqa: BLE001 - not grouped_mm's: the first error says what is
            if "Double" in str(e):
                raise
            raise e from None


def _kv_heads_refused(model, cfg, cls) -> bool:
    """Whether the shrunk key/value heads (``KV_HEADS``: fewer than the query heads) are ones the model's
    attention supports only on eager SDPA's mask-skipping path: its eager attention fails on them while
    the same model with a key/value head per query head runs it. Nemotron3's audio encoders size
    ``v_proj`` by the query heads and ``k_proj`` by the key/value heads (the checkpoints have as many of
    each): eager SDPA with no mask broadcasts each to the query heads (``enable_gqa``), but with a mask
    (always built under export) or with eager attention ``repeat_kv`` repeats both by one factor."""
    import torch

    from permgraph.inputs import default_example_inputs

    if not _fewer_kv_heads(cfg) or not callable(getattr(model, "set_attn_implementation", None)):
        return False

    def eager_runs(m) -> bool:
        old = m.config._attn_implementation
        try:
            m.set_attn_implementation("eager")
            with torch.no_grad():
                m(**default_example_inputs(m))
            return True
        except Exception:  # noqa: BLE001 - refused: the question is whether MHA is too
            return False
        finally:
            m.set_attn_implementation(old)

    if eager_runs(model):
        return False
    mha = copy.deepcopy(cfg)
    _one_kv_head_per_head(mha)
    torch.manual_seed(0)
    return eager_runs(cls._from_config(mha).eval().double())


def _fewer_kv_heads(cfg) -> bool:
    return any(isinstance(getattr(c, k, None), int) and isinstance(getattr(c, "num_attention_heads", None), int)
               and getattr(c, k) < c.num_attention_heads for c in (cfg, *_subconfigs(cfg)) for k in KV_HEADS)


def _one_kv_head_per_head(cfg) -> None:
    for c in (cfg, *_subconfigs(cfg)):
        heads = getattr(c, "num_attention_heads", None)
        for k in KV_HEADS:
            if isinstance(getattr(c, k, None), int) and isinstance(heads, int) and getattr(c, k) < heads:
                _set(c, k, heads)


def _build_mha(cls, cfg, label: str):
    """The model of ``cfg`` with one key/value head per query head (``_kv_heads_refused``)."""
    import torch

    from permgraph.inputs import default_example_inputs

    mha = copy.deepcopy(cfg)
    _one_kv_head_per_head(mha)
    model = _fresh(cls, mha).double()
    with torch.no_grad():
        model(**default_example_inputs(model))
    return model, f"{label}, kv heads = heads", sum(p.numel() for p in model.parameters())


def _float_leaves(out) -> list:
    import torch

    from permgraph.trace import named_outputs
    return [x for _, x in named_outputs(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]


EXACT = 1e-10  # tolerance of the float32-promoted check (pg.verify(promote_float32=True))


class BuildError(Exception):
    pass


class Timeout(Exception):
    pass


# -- one model --------------------------------------------------------------------------------------

def family(model_type: str, model) -> str:
    cfg = model.config
    names = set(vars(cfg))
    if any(getattr(cfg, k, 0) for k in EXPERTS) or any(getattr(c, k, 0) for c in _subconfigs(cfg) for k in EXPERTS):
        return "moe"
    subs = {k for k in names if k.endswith("_config") and k != "text_config" and getattr(cfg, k, None) is not None}
    if "text_config" in names and subs:
        return "multimodal"
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        return "vision"
    if main in ("input_values", "input_features"):
        return "audio"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "decoder" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def _stages_inside(c) -> bool:
    """A backbone whose ``out_indices`` point past its shrunk layers (ZoeDepth's BEiT: stages 6, 12, 18, 24
    of 2 layers; its neck then gets no feature maps): as many layers as stages, each layer's output one."""
    idx, n = getattr(c, "out_indices", None), getattr(c, "num_hidden_layers", None)
    if not (isinstance(idx, (list, tuple)) and idx and isinstance(n, int) and max(idx) > n):
        return False
    _set(c, "num_hidden_layers", len(idx))
    _set(c, "stage_names", ["stem"] + [f"stage{i}" for i in range(1, len(idx) + 1)])
    _set(c, "out_indices", list(range(1, len(idx) + 1)))
    return True


def _subconfigs(cfg):
    from transformers import PretrainedConfig
    return [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]


def _nested(cfg) -> list:
    """``cfg`` and its sub-configs at any depth: the walk derived inputs use (``permgraph.inputs``)."""
    from permgraph.inputs.model import nested_configs

    return nested_configs(cfg)


def _top_reasons(spec, k: int = 3) -> list[str]:
    """The reasons that fix the most parameter entries."""
    weight: Counter = Counter()
    for f in spec.fixed:
        n = math.prod(spec.shapes.get(f.param, (1,)))
        for r in f.reasons[:2]:
            weight[r.split(" (at ")[0]] += n
    return [r for r, _ in weight.most_common(k)]


# how a graph was traced where not by the plain export (spec.info keys, docs/design.md)
TRACED = (("text_only_inputs", "text-only inputs"), ("dropped_inputs", "fewer modalities"),
          ("experts", "batched experts"), ("attention", "eager attention"),
          ("constants", "literal buffers"), ("specialised", "recorded helpers"), ("draft", "draft export"))


def _traced_label(info: dict, key: str, label: str) -> str:
    """The row's label for a way of tracing; expert loops computed densely are told apart."""
    return "dense experts" if key == "experts" and "dense experts" in str(info[key]) else label


def run_one(model_type: str, limit: int) -> dict:
    import torch

    import permgraph as pg

    rec: dict = {"type": model_type}

    def alarm(signum, frame):
        raise Timeout(f"over {limit} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    t0 = time.time()
    try:
        try:
            model, label, n = build_model(model_type)
        except BuildError as e:
            rec.update(status="build-failed", error=str(e)[:600])
            return rec
        rec.update(config=label, params=n, family=family(model_type, model), model=type(model).__name__)
        t1 = time.time()
        try:
            spec = pg.compile(model)
        except Exception as e:  # noqa: BLE001
            rec.update(status="compile-failed", error=f"{type(e).__name__}: {str(e)[:600]}")
            return rec
        rec["compile_s"] = round(time.time() - t1, 2)
        errs, random = [], None
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        tol = 1e-6 if dtype == torch.float64 else 1e-4  # a model that runs in float32 only is checked in it
        try:
            for seed in (0, 1):
                rep = pg.verify(model, spec, seed=seed, tolerance=tol, dtype=dtype)
                errs.append(rep.max_rel_error)
        except Exception:
            random = _is_random(model)
            if not random:
                raise
            errs = [math.inf]
        if max(errs) > tol and (random if random is not None else _is_random(model)):
            rec.update(status="random", coverage=round(spec.covered_fraction(), 4), groups=len(spec.groups),
                       error="the forward samples (two identical calls differ): a permutation cannot be verified")
            return rec
        try:  # exact: the graph's float32 casts promoted, so float32 norms do not hide a wrong spec
            exact = pg.verify(model, spec, seed=0, promote_float32=True).max_rel_error
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - the exported graph does not run as a module: plain check only
            exact, rec["exact_error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
        roles = Counter(g.role for g in spec.groups.values())
        status = "sound" if (exact <= EXACT if exact is not None else max(errs) <= tol) else "unsound"
        rec.update(
            status=status,
            rel_error=max(errs),
            exact_rel_error=exact,
            coverage=round(spec.covered_fraction(), 4),
            groups=len(spec.groups),
            heads=roles.get("heads", 0),
            experts=roles.get("experts", 0),
            expert_units=roles.get("units", 0),
            within_head={r: roles[r] for r in ("qk", "vo", "qkvo") if roles.get(r)},
            unknown_ops=dict(spec.unknown_ops),
            why_fixed=_top_reasons(spec),
            traced=[_traced_label(spec.info, key, label) for key, label in TRACED if spec.info.get(key)],
        )
        if status == "sound" and rec["coverage"] < 0.99 and any(r.startswith("model output")
                                                                for f in spec.fixed for r in f.reasons):
            rec.update(_outputs_free(pg, model))
        return rec
    except Timeout as e:
        rec.update(status="timeout", error=str(e))
        return rec
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:400]}",
                   trace=traceback.format_exc()[-800:])
        return rec
    finally:
        signal.alarm(0)
        rec["total_s"] = round(time.time() - t0, 2)
        torch.set_num_threads(torch.get_num_threads())


def _outputs_free(pg, model) -> dict:
    """A model whose outputs fix what would move (a base model returns its hidden states): compiled
    again with every output free (``outputs=[]``), its coverage, and whether the exact check passes,
    the outputs then compared permuted (``f(perm(theta)) = perm(f(theta))``)."""
    try:
        free = pg.compile(model, outputs=[])
        err = pg.verify(model, free, seed=0, promote_float32=True).max_rel_error
    except Exception as e:  # noqa: BLE001 - the row stands without the figure
        return {"free_error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"free_coverage": round(free.covered_fraction(), 4), "free_exact_rel_error": err,
            "free_sound": err <= EXACT, "free_outputs_typed": len(free.outputs)}


def _is_random(model) -> bool:
    """Whether two identical calls on the derived inputs give different outputs with torch's generator
    seeded alike, as ``pg.verify`` seeds it (randomness from outside torch)."""
    import torch

    from permgraph.inputs import default_example_inputs
    from permgraph.trace import named_outputs
    from permgraph.verify import RNG_SEED

    inputs = default_example_inputs(model)

    def call():
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RNG_SEED)
            return named_outputs(model(**inputs))

    a, b = call(), call()
    return any(not isinstance(x, torch.Tensor) or x.shape != y.shape or not torch.equal(x, y)
               for (_, x), (_, y) in zip(a, b) if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor))


def worker(types: list[str], limit: int, out: Path) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers
    transformers.logging.set_verbosity_error()
    for t in types:
        rec = run_one(t, limit)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


# -- driver -----------------------------------------------------------------------------------------

def all_types() -> list[str]:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto

    known = {t for m in TASK_MAPPINGS for t in getattr(modeling_auto, m, {})}
    return sorted(t for t in CONFIG_MAPPING.keys() if t in known)


def load(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["type"]] = r
    return out


def drive(types: list[str], jobs: int, limit: int, results: Path) -> None:
    """Run ``types`` in ``jobs`` worker processes; a worker stuck past the limit is killed and restarted."""
    tmp = [results.with_suffix(f".part{i}") for i in range(jobs)]
    queues = [types[i::jobs] for i in range(jobs)]
    procs: list = [None] * jobs
    done_at = [time.time()] * jobs
    for p in tmp:
        p.unlink(missing_ok=True)

    def start(i: int) -> None:
        seen = set(load(tmp[i]))
        rest = [t for t in queues[i] if t not in seen]
        if not rest:
            procs[i] = None
            return
        procs[i] = subprocess.Popen([sys.executable, __file__, "--worker", ",".join(rest), "--limit", str(limit),
                                     "--results", str(tmp[i])], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        done_at[i] = time.time()

    for i in range(jobs):
        start(i)
    counts = [0] * jobs
    while any(procs):
        time.sleep(2)
        for i, p in enumerate(procs):
            if p is None:
                continue
            n = len(load(tmp[i]))
            if n != counts[i]:
                counts[i], done_at[i] = n, time.time()
                merged = load(results) | {k: v for q in tmp for k, v in load(q).items()}
                _write_jsonl(results, merged)
            if p.poll() is not None or time.time() - done_at[i] > limit + 60:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                seen = set(load(tmp[i]))
                rest = [t for t in queues[i] if t not in seen]
                if rest and p.returncode != 0 or (rest and time.time() - done_at[i] > limit + 60):
                    with open(tmp[i], "a") as f:  # the model it was on: hung or crashed the process
                        f.write(json.dumps({"type": rest[0], "status": "timeout",
                                            "error": f"worker killed or crashed (rc {p.returncode})"}) + "\n")
                start(i)
    merged = load(results) | {k: v for q in tmp for k, v in load(q).items()}
    _write_jsonl(results, merged)
    for p in tmp:
        p.unlink(missing_ok=True)


def _write_jsonl(path: Path, recs: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(recs[k]) + "\n" for k in sorted(recs)))
    tmp.replace(path)


# -- report -----------------------------------------------------------------------------------------

FAMILY_ORDER = ("decoder", "moe", "encoder", "encoder-decoder", "vision", "audio", "multimodal")


def report(recs: dict[str, dict]) -> str:
    built = [r for r in recs.values() if r.get("status") not in ("build-failed",)]
    st = Counter(r.get("status") for r in recs.values())
    covs = [r["coverage"] for r in built if "coverage" in r]
    free = [r for r in built if "free_coverage" in r]
    lines = [
        "# Architecture breadth",
        "",
        "Generated by `python benchmarks/architectures.py` (do not edit by hand). Every model type in",
        "transformers' `CONFIG_MAPPING` with an `AutoModel` class, built from a small config (weights",
        "perturbed after init), cast to float64, compiled with the plain `pg.compile(model)` (derived",
        "inputs) and verified with two random permutations from the spec (relative tolerance 1e-6),",
        "then exactly: the exported graph with every cast to float32 made float64",
        "(`pg.verify(promote_float32=True)`, tolerance 1e-10), since transformers computes norms in",
        "float32 even in a float64 model and that rounding (up to ~1e-5) could hide a wrong spec.",
        "A type is sound when the exact check passes (or, where the exported graph does not run",
        "as a module, the plain one). Configs whose forward gives NaN or inf are skipped. A row",
        "starting with (draft export), (batched experts), (dense experts), (eager attention), (literal buffers),",
        "(recorded helpers), (fewer modalities) or (text-only inputs) was traced that way",
        "(docs/design.md, \"Tracing past data-dependent guards\").",
        "A base model's outputs are its hidden states: kept fixed (the default), they fix the residual",
        "stream; column \"outputs free\" gives the coverage with `outputs=[]`, where a permutation may move",
        "them and `verify` compares them permuted (a dash: unsound that way); a head outside the model",
        "that reads them must then be permuted with them.",
        "",
        "## Summary",
        "",
        f"- types: {len(recs)}; built: {len(built)}; "
        + ", ".join(f"{k}: {v}" for k, v in sorted(st.items())),
        f"- median coverage of parameter entries (sound and unsound): "
        f"{statistics.median(covs):.2f}" if covs else "- no coverage figures",
        f"- coverage >= 0.99: {sum(c >= 0.99 for c in covs)}; >= 0.95: {sum(c >= 0.95 for c in covs)}",
        f"- with the model outputs free (`pg.compile(model, outputs=[])`, the outputs checked permuted), where "
        f"they fix what would move and the coverage is below 0.99: {len(free)} types, "
        f"sound {sum(r['free_sound'] for r in free)}, "
        f"coverage >= 0.99: {sum(r['free_coverage'] >= 0.99 for r in free)}; "
        f">= 0.95: {sum(r['free_coverage'] >= 0.95 for r in free)}",
        f"- checked exactly (float32 promoted): {sum(r.get('exact_rel_error') is not None for r in built)}; "
        f"plain check only: {sum('exact_error' in r for r in built)}",
        f"- experts as groups: {sum(bool(r.get('experts')) for r in built)} types; each expert's hidden units "
        f"with their own permutation (per expert): {sum(bool(r.get('expert_units')) for r in built)}",
        f"- within-head groups (column \"within-head\": how many groups permute q/k units, v/o units, or both with "
        f"one permutation): q/k apart from v/o in {sum(_within_split(r) for r in built)} types; one shared by "
        f"q, k and v somewhere in {sum(bool(r.get('within_head', {}).get('qkvo')) for r in built)}",
        "",
        "| family | types | sound | unsound | failed | median coverage |",
        "|---|---|---|---|---|---|",
    ]
    for fam in FAMILY_ORDER:
        rs = [r for r in built if r.get("family") == fam]
        if not rs:
            continue
        c = [r["coverage"] for r in rs if "coverage" in r]
        lines.append(f"| {fam} | {len(rs)} | {sum(r['status'] == 'sound' for r in rs)} | "
                     f"{sum(r['status'] == 'unsound' for r in rs)} | "
                     f"{sum(r['status'] not in ('sound', 'unsound') for r in rs)} | "
                     f"{statistics.median(c):.2f} |" if c else f"| {fam} | {len(rs)} | 0 | 0 | {len(rs)} | - |")
    lines += ["", "## Per type", "",
              "| type | family | status | coverage | outputs free | groups | heads | within-head | experts | compile s "
              "| why fixed / error |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(recs):
        r = recs[t]
        why = "; ".join(r.get("why_fixed", [])) if r.get("status") in ("sound", "unsound") else r.get("error", "")
        if r.get("status") == "unsound":
            exact = r.get("exact_rel_error")
            why = (f"rel. error {r['rel_error']:.2g}" + (f", exact {exact:.2g}" if exact is not None else "")
                   + "; " + why)
        if r.get("unknown_ops"):
            why += "; no rule: " + ", ".join(sorted(r["unknown_ops"]))
        if r.get("traced"):
            why = "(" + ", ".join(r["traced"]) + ") " + why
        per_expert = " (units per expert)" if r.get("expert_units") else ""
        why = why.replace("|", "/").replace("\n", " ")[:300]
        cov = f"{r['coverage']:.2f}" if "coverage" in r else ""
        freed = (f"{r['free_coverage']:.2f}" if r["free_sound"] else "-") if "free_coverage" in r else ""
        within = ", ".join(f"{n} {k}" for k, n in r.get("within_head", {}).items())
        lines.append(f"| {t} | {r.get('family', '')} | {r.get('status')} | {cov} | {freed} | {r.get('groups', '')} | "
                     f"{r.get('heads', '')} | {within} | {r.get('experts', '')}{per_expert} | {r.get('compile_s', '')} "
                     f"| {why} |")
    return "\n".join(lines) + "\n"


def _within_split(r: dict) -> bool:
    """Whether a row has q/k units apart from v/o units (groups of both roles)."""
    w = r.get("within_head", {})
    return bool(w.get("qk") and w.get("vo"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", help="comma-separated model types (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=120, help="seconds per model")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker is not None:
        worker(args.worker.split(","), args.limit, args.results)
        return
    if not args.report_only:
        types = args.types.split(",") if args.types else all_types()
        drive(types, max(1, args.jobs), args.limit, args.results)
        for t in types:
            r = load(args.results).get(t, {})
            print(f"{t:32s} {r.get('status', '?'):15s} {r.get('coverage', '')!s:7s} "
                  f"{r.get('rel_error', '')!s:10.10s} "
                  f"{'; '.join(r.get('why_fixed', []))[:90] or r.get('error', '')[:120]}")
    args.report.write_text(report(load(args.results)))


if __name__ == "__main__":
    main()
