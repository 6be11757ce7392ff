"""Audio inputs: raw audio, spectrogram frames and their layout, Gemma 3n's mel frames, and audio with
its placeholder tokens (audio-language models) or frames beside the text (CLAP, CLVP)."""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.model import (
    _add_if_read,
    _first_that_runs,
    _required,
    _token_id,
    model_device,
    model_dtype,
    nested_configs,
)
from permgraph.inputs.placeholders import _feature_count, _merged_count, _named_for, _with_modality_tokens


def _with_audio(model: nn.Module, out: dict[str, Any], params: Any, batch: int, gen: torch.Generator,
                seed: int) -> bool:
    """Audio for a forward that reads ``input_features`` (or ``audio_input_features``: Phi-4 multimodal; or
    raw audio, ``input_values``: OmniASR, VibeVoice) beside its text: with its placeholder tokens
    (audio-language models: the tower in the forward), counted by the model's helpers or else by what its
    merge reports (``_merged_count``), each sample's count in a list ``<...>embed_sizes`` where the forward
    takes one; else frames next to the text (CLAP, CLVP; not an encoder-decoder's). Whether audio with
    placeholders was added."""
    cfg = model.config
    feats = next((k for k in ("input_features", "audio_input_features", "input_values") if k in params), None)
    if feats is None or model.main_input_name == feats or "input_ids" not in out:
        return False
    tok = _token_id(cfg, "audio")
    if tok is not None:
        found = _audio_inputs(model, batch, gen) if feats != "input_values" else _raw_audio_masked(model, params,
                                                                                                     batch, gen)
        cands = (_named_for(params, "audio", c) for c in found)
        added = _with_modality_tokens(model, out, batch, "audio",
                                      _audio_token_count(model) or _merged_count(model, out, "audio"), cands,
                                      check_forward=True,
                                      keep={t for k in ("image", "video") if (t := _token_id(cfg, k)) is not None})
        sizes = next((k for k in out if k.endswith("embed_sizes")), None)
        if added and sizes is not None:  # each sample's count, not the frames that bound it
            out[sizes] = [int(n) for n in (out["input_ids"] == tok).sum(1)]
        return added
    if feats == "input_features" and not getattr(cfg, "is_encoder_decoder", False):
        _with_audio_frames(model, out, batch, seed)
    return False


def _raw_audio(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """``input_values``: raw audio ``(batch, 1024)`` (wav2vec 2.0, HuBERT), 16 frames where the config cuts it
    into frames of ``frame_ms``; with its channels ``(batch, channels, 1024)`` (codecs: EnCodec, Mimi, X-Codec;
    ``audio_channels`` or mono); both four hops of the config long (``_hops``: PE Audio's DAC, Muse Spark's 1920
    samples per token); a spectrogram
    ``(batch, max_length, num_mel_bins)`` (Audio Spectrogram Transformer). A forward that requires spectrogram
    frames beside the raw audio gets both (``_audio_with_frames``)."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
    if "input_features" in _required(inspect.signature(model.forward).parameters):
        yield from _audio_with_frames(model, batch, gen)
        return
    acfg = next((c for c in (cfg, getattr(cfg, "encoder_config", None)) if getattr(c, "frame_ms", None)), None)
    if acfg is not None and getattr(acfg, "sample_rate", None):  # audio cut into frames of frame_ms each
        frame = round(acfg.sample_rate * acfg.frame_ms / 1000)  # (Moonshine Streaming): 16 whole frames
        yield {"input_values": torch.randn(batch, 16 * frame, generator=gen).to(dev, dtype)}
    yield {"input_values": torch.randn(batch, 1024, generator=gen).to(dev, dtype)}
    channels = getattr(cfg, "audio_channels", None) or 1
    yield {"input_values": torch.randn(batch, channels, 1024, generator=gen).to(dev, dtype)}
    for hop in _hops(cfg):  # four of the frames the config's hop makes (longer than a codec's receptive
        yield {"input_values": torch.randn(batch, 4 * hop, generator=gen).to(dev, dtype)}  # field; a
        yield {"input_values": torch.randn(batch, channels, 4 * hop, generator=gen).to(dev, dtype)}  # whole one)
    frames, mels = getattr(cfg, "max_length", None), getattr(cfg, "num_mel_bins", None)
    if isinstance(frames, int) and isinstance(mels, int):
        yield {"input_values": torch.randn(batch, frames, mels, generator=gen).to(dev, dtype)}


def _raw_audio_masked(model: nn.Module, params: Any, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Raw audio beside the text of an audio-language model (OmniASR, VibeVoice): ``_raw_audio``'s candidates,
    each first with an all-ones ``padding_mask`` over its samples where the forward takes one (VibeVoice's
    audio helper requires it), then without."""
    for cand in _raw_audio(model, batch, 0, gen):
        audio = cand["input_values"]
        if "padding_mask" in params:
            yield {**cand, "padding_mask": torch.ones(audio.shape[0], audio.shape[-1], dtype=torch.long,
                                                      device=audio.device)}
        yield cand


def _audio_with_frames(model: nn.Module, batch: int, gen: torch.Generator, frames: int = 4) -> Iterator[dict[str, Any]]:
    """Raw audio with the spectrogram frames of the same clip, for a forward that reads both (a codec's
    acoustic encoder on the audio and semantic encoder on the frames, their outputs joined frame by frame:
    X-Codec 2, NeuCodec): ``frames`` hops of audio ``(batch, 1, frames * hop)`` (then without the channel) and a
    frame per hop ``(batch, frames, dim)`` (then channels first, ``(batch, dim, frames)``), for each hop of
    ``_hops`` and each frame width the config or a sub-config declares (``feature_projection_input_dim``,
    ``num_mel_bins``, ``feature_size``; 80 where none does)."""
    dev, dtype = model_device(model), model_dtype(model)
    dims = [v for c in nested_configs(model.config)
            for v in (getattr(c, k, None) for k in ("feature_projection_input_dim", "num_mel_bins", "feature_size"))
            if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    for hop in _hops(model.config):
        for audio in ((batch, 1, frames * hop), (batch, frames * hop)):
            for dim in dict.fromkeys(dims or [80]):
                for shape in ((batch, frames, dim), (batch, dim, frames)):
                    yield {"input_values": torch.randn(*audio, generator=gen).to(dev, dtype),
                           "input_features": torch.randn(*shape, generator=gen).to(dev, dtype)}


def _hops(cfg: Any) -> list[int]:
    """Samples per audio frame that a config or its sub-configs declare: ``hop_length``, ``samples_per_token``
    or the product of ``downsampling_ratios``."""
    out = []
    for c in nested_configs(cfg):
        ratios = getattr(c, "downsampling_ratios", None)
        for v in (getattr(c, "hop_length", None), getattr(c, "samples_per_token", None),
                  math.prod(ratios) if isinstance(ratios, (list, tuple)) and ratios else None):
            if isinstance(v, int) and not isinstance(v, bool) and v > 1 and v not in out:
                out.append(v)
    return out


def _audio_mel(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Gemma 3n's audio encoder: mel frames ``(batch, frames, mels)`` and ``audio_mel_mask`` (True is
    padding: none here)."""
    cfg = model.config
    mels = getattr(cfg, "input_feat_size", None) or getattr(cfg, "num_mel_bins", None) or 80
    dev = model_device(model)
    yield {"audio_mel": torch.randn(batch, 64, mels, generator=gen).to(dev, model_dtype(model)),
           "audio_mel_mask": torch.zeros(batch, 64, dtype=torch.bool, device=dev)}


def _spectrogram(model: nn.Module, out: dict[str, Any], batch: int, gen: torch.Generator):
    """``out["input_features"]``: spectrogram frames, mel bins from the config or, for a CTC or seq2seq
    head, its tower's sub-config (LASR's, Canary's); returns the layout chooser to run once the other
    inputs are there (``_spectrogram_layout``)."""
    cfg = model.config
    acfg = next((c for c in (cfg, getattr(cfg, "encoder_config", None), getattr(cfg, "audio_config", None))
                 if getattr(c, "num_mel_bins", None) or getattr(c, "feature_size", None)), cfg)
    given = getattr(acfg, "num_mel_bins", None) or getattr(acfg, "feature_size", None)
    mels = given or 80  # a config without a mel count: 80 (Whisper's), then 128 (Gemma 4's audio tower)
    frames = 2 * getattr(cfg, "max_source_positions", 0) or 64
    window = getattr(acfg, "n_window", None)  # chunked attention over whole windows of 2 * n_window frames
    if isinstance(window, int) and not isinstance(window, bool) and window > 0:  # (Qwen3-ASR's encoder)
        frames = 2 * window * math.ceil(frames / (2 * window))
    out["input_features"] = torch.randn(batch, mels, frames, generator=gen).to(model_device(model), model_dtype(model))
    stacked = getattr(acfg, "num_stacked_frames", None)  # frames stacked into one vector (FunASR's LFR)
    stack = stacked if isinstance(stacked, int) and stacked > 0 else 1
    other = () if given else (128 * stack,)
    proj = getattr(acfg, "feature_projection_input_dim", None)  # the width a feature projection reads, stacked
    if isinstance(proj, int) and not isinstance(proj, bool) and proj > 0 and proj != mels * stack:  # frames
        other += (proj,)  # (Wav2Vec2-BERT's 2 x 80 mels)
    stacked = _stacked_mels(model, mels * stack)
    if stacked is not None and stacked not in other:
        other += (stacked,)
    return _spectrogram_layout(model, out["input_features"], mels * stack, gen, other)


def _stacked_mels(model: nn.Module, mels: int) -> int | None:
    """The width of frames that the model's first linear layer reads where it is 2 to 4 times the mel bins
    and no config key says so (Granite Speech 5's ``input_linear``: delta-expanded mels stacked in pairs,
    4 x 80), else None."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    n = getattr(first, "in_features", None)
    return n if isinstance(n, int) and mels > 0 and n != mels and n % mels == 0 and 2 <= n // mels <= 4 else None


def _with_audio_frames(model: nn.Module, out: dict[str, Any], batch: int, seed: int) -> None:
    """Spectrogram frames for a forward that reads them next to the text without audio placeholders (a
    contrastive audio-text model's audio tower: CLAP; CLVP's conditioning encoder), in the first layout the
    forward runs with and its outputs change: ``(batch, mels, 64)``, ``(batch, 1, 64, mels)`` (CLAP's
    HTSAT), ``(batch, 64, mels)``; ``mels`` the config's or a sub-config's (``num_mel_bins``,
    ``feature_size``), else 80."""
    cfg = model.config
    mels = next((v for c in nested_configs(cfg) for k in ("num_mel_bins", "feature_size")
                 if isinstance(v := getattr(c, k, None), int) and not isinstance(v, bool) and v > 0), 80)
    gen = torch.Generator().manual_seed(seed + 4)
    for shape in ((batch, mels, 64), (batch, 1, 64, mels), (batch, 64, mels)):
        frames = torch.randn(*shape, generator=gen).to(model_device(model), model_dtype(model))
        _add_if_read(model, out, {"input_features": frames})
        if "input_features" in out:
            return


# a spectrogram model's frame mask, which its forward requires (FunASR's, Qwen3-ASR's encoders) or takes as
# optional but reads (AudioFlamingo 3's encoder)
_FRAME_MASKS = ("input_features_mask", "feature_attention_mask")


def _spectrogram_layout(model: nn.Module, first: torch.Tensor, mels: int, gen: torch.Generator,
                        other_mels: tuple[int, ...] = ()) -> Any:
    """A spectrogram model's ``input_features`` are ``first``, ``(batch, mels, frames)`` (Whisper), unless the
    forward refuses them and takes ``(batch, frames, mels)`` (conformer encoders: Parakeet, LASR, Speech2Text),
    each with an all-ones frame mask where the forward requires one; then the same two layouts with each of
    ``other_mels`` bins; then all of them with the all-ones mask the forward takes as optional but reads
    (AudioFlamingo 3's encoder). The choice needs the whole input: what this returns sets them in the
    finished inputs (the first layout when none runs)."""
    params = inspect.signature(model.forward).parameters
    required = next((m for m in _FRAME_MASKS if m in params and params[m].default is params[m].empty), None)
    optional = next((m for m in _FRAME_MASKS if m in params), None) if required is None else None
    b, frames = first.shape[0], first.shape[2]
    layouts = [(first, 2), (torch.randn(b, 64, mels, generator=gen).to(first.device, first.dtype), 1)]
    for n in other_mels:
        layouts += [(torch.randn(b, n, frames, generator=gen).to(first.device, first.dtype), 2),
                    (torch.randn(b, 64, n, generator=gen).to(first.device, first.dtype), 1)]

    masks = [required] if optional is None else [None, optional]

    def choose(inputs: dict[str, Any]) -> None:
        trials = ({**inputs, "input_features": feats,
                   **({mask: torch.ones(feats.shape[0], feats.shape[time_dim], dtype=torch.long, device=feats.device)}
                      if mask is not None else {})}
                  for mask, (feats, time_dim) in ((m, x) for m in masks for x in layouts))
        inputs.update(_first_that_runs(model, trials, fallback=False))

    return choose


def _audio_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate audio inputs of an audio-language model, most common layout first: log-mel frames
    ``(batch, mels, frames)`` (Whisper-style towers want ``2 * max_source_positions`` frames), then
    frames first ``(batch, frames, dim)`` (conformer towers: ``input_dim``, stacked frames' ``input_size``);
    each with an all-ones frame mask where the forward takes one, then without it; a forward that
    takes waveform lengths ``*sample_lengths`` (Dots3-Note's ``chunk_sample_lengths``) gets whole
    clips, ``frames * hop_length`` samples each; one that takes how many embeddings of each sample it
    keeps (``*embed_sizes``: Phi-4 multimodal's ``audio_embed_sizes``), all of them, a list of the frames."""
    cfg = model.config
    acfg = getattr(cfg, "audio_config", None) or getattr(cfg, "encoder_config", None) or cfg
    mels = getattr(acfg, "num_mel_bins", None) or getattr(acfg, "feature_size", None) or 128
    dims = [d for d in (getattr(acfg, "input_dim", None), getattr(acfg, "input_size", None), mels)
            if isinstance(d, int) and not isinstance(d, bool) and d > 0]
    params = inspect.signature(model.forward).parameters
    mask = next((m for m in _FRAME_MASKS if m in params), None)
    dev, dtype = model_device(model), model_dtype(model)
    hop = getattr(acfg, "hop_length", None)
    samples = next((k for k in params if k.endswith("sample_lengths")), None) if isinstance(hop, int) else None
    sizes = next((k for k in params if k.endswith("embed_sizes")), None)
    for frames in dict.fromkeys([2 * (getattr(acfg, "max_source_positions", 0) or 0), 64, 400, 3000]):
        if not frames:
            continue
        shapes = [(batch, mels, frames)] + [(batch, frames, d) for d in dict.fromkeys(dims)]
        lengths = {samples: torch.full((batch,), frames * hop, dtype=torch.long, device=dev)} if samples else {}
        if sizes is not None:  # how many of each sample's embeddings the forward keeps (a list, read in
            lengths[sizes] = [frames] * batch  # Python): all (the frames bound them)
        for shape in shapes:
            feats = torch.randn(*shape, generator=gen).to(dev, dtype)
            if mask is not None:
                yield {"input_features": feats, mask: torch.ones(batch, frames, dtype=torch.long, device=dev),
                       **lengths}
            yield {"input_features": feats, **lengths}


def _audio_token_count(model: nn.Module) -> Any:
    """How many audio tokens candidate audio inputs take: the count of what the model's
    ``get_audio_features`` returns where that needs only the audio inputs (a parameter of the
    forward that the helper requires and the candidate lacks is passed as ``None``, the forward's
    default); otherwise (no helper, or one that needs ``input_ids``) what the audio tower's own
    ``_get_feat_extract_output_lengths`` gives for the frames. None when neither exists."""
    fwd = inspect.signature(model.forward).parameters
    helpers = [m.get_audio_features for m in model.modules()
               if callable(getattr(m, "get_audio_features", None))]
    required = {name for h in helpers for name, p in inspect.signature(h).parameters.items()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    towers = [m for m in model.modules() if m is not model and getattr(m, "main_input_name", None) == "input_features"
              and callable(getattr(m, "_get_feat_extract_output_lengths", None))]
    if not helpers and not towers:
        return None

    def count(**cand: Any) -> int:
        if helpers and "input_ids" not in required:
            get = helpers[0]
            accepts = inspect.signature(get).parameters
            takes_all = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
            args = {k: v for k, v in cand.items() if takes_all or k in accepts}
            args.update({k: None for k in required - set(cand)
                         if (takes_all or k in accepts) and k in fwd and fwd[k].default is None})
            return _feature_count(get(**args))
        if not towers:
            raise TypeError("no way to count the audio tokens")
        feats = cand["input_features"]
        masks = [v for k, v in cand.items() if k != "input_features"]
        lengths = masks[0].sum(-1) if masks else torch.full((feats.shape[0],), feats.shape[-1], device=feats.device)
        res = towers[0]._get_feat_extract_output_lengths(lengths.long())
        return int((res[-1] if isinstance(res, tuple) else res).sum())

    return count
