"""Inputs beside or instead of token ids: decoder ids, embeddings, a second token stream, encoder
states, word boxes, a global attention mask, features sized by the config."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.model import _add_if_read, _required, _text_vocab, model_device, model_dtype


def _with_required_embeds(model: nn.Module, out: dict[str, Any], params: Any, batch: int, seq: int,
                          gen: torch.Generator) -> str | None:
    """Embeddings of the config's width for the first ``*_embeds`` input the forward requires and ``out``
    lacks (BLIP-2's Q-Former: its ``query_embeds``); its name, or None."""
    embeds = next((k for k in _required(params) if k.endswith("_embeds") and k not in out), None)
    if embeds is not None:
        found = next(_embeddings(model, batch, seq, gen), {})
        out.update({embeds: found["inputs_embeds"]} if found else {})
    return embeds


def _with_codebook_columns(model: nn.Module, out: dict[str, Any], gen: torch.Generator) -> None:
    """Token ids with a column per audio codebook beside the text's ``(batch, seq, 1 + num_codebooks)`` (Kyutai
    speech-to-text embeds each step's text token and its codes, each codebook's ``codebook_vocab_size`` codes
    offset in one table), where the config has ``num_codebooks`` and ``codebook_vocab_size`` and the forward
    refuses the plain ids and runs on these."""
    cfg, ids = model.config, out.get("input_ids")
    books, codes = getattr(cfg, "num_codebooks", None), getattr(cfg, "codebook_vocab_size", None)
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and isinstance(books, int) and isinstance(codes, int)
            and books > 0 and codes > 0):
        return
    try:
        with torch.no_grad():
            model(**out)
        return
    except Exception:  # noqa: BLE001 - the plain ids refused: try the columns
        pass
    columns = torch.randint(0, codes, (*ids.shape, books), generator=gen).to(ids.device)
    trial = {**out, "input_ids": torch.cat([ids[..., None], columns], -1)}
    try:
        with torch.no_grad():
            model(**trial)
    except Exception:  # noqa: BLE001 - not these either: the plain ids stay
        return
    out.update(trial)


def _decoder_ids(cfg: Any, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """An encoder-decoder's ``decoder_input_ids`` ``(batch, seq // 2)`` in its decoder's vocabulary (a vision
    encoder-decoder's: its decoder config's); a decoder of audio codes a row per codebook and sample (MusicGen's
    ``decoder.num_codebooks``), or a code per channel at each step ``(batch, seq // 2, channels)`` (Dia's
    ``decoder_config.num_channels``, in its vocabulary of codes)."""
    vocab = (getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "decoder", None), "vocab_size", None)
             or _text_vocab(cfg) or 100)
    codes = getattr(cfg, "decoder_config", None)
    channels, code_vocab = getattr(codes, "num_channels", None), getattr(codes, "vocab_size", None)
    if isinstance(channels, int) and isinstance(code_vocab, int) and channels > 0:
        return torch.randint(0, min(vocab, code_vocab), (batch, seq // 2, channels), generator=gen)
    codebooks = getattr(getattr(cfg, "decoder", None), "num_codebooks", None)
    rows = batch * codebooks if isinstance(codebooks, int) and codebooks > 0 else batch
    return torch.randint(0, vocab, (rows, seq // 2), generator=gen)


def _embeddings(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A forward whose main input is ``inputs_embeds`` ``(batch, seq, hidden)`` (no embedding table)."""
    width = next((v for k in ("hidden_size", "d_model") if isinstance(v := getattr(model.config, k, None), int)), None)
    if width:
        yield {"inputs_embeds": torch.randn(batch, seq, width, generator=gen).to(model_device(model),
                                                                                 model_dtype(model))}


def _task_prompt(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """OneFormer's ``task_inputs``: the task prompt's token ids ``(batch, task_seq_len)`` (the processor pads
    "the task is semantic" to that length), below the text encoder's vocabulary."""
    cfg = model.config
    length = getattr(cfg, "task_seq_len", None) or seq
    vocab = getattr(cfg, "text_encoder_vocab_size", None) or _text_vocab(cfg) or 100
    yield {"task_inputs": torch.randint(0, vocab, (batch, length), generator=gen).to(model_device(model))}


def _with_second_token_streams(model: nn.Module, out: dict[str, Any], batch: int, seq: int, seed: int) -> None:
    """A forward that reads a second token stream ``<name>_input_ids`` through an encoder of its own
    (Evolla's ``protein_input_ids``, with ``protein_attention_mask``) gets random ids from the
    vocabulary of that encoder's sub-config (``<name>..._config``) and an all-ones
    ``<name>_attention_mask`` where the forward takes one, so the encoder is in the traced forward.
    Kept only if the forward runs with them and its outputs change."""
    params = inspect.signature(model.forward).parameters
    for name in params:
        if name not in out and (extra := _second_token_stream(model, name, params, batch, seq, seed)):
            _add_if_read(model, out, extra)


def _required_token_streams(model: nn.Module, out: dict[str, Any], params: Any, batch: int, seq: int,
                            seed: int) -> None:
    """The second token streams (``_with_second_token_streams``) that the forward requires, set before the
    probes that run it (InstructBLIP's Q-Former prompt ``qformer_input_ids``, which its image and video
    features read too), where there is text: the same ids the later rule would give, without its probe."""
    for name in _required(params) if "input_ids" in out else ():
        if name not in out and (extra := _second_token_stream(model, name, params, batch, seq, seed)):
            out.update(extra)


def _second_token_stream(model: nn.Module, name: str, params: Any, batch: int, seq: int,
                         seed: int) -> dict[str, Any] | None:
    """Random ids for the forward's input ``name`` if it is a second token stream ``<name>_input_ids``
    (``_with_second_token_streams``), with its all-ones attention mask where the forward takes one; else None."""
    cfg = model.config
    prefix = name[: -len("_input_ids")] if name.endswith("_input_ids") else ""
    if not prefix or prefix == "decoder":
        return None
    vocabs = [getattr(v, "vocab_size", None) for k, v in vars(cfg).items()
              if k.startswith(prefix) and k.endswith("config")]
    vocab = next((v for v in vocabs if isinstance(v, int)), None)
    if not vocab:
        return None
    dev = model_device(model)
    gen = torch.Generator().manual_seed(seed + 2)
    extra = {name: torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)}
    if f"{prefix}_attention_mask" in params:
        extra[f"{prefix}_attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=dev)
    return extra


def _with_entity_stream(model: nn.Module, out: dict[str, Any], batch: int, seq: int, seed: int,
                        entities: int = 2) -> None:
    """A stream of ids ``<name>_ids`` from the config's ``<name>_vocab_size`` (LUKE's ``entity_ids``, read
    through its own embedding and the entity-aware attention's extra query projections) gets
    ``entities`` random ids per sample, an all-ones ``<name>_attention_mask`` and, where the forward
    takes ``<name>_position_ids``, mentions ``(batch, entities, 2)``: entity ``e`` spans token ``e + 1``,
    the second slot ``-1`` (padding, as LUKE's tokenizer writes spans). Kept if the forward reads them."""
    params = inspect.signature(model.forward).parameters
    dev = model_device(model)
    for name in params:
        prefix = name.removesuffix("_ids")
        vocab = getattr(model.config, f"{prefix}_vocab_size", None)
        if not name.endswith("_ids") or name in out or not isinstance(vocab, int) or isinstance(vocab, bool) \
                or vocab < 1 or seq <= entities:
            continue
        gen = torch.Generator().manual_seed(seed + 5)
        extra = {name: torch.randint(0, vocab, (batch, entities), generator=gen).to(dev)}
        if f"{prefix}_attention_mask" in params:
            extra[f"{prefix}_attention_mask"] = torch.ones(batch, entities, dtype=torch.long, device=dev)
        if f"{prefix}_position_ids" in params:
            spans = torch.full((batch, entities, 2), -1, dtype=torch.long)
            spans[:, :, 0] = torch.arange(1, entities + 1)
            extra[f"{prefix}_position_ids"] = spans.to(dev)
        _add_if_read(model, out, extra)


def _with_encoder_states(model: nn.Module, out: dict[str, Any], batch: int, seed: int) -> None:
    """A decoder that attends to an encoder's states (TrOCR's decoder, a BERT built with
    ``add_cross_attention``) gets random ones, so its cross-attention is in the traced forward (else
    it stays fixed as unused). Kept only if the forward takes them and its outputs change with them;
    drawn from a generator of their own, so the other derived inputs are the same either way."""
    cfg = model.config
    if "encoder_hidden_states" not in inspect.signature(model.forward).parameters or getattr(
            cfg, "is_encoder_decoder", False):
        return
    width = getattr(cfg, "cross_attention_hidden_size", None) or getattr(cfg, "encoder_hidden_size", None) or next(
        (getattr(cfg, k) for k in ("hidden_size", "d_model", "n_embd") if isinstance(getattr(cfg, k, None), int)), None)
    if not isinstance(width, int) or width < 1:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    states = torch.randn(batch, 4, width, generator=gen).to(model_device(model), model_dtype(model))
    _add_if_read(model, out, {"encoder_hidden_states": states})


def _with_sized_features(model: nn.Module, out: dict[str, Any], batch: int, seed: int) -> None:
    """Float features ``(batch, 4, dim)`` for each input ``<name>`` the forward takes whose width the
    config holds as ``<name>_dim`` (singular too: LXMERT's ``visual_feats`` of ``visual_feat_dim``,
    ``visual_pos`` of ``visual_pos_dim``), kept where the forward reads or needs them."""
    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(seed + 4)
    extra = {}
    for k in params:
        dim = getattr(model.config, f"{k}_dim", None) or getattr(model.config, f"{k.removesuffix('s')}_dim", None)
        if k not in out and isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            extra[k] = torch.randn(batch, 4, dim, generator=gen).to(model_device(model), model_dtype(model))
    if extra:
        _add_if_read(model, out, extra)


def _with_boxes(model: nn.Module, out: dict[str, Any], batch: int, seq: int, seed: int) -> None:
    """A layout model's word boxes ``bbox`` ``(batch, seq, 4)``: ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and
    ``y0 <= y1`` on the 0-1000 page grid (LayoutLM, BROS), kept where the forward reads or needs them."""
    if "bbox" not in inspect.signature(model.forward).parameters:
        return
    gen = torch.Generator().manual_seed(seed + 3)
    start = torch.randint(0, 500, (batch, seq, 2), generator=gen)
    end = start + torch.randint(0, 500, (batch, seq, 2), generator=gen)
    box = torch.stack([start[..., 0], start[..., 1], end[..., 0], end[..., 1]], -1)
    _add_if_read(model, out, {"bbox": box.to(model_device(model))})


def _with_global_attention(model: nn.Module, out: dict[str, Any]) -> None:
    """A ``global_attention_mask`` marking each sample's first token (Longformer, LED: the ``<s>``/CLS token
    that attends to and is attended by all, as their task heads use it), kept where the forward reads it:
    without one, the global attention's projections are not in the traced forward."""
    ids = out.get("input_ids")
    if "global_attention_mask" not in inspect.signature(model.forward).parameters or not isinstance(ids, torch.Tensor):
        return
    marks = torch.zeros_like(ids)
    marks[:, 0] = 1
    _add_if_read(model, out, {"global_attention_mask": marks})
