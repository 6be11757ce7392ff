"""Images and videos for vision-language models, with their placeholder tokens in the text, and the
multimodal RoPE positions computed from them."""
from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.images import (
    _VLM_GRID_PARAMS,
    _flattened_patches,
    _grid_patches,
    _navit_packed,
    _patch_size,
    _patchified,
    _pixel_values,
    _vision_config,
)
from permgraph.inputs.model import _params_run, _token_id, model_device, model_dtype
from permgraph.inputs.placeholders import (
    _FIRST_SAMPLE_ONLY,
    _feature_count,
    _merged_count,
    _named_for,
    _with_modality_tokens,
)


def _image_position_mask(params: Any) -> str | None:
    """The forward's parameter that marks where image embeddings go in the text (Kosmos-2's
    ``image_embeds_position_mask``), for models whose placeholders have no token id of their own."""
    return next((k for k in params if k.startswith("image") and k.endswith("position_mask")), None)


# config fields that hold how many embeddings an image becomes, for models without get_image_features
# (Kosmos-2's resampler queries, ``image_seq_length``)
_IMAGE_TOKEN_COUNTS = ("latent_query_num", "image_seq_length", "num_image_tokens", "mm_tokens_per_image")


def _image_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate image inputs of a vision-language model, most common layout first: one image per
    sample ``(batch, C, S, S)`` (``S`` 32 where the vision config has no image size); anyres tiles with
    ``image_sizes`` (LLaVA-NeXT), as a list, then a tensor; flattened patches with their grid
    (``_VLM_GRID_PARAMS``: Qwen-VL's ``image_grid_thw``); NaViT-packed patches with ``target_sizes``
    (MiniCPM-V); Pix2Struct-layout ``flattened_patches`` (Kosmos-2.5); images per sample; for a model
    without a vision config, 16 patches per image ``(batch, 16, C * P * P)`` (Fuyu embeds them with one
    linear layer), then packed ``(batch * 16, C * P * P)`` (NeoMME); last, where the vision config has a
    ``crop_size``, a global view and one crop with their patch masks (Phi-4 multimodal's HD crops)."""
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
    patch = _patch_size(vcfg)
    grid = next((g for g in _VLM_GRID_PARAMS if g in params), None)
    if grid is not None and patch:
        yield from _grid_patches(model, batch, gen, grid)
        return
    if "target_sizes" in params and patch:  # NaViT packing (MiniCPM-V), its placeholders in the first sample
        yield from ({**c, _FIRST_SAMPLE_ONLY: True} for c in _navit_packed(vcfg, gen, dev, dtype))
        return
    if size is None:  # a NaFlex tower (no image size; SigLIP 2's, behind LFM2-VL's placeholders): its patches
        if "spatial_shapes" in params and "pixel_attention_mask" in params:  # on a grid of num_patches
            yield _patchified(vcfg, batch, gen, dev, dtype, params)
            return
        size = 32  # else the plain images' 32 pixels (no image size in the config: a VQ tokenizer's, Chameleon's
        # and Emu3's, that turns images into codes; Florence-2's DaViT)
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
        pixels = torch.randn(batch, ch, size, size, generator=gen).to(dev, dtype)
        yield {"pixel_values": pixels, "image_sizes": [[size, size]] * batch}
        # a tensor where the forward reads it as one (Apertus 1.5's ``image_sizes.tolist()``: each image
        # tokenized at its own size), the same images (no draw of its own: later candidates' values unchanged)
        yield {"pixel_values": pixels, "image_sizes": torch.tensor([[size, size]] * batch, device=dev)}
    # images per sample (Idefics2/3, SmolVLM: ``(batch, images, C, S, S)``), one each; with the tiles' mask
    yield {"pixel_values": torch.randn(batch, 1, ch, size, size, generator=gen).to(dev, dtype)}
    if "pixel_attention_mask" in params:  # where it marks real tiles ``(batch, tiles)`` (Granite Docling)
        yield {"pixel_values": torch.randn(batch, 1, ch, size, size, generator=gen).to(dev, dtype),
               "pixel_attention_mask": torch.ones(batch, 1, dtype=torch.bool, device=dev)}
    if vcfg is cfg and patch:  # no vision tower of its own, patches embedded as they are (Fuyu): patchified
        yield {"pixel_values": torch.randn(batch, 16, ch * patch * patch, generator=gen).to(dev, dtype)}  # 4 x 4
        # or the batch's patches packed in one list ``(batch * 16, C * P * P)`` (NeoMME's)
        yield {"pixel_values": torch.randn(batch * 16, ch * patch * patch, generator=gen).to(dev, dtype)}
    crop = getattr(vcfg, "crop_size", None)
    mask = next((k for k in ("pixel_attention_mask", "image_attention_mask") if k in params), None)
    if isinstance(crop, int) and crop > 0 and patch and "image_sizes" in params and mask is not None:
        # HD crops (Phi-4 multimodal): a global view and the one crop of an image the crop's size
        # ``(batch, 2, C, crop, crop)``, ``image_sizes`` a tensor ``(batch, 2)`` and each tile's patch mask
        # ``(batch, 2, crop / P, crop / P)`` (all real)
        yield {"pixel_values": torch.randn(batch, 2, ch, crop, crop, generator=gen).to(dev, dtype),
               "image_sizes": torch.tensor([[crop, crop]] * batch, device=dev),
               mask: torch.ones(batch, 2, crop // patch, crop // patch, dtype=torch.long, device=dev)}


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


def _video_inputs(model: nn.Module, batch: int, gen: torch.Generator,
                  pixels: str = "pixel_values_videos") -> Iterator[dict[str, Any]]:
    """Candidate video inputs: ``frames`` images per sample ``(batch, frames, C, S, S)`` in the vision
    config's image layout (Video-LLaVA's ``pixel_values_videos``), as the forward's input ``pixels``."""
    vcfg = _vision_config(model.config)
    ch = getattr(vcfg, "num_channels", None) or 3
    size = getattr(vcfg, "image_size", None)
    size = size if isinstance(size, int) or size is None else size[0]
    if size is None:
        return
    for frames in (2, 1):
        yield {pixels: torch.randn(batch, frames, ch, size, size, generator=gen)
               .to(model_device(model), model_dtype(model))}


def _with_videos(model: nn.Module, out: dict[str, Any], params: Any, placed: bool, batch: int,
                 gen: torch.Generator) -> bool:
    """Videos with their placeholder tokens (``_with_video_tokens``): in ``pixel_values_videos`` where the
    forward takes them, else as the main images ``pixel_values`` of a model whose placeholders are all
    video tokens (none for images: not ``placed``; InstructBLIP Video). Whether ``out`` changed."""
    if "pixel_values_videos" in params:
        return _with_video_tokens(model, out, batch, gen)
    if "pixel_values" in out and not placed and _token_id(model.config, "video") is not None:
        return _with_video_tokens(model, out, batch, gen, pixels="pixel_values")
    return False


def _with_video_tokens(model: nn.Module, out: dict[str, Any], batch: int, gen: torch.Generator,
                       pixels: str = "pixel_values_videos") -> bool:
    """Video inputs with as many video tokens in ``input_ids`` as ``get_video_features`` yields, kept
    only where the forward accepts them and they bring parameters into the forward that the other
    inputs leave out (a video tower of its own: Video-LLaVA); videos read by the image tower add
    nothing to the spec and are left out. Videos that are the forward's main images (``pixels``
    ``pixel_values`` of a model with video placeholders only: InstructBLIP Video) replace the plain
    images wherever the forward accepts them. Whether ``out`` changed."""
    get = next((m.get_video_features for m in model.modules() if callable(getattr(m, "get_video_features", None))),
               None)
    if get is None or _token_id(model.config, "video") is None:
        return False
    trial = dict(out)
    keep = {t for k in ("image", "audio") if (t := _token_id(model.config, k)) is not None}
    if not _with_modality_tokens(model, trial, batch, "video", get, _video_inputs(model, batch, gen, pixels),
                                 check_forward=True, keep=keep):
        return False
    if pixels == "pixel_values_videos":
        try:
            if not _params_run(model, trial) - _params_run(model, out):
                return False
        except Exception:  # noqa: BLE001 - the forward does not run with the inputs as they were: keep them
            return False
    out.update(trial)
    return True


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
            None) or _merged_count(model, out, "image")  # (ModernVBERT's masked LM), else the count its
        # merge reports (Phi-4 multimodal's), the forward checked
    params = inspect.signature(model.forward).parameters
    mask = _image_position_mask(params)
    extra = _second_resolution(model, batch, gen)
    cands = (_named_for(params, "image", {**c, **extra}) for c in _image_inputs(model, batch, gen))
    if not _with_modality_tokens(model, out, batch, "image", get, cands,
                                 check_forward=check, mask=mask if tok is None else None):
        return False
    for key in ("mm_token_type_ids", "moe_mm_token_type_ids"):  # Qwen-VL's M-RoPE; ERNIE 4.5 VL's routing of
        if key in params:  # image tokens to its vision experts (unused without it): 1 = image
            out[key] = (out["input_ids"] == tok).long()
    return True


def _with_wrapped_vlm_images(model: nn.Module, out: dict[str, Any], mods: Collection[str], batch: int,
                             gen: torch.Generator) -> bool:
    """Images for a model around a vision-language model of its own (its config's ``vlm_config``: PI0's
    PaliGemma) whose forward takes images per sample with a mask of the real ones (``pixel_attention_mask``):
    one image per sample ``(batch, 1, C, S, S)`` of the VLM's vision config, the mask all True, and as many of
    the VLM's image tokens before each sample's text as the VLM's ``get_image_features`` gives an image. Kept
    where the forward runs with them, if ``mods`` has images; whether ``out`` changed."""
    params = inspect.signature(model.forward).parameters
    vlm = getattr(model.config, "vlm_config", None) if "image" in mods else None
    tok = _token_id(vlm, "image") if vlm is not None else None
    if tok is None or _token_id(model.config, "image") is not None or "input_ids" not in out \
            or "pixel_attention_mask" not in params or "pixel_values" not in params:
        return False
    get = next((m.get_image_features for m in model.modules()
                if m is not model and callable(getattr(m, "get_image_features", None))), None)
    if get is None:
        return False
    dev, dtype = model_device(model), model_dtype(model)
    images = _pixel_values(_vision_config(vlm), batch, gen).to(dev, dtype)
    try:
        with torch.no_grad():
            per = _feature_count(get(images)) // batch
        text = out["input_ids"]
        text = torch.where(text == tok, 0, text)
        trial = {**out, "input_ids": torch.cat([torch.full((batch, per), tok, dtype=text.dtype, device=text.device),
                                                text], 1),
                 "pixel_values": images.unsqueeze(1),
                 "pixel_attention_mask": torch.ones(batch, 1, dtype=torch.bool, device=dev)}
        with torch.no_grad():
            model(**trial)
    except Exception:  # noqa: BLE001 - not this layout: the inputs stay as they were
        return False
    out.update(trial)
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
