"""Example inputs derived from a transformers model's config (no tokenizer or hub): text, then the
modalities, the main input when it is neither, and the inputs the parts left out read."""
from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.errors import TraceError
from permgraph.inputs.audio import _audio_mel, _raw_audio, _spectrogram, _with_audio
from permgraph.inputs.images import (
    _flattened_patches,
    _plain_images,
    _tower_grid_patches,
    _video_clips,
    _with_images_attended,
)
from permgraph.inputs.model import (
    _OFF_WHILE_TRACING,
    _first_that_runs,
    _required,
    _text_vocab,
    _token_id,
    is_transformers_model,
    model_device,
    nested_configs,
    tracing_flags,
)
from permgraph.inputs.precomputed import _with_precomputed
from permgraph.inputs.series import _action_chunk, _latents, _past_values, _trajectory
from permgraph.inputs.text import (
    _decoder_ids,
    _embeddings,
    _required_token_streams,
    _task_prompt,
    _with_boxes,
    _with_codebook_columns,
    _with_encoder_states,
    _with_entity_stream,
    _with_global_attention,
    _with_required_embeds,
    _with_second_token_streams,
    _with_sized_features,
)
from permgraph.inputs.vision import (
    _image_position_mask,
    _with_image_tokens,
    _with_rope_positions,
    _with_videos,
    _with_wrapped_vlm_images,
)

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
    # the main input's name, or the first of several (OneFormer's images and task prompt)
    mains = model.main_input_name if isinstance(model.main_input_name, (list, tuple)) else [model.main_input_name]
    main = mains[0]

    # token ids where the forward reads text: a vision-main model (Kosmos-2, BLIP) too when its config
    # has a text vocabulary (plain vision models' forwards take no input_ids)
    # (a text tower that inherits a vision model's main input name but takes no images: SAM 3's)
    if "input_ids" in params and (main != "pixel_values" or _text_vocab(cfg) is not None
                                  or "pixel_values" not in params):
        vocab = _text_vocab(cfg) or getattr(cfg, "vocab_size", None) or _parts_vocab(cfg)
        out["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
        _with_codebook_columns(model, out, gen)  # a column per audio codebook beside the text (Kyutai's)
    # caches off before the probes below run the forward (a hybrid cache fails a forward without attention)
    out.update(tracing_flags(params))
    _required_token_streams(model, out, params, batch, seq, seed)  # before the probes that run the forward
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
    if "flattened_patches" in params and main == "flattened_patches":  # Pix2Struct's encoder
        out["flattened_patches"] = next(_flattened_patches(model, batch, gen))["flattened_patches"]
    # (images the forward takes only as ``image_pixel_values``: Phi-4 multimodal's, derived with their tokens)
    pixels = "pixel_values" in out or "flattened_patches" in params or ("image_pixel_values" in params
                                                                         and "pixel_values" not in params)
    images = pixels and "input_ids" in out and placed and not no_image and _with_image_tokens(model, out, batch, gen)
    if "input_ids" in out and "video" in mods:  # videos: a tower of their own, or the main images
        images = _with_videos(model, out, params, placed, batch, gen) or images
    audio = "audio" in mods and _with_audio(model, out, params, batch, gen, seed)
    if images:  # computed from every placeholder in the text (images, videos, audio)
        _with_rope_positions(model, out)
        _with_precomputed(model, out)
    if audio:
        _with_precomputed(model, out, "audio")
    for name in dict.fromkeys([*mains, *_required(params)]):  # raw audio, clips, ...: the main
        if name in _OTHER_MAIN_INPUTS and name in params and name not in out:  # input, or one the forward
            cands = _OTHER_MAIN_INPUTS[name](model, batch, seq, gen)  # requires beside text (PE Audio's)
            out.update(_first_that_runs(model, ({**out, **c} for c in cands)))
    _main_input_renamed(model, out, params, main, batch, seq, gen)
    _with_wrapped_vlm_images(model, out, mods, batch, gen)  # images of a VLM inside (PI0's), once the main
    # input is there
    if "input_features" in params and main == "input_features":  # spectrogram frames
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
        _with_entity_stream(model, out, batch, seq, seed)
        _with_boxes(model, out, batch, seq, seed)
        _with_global_attention(model, out)
        _with_sized_features(model, out, batch, seed)
    return out


def _main_input_renamed(model: nn.Module, out: dict[str, Any], params: Any, main: str, batch: int, seq: int,
                        gen: torch.Generator) -> None:
    """A forward whose first parameter is not the ``main_input_name`` it declares (VibeVoice's acoustic
    encoder and decoder: ``hidden_states``, declared ``input_values``): the declared input's candidates,
    then a decoder's latents, under the parameter's name; the first the forward runs on is kept, none else."""
    first = next(iter(_required(params)), None)
    if first is None or first in out or main in params:
        return
    cands = ({**out, first: next(iter(c.values()))} for name in dict.fromkeys((main, "latents"))
             if name in _OTHER_MAIN_INPUTS for c in _OTHER_MAIN_INPUTS[name](model, batch, seq, gen))
    out.update(_first_that_runs(model, cands, fallback=False))


def _parts_vocab(cfg: Any) -> int:
    """Token ids' range for a config that declares no vocabulary of its own (nor a text config's): 100, or
    the smallest vocabulary below that of its sub-configs (a text-to-speech model and its vocoder:
    FastSpeech 2 Conformer's ``model_config``, 78 phonemes)."""
    sizes = [v for c in nested_configs(cfg)[1:] if isinstance(v := getattr(c, "vocab_size", None), int)
             and not isinstance(v, bool) and v > 0]
    return min([100, *sizes])


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
                      "states": _trajectory, "latents": _latents,
                      "task_inputs": _task_prompt, "state": _action_chunk}
