"""Example inputs: the user's, or derived from a transformers model's config (no tokenizer or hub)."""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.errors import TraceError

ExampleInputs = tuple | dict | torch.Tensor | None


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (derived float inputs use it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# keyword flags of transformers models set False while tracing: a returned KV cache (``use_cache``)
# or XLNet's memory (``use_mems``) is state for generation, not an output of the function
_OFF_WHILE_TRACING = ("use_cache", "use_mems")


# the modalities derived inputs may add to the text, in the order they are added
MODALITIES = ("image", "video", "audio")


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0,
                           modalities: bool | Collection[str] = True) -> dict[str, torch.Tensor]:
    """Inputs derived from a transformers model's config (no tokenizer or hub needed). A
    vision/audio-language model gets images, videos and audio with their placeholder tokens; with
    ``modalities=False``, text only (its towers then are not in the traced forward); with a
    collection of ``MODALITIES``, those only."""
    if not is_transformers_model(model):
        raise TraceError(
            f"{type(model).__name__} is not a transformers model, so permgraph cannot guess its inputs. "
            "Pass example_inputs: a tuple of positional arguments or a dict of keyword arguments, "
            "e.g. pg.compile(model, (torch.randn(2, 16, 64),)) or, on the command line, a factory "
            "'module:function' that returns (model, example_inputs).")
    cfg = model.config
    dev = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    out: dict[str, torch.Tensor] = {}

    # token ids where the forward reads text: a vision-main model (Kosmos-2, BLIP) too when its config
    # has a text vocabulary (plain vision models' forwards take no input_ids)
    # (a text tower that inherits a vision model's main input name but takes no images: SAM 3's)
    if "input_ids" in params and (model.main_input_name != "pixel_values" or _text_vocab(cfg) is not None
                                  or "pixel_values" not in params):
        vocab = _text_vocab(cfg) or getattr(cfg, "vocab_size", None) or 100
        out["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    # caches off before the probes below run the forward (a hybrid cache fails a forward without attention)
    out.update({flag: False for flag in _OFF_WHILE_TRACING if flag in params})
    mods = set(MODALITIES if modalities is True else modalities or ())
    no_image = "image" not in mods and "input_ids" in out
    layout = None
    placed = _token_id(cfg, "image") is not None or _image_position_mask(params) is not None
    if "input_ids" not in out:  # a vision tower on its own that reads flattened patches (Qwen-VL's)
        out.update(_tower_grid_patches(model, params, batch, gen))
    if "pixel_values" in params and "pixel_values" not in out and not (no_image and placed):
        out.update(_plain_images(model, params, placed, batch, gen))
        if not placed and "image_attention_mask" in params and "input_ids" in out:
            _with_images_attended(model, out)
    if "flattened_patches" in params and model.main_input_name == "flattened_patches":  # Pix2Struct's encoder
        out["flattened_patches"] = next(_flattened_patches(model, batch, gen))["flattened_patches"]
    images = (("pixel_values" in out or "flattened_patches" in params) and "input_ids" in out and placed
              and not no_image and _with_image_tokens(model, out, batch, gen))
    if "pixel_values_videos" in params and "input_ids" in out and "video" in mods:  # a tower of its own for videos
        images = _with_video_tokens(model, out, batch, gen) or images
    audio = "audio" in mods and _with_audio(model, out, params, batch, gen, seed)
    if images:  # computed from every placeholder in the text (images, videos, audio)
        _with_rope_positions(model, out)
        _with_precomputed(model, out)
    if audio:
        _with_precomputed(model, out, "audio")
    for name in dict.fromkeys([model.main_input_name, *_required(params)]):  # raw audio, clips, ...: the main
        if name in _OTHER_MAIN_INPUTS and name in params and name not in out:  # input, or one the forward
            cands = _OTHER_MAIN_INPUTS[name](model, batch, seq, gen)  # requires beside text (PE Audio's)
            out.update(_first_that_runs(model, ({**out, **c} for c in cands)))
    if "input_features" in params and model.main_input_name == "input_features":  # spectrogram frames
        layout = _spectrogram(model, out, batch, gen)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        out["decoder_input_ids"] = _decoder_ids(cfg, batch, seq, gen).to(dev)
    if layout is not None:  # the spectrogram's layout, now that the other inputs are there
        layout(out)
    embeds = _with_required_embeds(model, out, params, batch, seq, gen)
    if not set(out) - set(_OFF_WHILE_TRACING):
        raise TraceError(f"cannot derive example inputs for {type(model).__name__}: pass example_inputs")
    if "input_ids" in out or embeds in out:  # inputs read by parts the ones above leave out (probed: kept
        _with_encoder_states(model, out, batch, seed)  # if they matter)
        _with_second_token_streams(model, out, batch, seq, seed)
        _with_boxes(model, out, batch, seq, seed)
        _with_global_attention(model, out)
        _with_sized_features(model, out, batch, seed)
    return out


def _with_audio(model: nn.Module, out: dict[str, Any], params: Any, batch: int, gen: torch.Generator,
                seed: int) -> bool:
    """Audio for a forward that reads ``input_features`` beside its text: with its placeholder tokens
    (audio-language models: the tower in the forward), else frames next to the text (CLAP, CLVP; not an
    encoder-decoder's). Whether audio with placeholders was added."""
    cfg = model.config
    if "input_features" not in params or model.main_input_name == "input_features" or "input_ids" not in out:
        return False
    if _token_id(cfg, "audio") is not None:
        return _with_modality_tokens(model, out, batch, "audio", _audio_token_count(model),
                                     _audio_inputs(model, batch, gen), check_forward=True,
                                     keep={t for k in ("image", "video") if (t := _token_id(cfg, k)) is not None})
    if not getattr(cfg, "is_encoder_decoder", False):
        _with_audio_frames(model, out, batch, seed)
    return False


def _with_required_embeds(model: nn.Module, out: dict[str, Any], params: Any, batch: int, seq: int,
                          gen: torch.Generator) -> str | None:
    """Embeddings of the config's width for the first ``*_embeds`` input the forward requires and ``out``
    lacks (BLIP-2's Q-Former: its ``query_embeds``); its name, or None."""
    embeds = next((k for k in _required(params) if k.endswith("_embeds") and k not in out), None)
    if embeds is not None:
        found = next(_embeddings(model, batch, seq, gen), {})
        out.update({embeds: found["inputs_embeds"]} if found else {})
    return embeds


def _decoder_ids(cfg: Any, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """An encoder-decoder's ``decoder_input_ids`` ``(batch, seq // 2)`` in its decoder's vocabulary (a vision
    encoder-decoder's: its decoder config's); a decoder of audio codes (MusicGen) a row per codebook and sample."""
    vocab = (getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "decoder", None), "vocab_size", None)
             or _text_vocab(cfg) or 100)
    codebooks = getattr(getattr(cfg, "decoder", None), "num_codebooks", None)
    rows = batch * codebooks if isinstance(codebooks, int) and codebooks > 0 else batch
    return torch.randint(0, vocab, (rows, seq // 2), generator=gen)


def _pixel_values(vcfg: Any, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Images of the vision config's size (``image_size``, square or ``(height, width)``, or ``crop_size``); a
    video model's clip (VideoMAE, ViViT, X-CLIP: its config has ``num_frames``; V-JEPA 2: ``frames_per_clip``)
    is ``(batch, frames, C, H, W)``."""
    size = getattr(vcfg, "image_size", None) or getattr(vcfg, "crop_size", None) or 32
    height, width = (size, size) if isinstance(size, int) else tuple(size[:2])  # MGP-STR's (32, 128)
    ch = getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_chans", None) or 3
    frames = getattr(vcfg, "num_frames", None) or getattr(vcfg, "frames_per_clip", None)
    clip = (frames,) if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else ()
    return torch.randn(batch, *clip, ch, height, width, generator=gen)


def _patch_size(vcfg: Any, default: int | None = None) -> int | None:
    """The vision config's patch side (the first of a ``(height, width)`` pair), else ``default``."""
    patch = getattr(vcfg, "patch_size", None) or default
    return patch if isinstance(patch, int) or patch is None else patch[0]


def _vision_config(cfg: Any) -> Any:
    """The config that sizes a model's images: ``vision_config``, FLAVA's ``image_config``, a vision
    encoder-decoder's ``encoder`` (one with an ``image_size``) or its encoder's ``vision_config`` (T5Gemma 2's
    encoder is a vision-language one); else the config itself."""
    for key in ("vision_config", "image_config", "encoder"):
        sub = getattr(cfg, key, None)
        if sub is not None and (key != "encoder" or getattr(sub, "image_size", None) is not None):
            return sub
    return getattr(getattr(cfg, "encoder", None), "vision_config", None) or cfg


def _plain_images(model: nn.Module, params: Any, placed: bool, batch: int, gen: torch.Generator) -> dict[str, Any]:
    """``pixel_values`` of the vision config's size, with the other images the forward requires; patchified
    where the forward reads patches (a tower without placeholder tokens: ``_patchified``); none where the
    model was built without its vision tower (``vision_config`` None: Gemma 4's default config), which then
    runs its text only."""
    cfg = model.config
    if "vision_config" in vars(cfg) and cfg.vision_config is None:
        return {}
    vcfg = _vision_config(cfg)
    dev, dtype = model_device(model), model_dtype(model)
    out = {"pixel_values": _pixel_values(vcfg, batch, gen).to(dev, dtype)}
    others = [k for k in _required(params) if k != "pixel_values" and k.endswith(("pixel_values", "_masks"))]
    if not placed and model.main_input_name == "pixel_values":  # candidates where the forward refuses these:
        x = out["pixel_values"]  # with the other images it requires (SegGPT's prompt image and mask) of their
        halves = x[..., : x.shape[-2] // 2, :]  # shape, or of half their height (stacked into the config's
        out = _first_that_runs(model, iter([  # size), or a pair of images per sample (LightGlue)
            {"pixel_values": x, **{k: torch.randn_like(x) for k in others}},
            *([{"pixel_values": halves, **{k: torch.randn_like(halves) for k in others}}] if others else []),
            {"pixel_values": torch.stack([x, torch.randn_like(x)], 1)}]))
    if not placed and ("spatial_shapes" in params and "pixel_attention_mask" in params  # NaFlex (SigLIP 2)
                       or "pixel_position_ids" in params):  # patches with their positions (Gemma 4's tower)
        out.update(_patchified(vcfg, batch, gen, dev, dtype, params))
    return out


def _with_images_attended(model: nn.Module, out: dict[str, Any]) -> None:
    """Images per sample ``(batch, 1, C, H, W)`` with an all-ones ``image_attention_mask`` ``(batch, text, 1)``
    (which text tokens attend to which image: Idefics's gated cross-attention), where the forward fails on
    the plain images and runs on these."""
    if "pixel_values" not in out:
        return
    try:
        with torch.no_grad():
            model(**out)
        return
    except Exception:  # noqa: BLE001 - the plain images do not fit: try images attended by the text
        pass
    text = out["input_ids"]
    trial = {**out, "pixel_values": out["pixel_values"].unsqueeze(1),
             "image_attention_mask": torch.ones(*text.shape, 1, dtype=torch.long, device=text.device)}
    try:
        with torch.no_grad():
            model(**trial)
    except Exception:  # noqa: BLE001 - neither: the plain images stay
        return
    out.update(trial)


def _patchified(vcfg: Any, batch: int, gen: torch.Generator, dev: torch.device, dtype: torch.dtype,
                params: Any) -> dict[str, torch.Tensor]:
    """Already patchified images ``(batch, patches, C * P * P)`` on a square grid of patches, row by row.
    NaFlex (SigLIP 2): the grid each image's patches form (``spatial_shapes``, ``(batch, 2)``) and which
    patches are real (``pixel_attention_mask``, all of them); the grid is the config's ``num_patches``.
    Gemma 4's tower: each patch's (column, row) in ``pixel_position_ids`` ``(batch, patches, 2)`` (-1 is
    padding, none here); the grid two pooling kernels a side (pooled into 2 x 2 tokens)."""
    patch = _patch_size(vcfg, 16)
    ch = getattr(vcfg, "num_channels", None) or 3
    out: dict[str, torch.Tensor] = {}
    if "pixel_position_ids" in params:
        side = 2 * (getattr(vcfg, "pooling_kernel_size", None) or 2)
        i = torch.arange(side * side)
        out["pixel_position_ids"] = torch.stack([i % side, i // side], -1).expand(batch, -1, -1).to(dev)
    else:
        side = math.isqrt(getattr(vcfg, "num_patches", None) or 16)
        out["pixel_attention_mask"] = torch.ones(batch, side * side, dtype=torch.long, device=dev)
        out["spatial_shapes"] = torch.tensor([[side, side]] * batch, dtype=torch.long, device=dev)
    out["pixel_values"] = torch.randn(batch, side * side, ch * patch * patch, generator=gen).to(dev, dtype)
    return out


def _video_clips(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A video classifier's ``pixel_values_videos`` (V-JEPA 2, VideoPrism): a clip, ``_pixel_values``."""
    vcfg = _vision_config(model.config)
    yield {"pixel_values_videos": _pixel_values(vcfg, batch, gen).to(model_device(model), model_dtype(model))}


def _embeddings(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A forward whose main input is ``inputs_embeds`` ``(batch, seq, hidden)`` (no embedding table)."""
    width = next((v for k in ("hidden_size", "d_model") if isinstance(v := getattr(model.config, k, None), int)), None)
    if width:
        yield {"inputs_embeds": torch.randn(batch, seq, width, generator=gen).to(model_device(model),
                                                                                 model_dtype(model))}


def _required(params: Any) -> list[str]:
    """The forward's parameters that have no default (named ones: not ``*args``, ``**kwargs``)."""
    return [k for k, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _trajectory(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """An offline-RL trajectory (Decision Transformer): ``states`` ``(batch, seq, state_dim)``, ``actions``
    ``(batch, seq, act_dim)``, ``rewards`` and ``returns_to_go`` ``(batch, seq, 1)`` and ``timesteps`` below
    ``max_ep_len``, each where the forward takes it."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
    params = inspect.signature(model.forward).parameters
    widths = {"states": getattr(cfg, "state_dim", None), "actions": getattr(cfg, "act_dim", None),
              "rewards": 1, "returns_to_go": 1}
    out = {k: torch.randn(batch, seq, w, generator=gen).to(dev, dtype) for k, w in widths.items()
           if k in params and isinstance(w, int)}
    if "timesteps" in params:
        steps = getattr(cfg, "max_ep_len", None) or seq
        out["timesteps"] = torch.randint(0, steps, (batch, seq), generator=gen).to(dev)
    yield out


def _latents(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A decoder of continuous latents (Mimi's): ``(batch, width, frames)`` channels first (a codec's
    convolutions), then ``(batch, frames, width)``; the width the config's ``hidden_size`` (or ``d_model``)."""
    width = next((v for k in ("hidden_size", "d_model") if isinstance(v := getattr(model.config, k, None), int)), None)
    if width:
        for shape in ((batch, width, seq), (batch, seq, width)):
            yield {"latents": torch.randn(*shape, generator=gen).to(model_device(model), model_dtype(model))}


def _raw_audio(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """``input_values``: raw audio ``(batch, 1024)`` (wav2vec 2.0, HuBERT), 16 frames where the config cuts it
    into frames of ``frame_ms``; with its channels ``(batch, channels, 1024)`` (codecs: EnCodec, Mimi, X-Codec;
    ``audio_channels`` or mono); both four hops of the config long (``_hops``: PE Audio's DAC, Muse Spark's 1920
    samples per token); a spectrogram
    ``(batch, max_length, num_mel_bins)`` (Audio Spectrogram Transformer)."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
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


def _nested_configs(cfg: Any) -> list[Any]:
    """A config and its sub-configs at every depth, breadth first."""
    from transformers import PretrainedConfig

    out = [cfg]
    for c in out:  # grows while it is walked
        out += [v for v in vars(c).values() if isinstance(v, PretrainedConfig)]
    return out


def _hops(cfg: Any) -> list[int]:
    """Samples per audio frame that a config or its sub-configs declare: ``hop_length``, ``samples_per_token``
    or the product of ``downsampling_ratios``."""
    out = []
    for c in _nested_configs(cfg):
        ratios = getattr(c, "downsampling_ratios", None)
        for v in (getattr(c, "hop_length", None), getattr(c, "samples_per_token", None),
                  math.prod(ratios) if isinstance(ratios, (list, tuple)) and ratios else None):
            if isinstance(v, int) and not isinstance(v, bool) and v > 1 and v not in out:
                out.append(v)
    return out


def _past_values(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A time-series forecaster's history ``past_values``: ``(batch, context, channels)`` (PatchTST,
    PatchTSMixer), else ``(batch, context)`` with no padding (``past_values_padding`` zeros) and frequency
    class 0 ``(batch, 1)`` where the forward requires them (TimesFM); ``context`` the config's ``context_length``."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
    ctx = getattr(cfg, "context_length", None) or 4 * (getattr(cfg, "patch_length", None) or 8)
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {}
    if "past_values_padding" in params:
        extra["past_values_padding"] = torch.zeros(batch, ctx, dtype=torch.long, device=dev)
    if "freq" in params and params["freq"].default is params["freq"].empty:
        extra["freq"] = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    if "past_time_features" in params:  # lagged forecasters (Time Series Transformer, Informer, Autoformer)
        yield from _lagged_history(cfg, ctx, batch, gen, dev, dtype)
        return
    channels = getattr(cfg, "num_input_channels", None) or 1
    yield {"past_values": torch.randn(batch, ctx, channels, generator=gen).to(dev, dtype)}
    yield {"past_values": torch.randn(batch, ctx, generator=gen).to(dev, dtype), **extra}


def _lagged_history(cfg: Any, ctx: int, batch: int, gen: torch.Generator, dev: torch.device,
                    dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """A lagged forecaster's inputs: ``context + max(lags)`` steps of ``past_values`` (the lags look back
    that far), their time features ``(batch, steps, time + dynamic real features)`` and an all-ones
    ``past_observed_mask``, with the ``prediction_length`` future values and time features its decoder
    reads (then the past alone)."""
    lags = getattr(cfg, "lags_sequence", None) or [1]
    past, ahead = ctx + max(lags), getattr(cfg, "prediction_length", None) or 1
    feats = (getattr(cfg, "num_time_features", 0) or 0) + (getattr(cfg, "num_dynamic_real_features", 0) or 0)
    size = getattr(cfg, "input_size", 1) or 1
    per_step = () if size == 1 else (size,)

    def steps(n: int, *shape: int) -> torch.Tensor:
        return torch.randn(batch, n, *shape, generator=gen).to(dev, dtype)

    history = {"past_values": steps(past, *per_step), "past_time_features": steps(past, feats),
               "past_observed_mask": torch.ones(batch, past, *per_step, device=dev, dtype=dtype)}
    yield {**history, "future_values": steps(ahead, *per_step), "future_time_features": steps(ahead, feats)}
    yield history


def _audio_mel(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Gemma 3n's audio encoder: mel frames ``(batch, frames, mels)`` and ``audio_mel_mask`` (True is
    padding: none here)."""
    cfg = model.config
    mels = getattr(cfg, "input_feat_size", None) or getattr(cfg, "num_mel_bins", None) or 80
    dev = model_device(model)
    yield {"audio_mel": torch.randn(batch, 64, mels, generator=gen).to(dev, model_dtype(model)),
           "audio_mel_mask": torch.zeros(batch, 64, dtype=torch.bool, device=dev)}


def _encoder_main_input(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A speech encoder-decoder's ``inputs``: its encoder's main input as derived for the encoder (raw audio
    for wav2vec 2.0, spectrogram frames for Whisper's encoder)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not is_transformers_model(encoder) or encoder.main_input_name == "inputs":
        return
    try:
        derived = default_example_inputs(encoder, batch=batch, seq=seq, seed=int(gen.initial_seed()))
    except TraceError:  # none for the encoder either: the model's own message says so
        return
    if encoder.main_input_name in derived:
        yield {"inputs": derived[encoder.main_input_name]}


# a forward's main input (``main_input_name``) that is not text, images or spectrograms: candidate inputs,
# the first that the forward runs on kept
_OTHER_MAIN_INPUTS = {"input_values": _raw_audio, "pixel_values_videos": _video_clips, "inputs_embeds": _embeddings,
                      "past_values": _past_values, "audio_mel": _audio_mel, "inputs": _encoder_main_input,
                      "states": _trajectory, "latents": _latents}


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
    return _spectrogram_layout(model, out["input_features"], mels * stack, gen, other)


def _with_audio_frames(model: nn.Module, out: dict[str, Any], batch: int, seed: int) -> None:
    """Spectrogram frames for a forward that reads them next to the text without audio placeholders (a
    contrastive audio-text model's audio tower: CLAP; CLVP's conditioning encoder), in the first layout the
    forward runs with and its outputs change: ``(batch, mels, 64)``, ``(batch, 1, 64, mels)`` (CLAP's
    HTSAT), ``(batch, 64, mels)``; ``mels`` the config's or a sub-config's (``num_mel_bins``,
    ``feature_size``), else 80."""
    cfg = model.config
    mels = next((v for c in _nested_configs(cfg) for k in ("num_mel_bins", "feature_size")
                 if isinstance(v := getattr(c, k, None), int) and not isinstance(v, bool) and v > 0), 80)
    gen = torch.Generator().manual_seed(seed + 4)
    for shape in ((batch, mels, 64), (batch, 1, 64, mels), (batch, 64, mels)):
        frames = torch.randn(*shape, generator=gen).to(model_device(model), model_dtype(model))
        _add_if_read(model, out, {"input_features": frames})
        if "input_features" in out:
            return


def _with_second_token_streams(model: nn.Module, out: dict[str, Any], batch: int, seq: int, seed: int) -> None:
    """A forward that reads a second token stream ``<name>_input_ids`` through an encoder of its own
    (Evolla's ``protein_input_ids``, with ``protein_attention_mask``) gets random ids from the
    vocabulary of that encoder's sub-config (``<name>..._config``) and an all-ones
    ``<name>_attention_mask`` where the forward takes one, so the encoder is in the traced forward.
    Kept only if the forward runs with them and its outputs change."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    for name in params:
        prefix = name[: -len("_input_ids")] if name.endswith("_input_ids") else ""
        if not prefix or prefix == "decoder" or name in out:
            continue
        vocabs = [getattr(v, "vocab_size", None) for k, v in vars(cfg).items()
                  if k.startswith(prefix) and k.endswith("config")]
        vocab = next((v for v in vocabs if isinstance(v, int)), None)
        if not vocab:
            continue
        dev = model_device(model)
        gen = torch.Generator().manual_seed(seed + 2)
        extra = {name: torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)}
        if f"{prefix}_attention_mask" in params:
            extra[f"{prefix}_attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=dev)
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


def _add_if_read(model: nn.Module, out: dict[str, Any], extra: dict[str, Any]) -> None:
    """``out`` plus ``extra`` where the forward runs with them and its outputs change, or it runs only with
    them (on the meta device, where there are no values to compare, they are kept: unused inputs are
    harmless)."""
    try:
        with torch.no_grad():
            got = model(**out, **extra)
    except Exception:  # noqa: BLE001 - the forward does not take them (another width, more inputs needed)
        return
    try:
        with torch.no_grad():
            want = model(**out)
    except Exception:  # noqa: BLE001 - the forward needs them (BROS's bbox)
        want = None
    if want is None or not _same_outputs(want, got, unknown=False):
        out.update(extra)


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
        for mask, (feats, time_dim) in ((m, x) for m in masks for x in layouts):
            trial = {**inputs, "input_features": feats}
            if mask is not None:
                trial[mask] = torch.ones(feats.shape[0], feats.shape[time_dim], dtype=torch.long,
                                         device=feats.device)
            try:
                with torch.no_grad():
                    model(**trial)
            except Exception:  # noqa: BLE001 - the other layout
                continue
            inputs.update(trial)
            return

    return choose


def _token_id(cfg: Any, kind: str) -> int | None:
    """The placeholder token id of a modality (``image_token_id`` / ``image_token_index``)."""
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _text_vocab(cfg: Any) -> int | None:
    """The vocabulary of a multimodal config's text part (``text_config.vocab_size``), if it has one."""
    v = getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _image_position_mask(params: Any) -> str | None:
    """The forward's parameter that marks where image embeddings go in the text (Kosmos-2's
    ``image_embeds_position_mask``), for models whose placeholders have no token id of their own."""
    return next((k for k in params if k.startswith("image") and k.endswith("position_mask")), None)


# config fields that hold how many embeddings an image becomes, for models without get_image_features
# (Kosmos-2's resampler queries, ``image_seq_length``)
_IMAGE_TOKEN_COUNTS = ("latent_query_num", "image_seq_length", "num_image_tokens", "mm_tokens_per_image")


def _flattened_patches(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Pix2Struct-layout images ``(batch, patches, 2 + patch_dim)``: a 1-based row and column index in
    the first two columns (0 is padding), then the patch pixels; ``patch_dim`` is the vision config's
    ``patch_embed_hidden_size`` (or channels x patch area)."""
    vcfg = _vision_config(model.config)
    dev, dtype = model_device(model), model_dtype(model)
    dim = getattr(vcfg, "patch_embed_hidden_size", None)
    patch = _patch_size(vcfg)
    if not isinstance(dim, int) and patch:
        dim = (getattr(vcfg, "num_channels", None) or 3) * patch * patch
    if not isinstance(dim, int):
        return
    for side in (4, 2):
        rows = torch.arange(1, side + 1).repeat_interleave(side)
        cols = torch.arange(1, side + 1).repeat(side)
        idx = torch.stack([rows, cols], dim=-1).to(torch.float64).expand(batch, -1, -1)
        pixels = torch.randn(batch, side * side, dim, generator=gen, dtype=torch.float64)
        yield {"flattened_patches": torch.cat([idx, pixels], dim=-1).to(dev, dtype)}


# the forward's parameter that holds each image's grid of patches (temporal, height, width) in Qwen-VL's layout
_GRID_PARAMS = ("image_grid_thw", "grid_thw")


def _grid_patches(model: nn.Module, batch: int, gen: torch.Generator, grid: str = "image_grid_thw",
                  pixels: str = "pixel_values") -> Iterator[dict[str, Any]]:
    """Candidate flattened patches in Qwen-VL's layout: ``batch`` images of ``s x s`` patches (``s`` two
    merge windows) as rows ``(batch * s^2, C * T * P * P)``, ``T`` the config's temporal patch (then 2, 1),
    or ``(batch * s^2, C, P, P)`` where the patch embedding takes them unflattened (Kimi-K2.5); ``grid`` is
    ``[[1, s, s]] * batch``, and ``merge_sizes`` (``image_merge_sizes``) ``[merge] * batch`` where the
    forward takes it (VideoLLaMA 3)."""
    vcfg = _vision_config(model.config)
    dev, dtype = model_device(model), model_dtype(model)
    patch = _patch_size(vcfg, 14)
    ch = getattr(vcfg, "in_channels", None) or getattr(vcfg, "num_channels", None) or 3
    merge = getattr(vcfg, "spatial_merge_size", None) or getattr(vcfg, "merge_kernel_size", None) or 1
    merge = merge if isinstance(merge, int) else merge[0]
    side = 2 * merge
    n = batch * side * side
    extra = {grid: torch.tensor([[1, side, side]] * batch, device=dev)}
    params = inspect.signature(model.forward).parameters
    for name in ("merge_sizes", "image_merge_sizes"):  # VideoLLaMA 3's tower, its VLM
        if name in params:
            extra[name] = torch.tensor([merge] * batch, device=dev)
    shapes = [(n, ch * tp * patch * patch) for tp in dict.fromkeys((getattr(vcfg, "temporal_patch_size", None) or 1,
                                                                     2, 1))]
    for shape in (*shapes, (n, ch, patch, patch)):
        yield {pixels: torch.randn(*shape, generator=gen).to(dev, dtype), **extra}


def _navit_packed(vcfg: Any, gen: torch.Generator, dev: torch.device, dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """Candidate NaViT-packed images (MiniCPM-V): one image of ``s x s`` patches in a row ``(1, C, P, s^2 * P)``
    with its grid ``target_sizes = [[s, s]]``, ``s`` 4, 8 or 16 (one image: the tower's loop over images slices
    the row at offsets computed from the grid's values, which export cannot trace)."""
    patch = _patch_size(vcfg, 14)
    ch = getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_channels", None) or 3
    for side in (4, 8, 16):
        yield {"pixel_values": torch.randn(1, ch, patch, side * side * patch, generator=gen).to(dev, dtype),
               "target_sizes": torch.tensor([[side, side]], dtype=torch.int32, device=dev)}


def _tower_grid_patches(model: nn.Module, params: Any, batch: int, gen: torch.Generator) -> dict[str, Any]:
    """A vision tower's own inputs where its forward takes an image grid (``_GRID_PARAMS``) with the patches
    (``hidden_states`` or ``pixel_values``): the first of ``_grid_patches`` it runs on, or NaViT-packed images
    where it takes ``target_sizes`` (``_navit_packed``), with the vision helpers' results precomputed
    (``_with_precomputed``); ``{}`` otherwise."""
    grid = next((g for g in _GRID_PARAMS if g in params), None)
    pixels = next((k for k in ("hidden_states", "pixel_values") if k in params), None)
    if "target_sizes" in params and "pixel_values" in params:
        candidates = _navit_packed(_vision_config(model.config), gen, model_device(model), model_dtype(model))
    elif grid is None or pixels is None:
        return {}
    else:
        candidates = _grid_patches(model, batch, gen, grid, pixels)
    out = _first_that_runs(model, candidates)
    if out:
        _with_precomputed(model, out)
    return out


def _first_that_runs(model: nn.Module, candidates: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The first of ``candidates`` the forward runs on by themselves; else the first (the forward may need
    inputs derived after these, an encoder-decoder's ``decoder_input_ids``); ``{}`` when there are none."""
    first = None
    for inputs in candidates:
        first = inputs if first is None else first
        try:
            with torch.no_grad():
                model(**inputs)
        except Exception:  # noqa: BLE001 - the next layout
            continue
        return inputs
    return first or {}


def _image_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate image inputs of a vision-language model, most common layout first: one image per
    sample ``(batch, C, S, S)``; anyres tiles with ``image_sizes`` (LLaVA-NeXT); flattened patches with
    ``image_grid_thw`` (Qwen-VL); NaViT-packed patches with ``target_sizes`` (MiniCPM-V); Pix2Struct-layout
    ``flattened_patches`` (Kosmos-2.5); images per sample; last, for a model without a vision config, 16
    patches per image ``(batch, 16, C * P * P)`` (Fuyu embeds them with one linear layer)."""
    cfg = model.config
    vcfg = _vision_config(cfg)
    dev, dtype = model_device(model), model_dtype(model)
    params = inspect.signature(model.forward).parameters
    if "flattened_patches" in params:
        yield from _flattened_patches(model, batch, gen)
        return
    ch = getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_channels", None) or 3
    size = getattr(vcfg, "image_size", None)
    size = size if isinstance(size, int) or size is None else size[0]
    if size is None and getattr(cfg, "vq_config", None) is not None:  # images a VQ tokenizer turns into codes
        size = 32  # (Chameleon, Emu3: no image size in the config): the plain images' 32 pixels
    patch = _patch_size(vcfg)
    if "image_grid_thw" in params and patch:
        yield from _grid_patches(model, batch, gen)
        return
    if "target_sizes" in params and patch:  # NaViT packing (MiniCPM-V), its placeholders in the first sample
        yield from ({**c, _FIRST_SAMPLE_ONLY: True} for c in _navit_packed(vcfg, gen, dev, dtype))
        return
    if size is None:  # a NaFlex tower (no image size; SigLIP 2's, behind LFM2-VL's placeholders): its patches
        if "spatial_shapes" in params and "pixel_attention_mask" in params:  # on a grid of num_patches
            yield _patchified(vcfg, batch, gen, dev, dtype, params)
        return
    if "image_sizes" in params:
        num_patches = getattr(inspect.getmodule(type(model)), "image_size_to_num_patches", None)
        pinpoints = getattr(cfg, "image_grid_pinpoints", None)
        if num_patches is not None and pinpoints:
            n = num_patches((size, size), pinpoints, size)
            # a list, not a tensor: the number of tiles is computed from it in Python, which export
            # cannot do from tensor values
            yield {"pixel_values": torch.randn(batch, n, ch, size, size, generator=gen).to(dev, dtype),
                   "image_sizes": [[size, size]] * batch}
    yield {"pixel_values": torch.randn(batch, ch, size, size, generator=gen).to(dev, dtype)}
    if "image_sizes" in params:  # each image's size in pixels, which the forward requires (Mistral 3's patch
        # merger): a list again, read in Python
        yield {"pixel_values": torch.randn(batch, ch, size, size, generator=gen).to(dev, dtype),
               "image_sizes": [[size, size]] * batch}
    # images per sample (Idefics2/3, SmolVLM: ``(batch, images, C, S, S)``), one each; with the tiles' mask
    yield {"pixel_values": torch.randn(batch, 1, ch, size, size, generator=gen).to(dev, dtype)}
    if "pixel_attention_mask" in params:  # where it marks real tiles ``(batch, tiles)`` (Granite Docling)
        yield {"pixel_values": torch.randn(batch, 1, ch, size, size, generator=gen).to(dev, dtype),
               "pixel_attention_mask": torch.ones(batch, 1, dtype=torch.bool, device=dev)}
    if vcfg is cfg and patch:  # no vision tower of its own, patches embedded as they are (Fuyu): patchified
        yield {"pixel_values": torch.randn(batch, 16, ch * patch * patch, generator=gen).to(dev, dtype)}  # 4 x 4


def _second_resolution(model: nn.Module, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Images for each ``<name>_pixel_values`` the forward takes whose sub-config ``<name>_vision_config``
    sizes them (DeepSeek-VL hybrid's ``high_res_pixel_values``: a second tower at its own resolution)."""
    params = inspect.signature(model.forward).parameters
    out = {}
    for k in params:
        sub = getattr(model.config, f"{k[: -len('_pixel_values')]}_vision_config", None)
        if k.endswith("_pixel_values") and sub is not None:
            out[k] = _pixel_values(sub, batch, gen).to(model_device(model), model_dtype(model))
    return out


def _video_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate video inputs: ``frames`` images per sample ``(batch, frames, C, S, S)`` in the vision
    config's image layout (Video-LLaVA's ``pixel_values_videos``)."""
    vcfg = _vision_config(model.config)
    ch = getattr(vcfg, "num_channels", None) or 3
    size = getattr(vcfg, "image_size", None)
    size = size if isinstance(size, int) or size is None else size[0]
    if size is None:
        return
    for frames in (2, 1):
        yield {"pixel_values_videos": torch.randn(batch, frames, ch, size, size, generator=gen)
               .to(model_device(model), model_dtype(model))}


def _params_run(model: nn.Module, inputs: dict[str, Any]) -> set[str]:
    """The parameters of the modules that one eager forward on ``inputs`` calls."""
    names = {m: n for n, m in model.named_modules()}
    seen: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: seen.add(names[mod]))
             for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {f"{m}.{p}" if m else p for m in seen for p, _ in model.get_submodule(m).named_parameters(recurse=False)}


def _with_video_tokens(model: nn.Module, out: dict[str, Any], batch: int, gen: torch.Generator) -> bool:
    """Video inputs with as many video tokens in ``input_ids`` as ``get_video_features`` yields, kept
    only where the forward accepts them and they bring parameters into the forward that the other
    inputs leave out (a video tower of its own: Video-LLaVA); videos read by the image tower add
    nothing to the spec and are left out. Whether ``out`` changed."""
    get = next((m.get_video_features for m in model.modules() if callable(getattr(m, "get_video_features", None))),
               None)
    if get is None or _token_id(model.config, "video") is None:
        return False
    trial = dict(out)
    keep = {t for k in ("image", "audio") if (t := _token_id(model.config, k)) is not None}
    if not _with_modality_tokens(model, trial, batch, "video", get, _video_inputs(model, batch, gen),
                                 check_forward=True, keep=keep):
        return False
    try:
        if not _params_run(model, trial) - _params_run(model, out):
            return False
    except Exception:  # noqa: BLE001 - the forward does not run with the inputs as they were: keep them
        return False
    out.update(trial)
    return True


def _feature_count(feats: Any) -> int:
    """How many embedding vectors ``get_image_features``/``get_audio_features`` returned (a tensor,
    a list of tensors, or a model output whose ``pooler_output`` holds them; a count as it is)."""
    if isinstance(feats, int):
        return feats
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    elif hasattr(feats, "last_hidden_state") and not isinstance(feats, torch.Tensor):
        feats = feats.last_hidden_state
    if isinstance(feats, torch.Tensor):
        return feats.numel() // feats.shape[-1]
    if isinstance(feats, (list, tuple)):
        return sum(_feature_count(f) for f in feats)
    raise TypeError(f"features of type {type(feats).__name__}")


def _with_image_tokens(model: nn.Module, out: dict[str, Any], batch: int, gen: torch.Generator) -> bool:
    """Image inputs for a vision-language model, with as many image tokens in ``input_ids`` as the
    vision tower yields features, so that the vision tower is in the traced forward. Without
    ``get_image_features`` the count is the config's (``latent_query_num``...) or that of a submodule's
    ``get_image_features`` (a task head over a VLM), and the forward must accept the result; placeholders
    without a token id of their own are marked by the forward's image position mask (Kosmos-2). Leaves
    ``out`` as it is when no candidate layout works; whether it changed."""
    cfg = model.config
    tok = _token_id(cfg, "image")
    get = getattr(model, "get_image_features", None)
    check = get is None
    if get is None:
        per = next((v for v in (getattr(cfg, k, None) for k in _IMAGE_TOKEN_COUNTS)
                    if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
        get = (lambda **_: per * batch) if per is not None else next(  # else a task head's base model's
            (m.get_image_features for m in model.modules() if callable(getattr(m, "get_image_features", None))),
            None)  # (ModernVBERT's masked LM), the forward checked
    mask = _image_position_mask(inspect.signature(model.forward).parameters)
    extra = _second_resolution(model, batch, gen)
    cands = ({**c, **extra} for c in _image_inputs(model, batch, gen))
    if not _with_modality_tokens(model, out, batch, "image", get, cands,
                                 check_forward=check, mask=mask if tok is None else None):
        return False
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        out["mm_token_type_ids"] = (out["input_ids"] == tok).long()  # Qwen-VL's M-RoPE: 1 = image
    return True


def _with_rope_positions(model: nn.Module, out: dict[str, Any]) -> None:
    """Multimodal RoPE positions (Qwen-VL's M-RoPE, GLM-4V), computed here in eager mode and passed
    as ``position_ids``: the forward would compute them from the image grid's values with Python
    control flow that export cannot trace. Kept only if the forward accepts them."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return
    owner = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if owner is None:
        return
    accepts = inspect.signature(owner.get_rope_index).parameters
    try:
        with torch.no_grad():
            res = owner.get_rope_index(**{k: v for k, v in out.items() if k in accepts})
            trial = {**out, "position_ids": res[0] if isinstance(res, tuple) else res}
            model(**trial)
    except Exception:  # noqa: BLE001 - the forward computes them itself, as before
        return
    out.update(trial)


# transformers' helpers that compute from the inputs' values (data-dependent sizes) and take their results
# precomputed from the forward's keyword arguments (``kwargs.pop(name)``), with where they are defined and
# the prefixes the forward accepts them with (``accepts_precomputed_kwargs`` strips the modality's):
# the vision helpers (``transformers.vision_utils``: from the image grid) and the audio towers' own (Qwen-Omni:
# from the frame counts, chunking the frames and packing the chunks)
_VISION_PRECOMPUTED = {"get_vision_interpolation_indices_and_weights": ("interp_indices", "interp_weights"),
                       "get_vision_attention_seqlens": ("cu_seqlens", "max_seqlen")}
_AUDIO_PRECOMPUTED = {"chunk_and_pad_features": ("padded_feature", "chunk_lengths"),
                      "get_valid_indices": ("valid_indices",), "get_pool_indices": ("pool_indices",),
                      "get_audio_cu_seqlens": ("cu_seqlens",)}
_PRECOMPUTED = {"image": (_VISION_PRECOMPUTED, {"transformers.vision_utils"}, ("", "image_")),
                "audio": (_AUDIO_PRECOMPUTED, None, ("audio_",))}


def modeling_helpers(model: nn.Module, names: Collection[str], origins: Collection[str] | None = None) -> list:
    """``(namespace, name, function)`` for each helper ``name`` that the model's modeling modules hold,
    defined in one of ``origins`` (module names; default: those modeling modules themselves)."""
    import sys

    modules = {type(m).__module__ for m in model.modules()}
    origins = modules if origins is None else set(origins)
    spaces = [vars(mod) for name in modules if (mod := sys.modules.get(name)) is not None]
    return [(space, name, fn) for space in spaces for name in names
            if callable(fn := space.get(name)) and getattr(fn, "__module__", None) in origins]


@contextlib.contextmanager
def recorded(found: list) -> Iterator[dict[str, list]]:
    """The helpers ``found`` (``modeling_helpers``) wrapped for the block so that each call's result is
    recorded; yields ``name -> results in call order``; the helpers are restored afterwards."""
    calls: dict[str, list] = {}

    def recorder(name: str, fn: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            res = fn(*args, **kwargs)
            calls.setdefault(name, []).append(res)
            return res
        return record

    try:
        for space, name, fn in found:
            space[name] = recorder(name, fn)
        yield calls
    finally:
        for space, name, fn in found:
            space[name] = fn


def _with_precomputed(model: nn.Module, out: dict[str, Any], modality: str = "image") -> None:
    """The results of transformers' helpers of a modality (``_PRECOMPUTED``), computed here in eager mode
    by the model's own calls (recorded in one forward) and passed as the keyword arguments they accept
    precomputed: the helpers derive sizes from the inputs' values, which export cannot trace. Kept only
    if the forward accepts them and gives the same outputs; a helper called more than once is left to
    the forward."""
    table, origins, prefixes = _PRECOMPUTED[modality]
    found = modeling_helpers(model, table, origins)
    if not found:
        return
    try:
        with recorded(found) as calls, torch.no_grad():
            want = model(**out)
    except Exception:  # noqa: BLE001 - the forward does not run with these inputs: nothing to add
        return
    extra = {}
    for name, results in calls.items():
        if len(results) == 1:
            vals = results[0] if isinstance(results[0], tuple) else (results[0],)
            extra.update({k: v for k, v in zip(table[name], vals) if v is not None})
    if not extra:
        return
    # under the modality's prefixes in turn, which transformers' ``accepts_precomputed_kwargs`` strips for the
    # tower (Qwen3.5's vision tower takes ``image_cu_seqlens``: an unprefixed one also reaches its linear attention)
    for names in ({f"{p}{k}": v for k, v in extra.items()} for p in prefixes):
        try:
            with recorded(found) as again, torch.no_grad():
                got = model(**out, **names)
        except Exception:  # noqa: BLE001 - the forward does not take them
            continue
        taken = {id(v) for results in again.values() for r in results for v in (r if isinstance(r, tuple) else (r,))}
        if (any(id(v) in taken for v in names.values())  # a helper returned one: not left unread in **kwargs
                and _same_outputs(want, got, unknown=True)):  # on meta: the model's own results for these inputs
            out.update(names)
            return


def _same_outputs(a: Any, b: Any, unknown: bool) -> bool:
    """Whether two forwards' outputs hold equal tensors (leaves of torch's pytree of the outputs);
    ``unknown`` where equal shapes hold no values to compare (a model on the meta device)."""
    from torch.utils._pytree import tree_leaves  # noqa: PLC2701 - torch's pytree API

    xs, ys = ([t for t in tree_leaves(o) if isinstance(t, torch.Tensor)] for o in (a, b))
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return False
    if any(x.is_meta or y.is_meta for x, y in zip(xs, ys)):
        return unknown
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def _audio_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate audio inputs of an audio-language model, most common layout first: log-mel frames
    ``(batch, mels, frames)`` (Whisper-style towers want ``2 * max_source_positions`` frames), then
    frames first ``(batch, frames, dim)`` (conformer towers: ``input_dim``, stacked frames' ``input_size``);
    each with an all-ones frame mask where the forward takes one, then without it."""
    cfg = model.config
    acfg = getattr(cfg, "audio_config", None) or getattr(cfg, "encoder_config", None) or cfg
    mels = getattr(acfg, "num_mel_bins", None) or getattr(acfg, "feature_size", None) or 128
    dims = [d for d in (getattr(acfg, "input_dim", None), getattr(acfg, "input_size", None), mels)
            if isinstance(d, int) and not isinstance(d, bool) and d > 0]
    params = inspect.signature(model.forward).parameters
    mask = next((m for m in ("input_features_mask", "feature_attention_mask") if m in params), None)
    dev, dtype = model_device(model), model_dtype(model)
    for frames in dict.fromkeys([2 * (getattr(acfg, "max_source_positions", 0) or 0), 64, 400, 3000]):
        if not frames:
            continue
        shapes = [(batch, mels, frames)] + [(batch, frames, d) for d in dict.fromkeys(dims)]
        for shape in shapes:
            feats = torch.randn(*shape, generator=gen).to(dev, dtype)
            if mask is not None:
                yield {"input_features": feats, mask: torch.ones(batch, frames, dtype=torch.long, device=dev)}
            yield {"input_features": feats}


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


# a candidate input's marker (popped before use): all its placeholders go in the first sample's text, the
# other samples get plain text instead (one NaViT-packed image for the whole batch)
_FIRST_SAMPLE_ONLY = "__first_sample_only__"
_FORWARD_TRIALS = 4  # candidate audio inputs run through the whole forward before giving up


def _with_modality_tokens(model: nn.Module, out: dict[str, Any], batch: int, kind: str, get: Any,
                          candidates: Iterator[dict[str, Any]], check_forward: bool = False,
                          mask: str | None = None, keep: set[int] = frozenset()) -> bool:
    """The first candidate input whose features ``get`` computes, with that many ``kind`` tokens
    per sample spliced into ``input_ids`` (other special tokens in the random text replaced);
    with ``mask``, plain text tokens there instead, marked 1 in the forward's input ``mask``;
    with ``check_forward``, the first whose result the model's forward accepts (at most
    ``_FORWARD_TRIALS`` forwards run). Token ids in ``keep`` (placeholders of a modality spliced in
    before) stay where they are. Whether ``out`` changed."""
    if get is None:
        return False
    cfg = model.config
    tok = _token_id(cfg, kind)
    if tok is None and mask is None:
        return False
    accepts = inspect.signature(get).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
    tried = 0
    for cand in candidates:
        first_only = bool(cand.pop(_FIRST_SAMPLE_ONLY, False))
        try:
            with torch.no_grad():
                n = _feature_count(get(**{k: v for k, v in cand.items() if takes_all or k in accepts}))
        except Exception:  # noqa: BLE001 - this layout does not fit the model: try the next
            continue
        if n % batch and not first_only:
            continue
        text = out["input_ids"]
        special = {v for k, v in vars(cfg).items() if isinstance(v, int) and not isinstance(v, bool)
                   and (k.endswith("token_id") or k.endswith("token_index")) and k != "pad_token_id"} - set(keep)
        safe = next(i for i in range(int(text.max()) + len(special) + len(keep) + 2)
                    if i not in special and i not in keep)
        text = torch.where(torch.isin(text, torch.tensor(sorted(special), dtype=text.dtype, device=text.device)),
                           safe, text)
        per = n if first_only else n // batch
        placeholders = torch.full((batch, per), safe if tok is None else tok, dtype=text.dtype, device=text.device)
        if first_only:  # the other samples: plain text where the first has the placeholders
            placeholders[1:] = safe
        trial = {**out, "input_ids": torch.cat([text[:, :1], placeholders, text[:, 1:]], dim=1), **cand}
        if mask is not None:
            marks = torch.zeros(trial["input_ids"].shape, dtype=torch.long, device=text.device)
            marks[:1 if first_only else batch, 1:1 + per] = 1
            trial[mask] = marks
        if check_forward:  # audio towers differ in layout and in how they count tokens: keep what the
            try:  # forward accepts
                with torch.no_grad():
                    model(**trial)
            except Exception:  # noqa: BLE001 - the next candidate; text-only inputs if none works
                tried += 1
                if tried >= _FORWARD_TRIALS:
                    return False
                continue
        out.update(trial)
        return True
    return False


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional arguments or a dict of keyword "
                     f"arguments, not {type(example_inputs).__name__}")


def resolve_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return split_inputs(default_example_inputs(model))
    args, kwargs = split_inputs(example_inputs)
    if is_transformers_model(model):
        params = inspect.signature(model.forward).parameters
        for flag in _OFF_WHILE_TRACING:
            if flag in params:
                kwargs.setdefault(flag, False)
    return args, kwargs
