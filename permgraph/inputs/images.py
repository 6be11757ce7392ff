"""Images as a vision tower reads them: of the vision config's size, patchified (NaFlex, Gemma 4),
Pix2Struct's flattened patches, Qwen-VL's grid patches, NaViT-packed images, video clips."""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.model import _first_that_runs, _required, model_device, model_dtype
from permgraph.inputs.precomputed import _with_precomputed


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
        out = _first_that_runs(model, chain([  # size), or a pair of images per sample (LightGlue); then larger
            {"pixel_values": x, **{k: torch.randn_like(x) for k in others}},  # images (_larger_images)
            *([{"pixel_values": halves, **{k: torch.randn_like(halves) for k in others}}] if others else []),
            {"pixel_values": torch.stack([x, torch.randn_like(x)], 1)}], _larger_images(vcfg, x, gen)))
    if not placed and ("spatial_shapes" in params and "pixel_attention_mask" in params  # NaFlex (SigLIP 2)
                       or "pixel_position_ids" in params):  # patches with their positions (Gemma 4's tower)
        out.update(_patchified(vcfg, batch, gen, dev, dtype, params))
    return out


# the sides of the larger images tried where a config that gives no image size fails on the 32-pixel ones: at
# most three times that side, so the traced graphs stay small
_LARGER_SIDES = (64, 96)


def _larger_images(vcfg: Any, x: torch.Tensor, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Images of ``_LARGER_SIDES`` pixels a side, like ``x``, where the vision config gives no image size
    (``x`` is the 32-pixel default): a convolutional model that downsamples 32 times then pools or pads
    its last maps needs a few pixels left there (a text-line recognizer's 3 x 2 pooling: PP-OCR's; a
    reflect padding of 2: UVDoc's). Drawn from a generator of their own, so the inputs derived after them
    (NaFlex patches) stay as they were."""
    if getattr(vcfg, "image_size", None) or getattr(vcfg, "crop_size", None):
        return
    own = torch.Generator().manual_seed(gen.initial_seed() + 1)
    for side in _LARGER_SIDES:
        yield {"pixel_values": torch.randn(*x.shape[:-2], side, side, generator=own).to(x.device, x.dtype)}


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
# a vision-language model's parameter that holds its images' grids: (temporal, height, width) as Qwen-VL's, or
# (height, width) (Nemotron-H Omni's ``image_grid_hw``)
_VLM_GRID_PARAMS = ("image_grid_thw", "image_grid_hw")


def _merge_size(cfg: Any, vcfg: Any) -> int:
    """The side of the window of patches the tower merges into one token: the vision config's
    ``spatial_merge_size``, ``merge_kernel_size`` or ``merge_size`` (Muse's), else the inverse of the
    config's pixel-shuffle ``downsample_ratio`` (Nemotron-H Omni's 0.5), else 1."""
    merge = next((m for m in (getattr(vcfg, k, None) for k in ("spatial_merge_size", "merge_kernel_size",
                                                                  "merge_size")) if m), None)
    if merge is None:
        ratio = getattr(cfg, "downsample_ratio", None)
        merge = round(1 / ratio) if isinstance(ratio, float) and 0 < ratio < 1 else 1
    return merge if isinstance(merge, int) else merge[0]


def _grid_patches(model: nn.Module, batch: int, gen: torch.Generator, grid: str = "image_grid_thw",
                  pixels: str = "pixel_values") -> Iterator[dict[str, Any]]:
    """Candidate flattened patches in Qwen-VL's layout: ``batch`` images of ``s x s`` patches (``s`` two
    merge windows) as rows ``(batch * s^2, C * T * P * P)``, ``T`` the config's temporal patch (then 2, 1),
    or ``(batch * s^2, C, P, P)`` where the patch embedding takes them unflattened (Kimi-K2.5); ``grid`` is
    ``[[1, s, s]] * batch`` (``[[s, s]] * batch`` for a ``..._hw`` grid), and ``merge_sizes``
    (``image_merge_sizes``) ``[merge] * batch`` where the forward takes it (VideoLLaMA 3). Last, a ``thw``
    grid counted in merged tokens ``[[1, 2, 2]] * batch`` with one row of pixels per token,
    ``(batch * 4, M * P, M * P, C)`` channels last (Inkling 2)."""
    vcfg = _vision_config(model.config)
    dev, dtype = model_device(model), model_dtype(model)
    patch = _patch_size(vcfg, 14)
    ch = getattr(vcfg, "in_channels", None) or getattr(vcfg, "num_channels", None) or 3
    merge = _merge_size(model.config, vcfg)
    side = 2 * merge
    n = batch * side * side
    rows = [[side, side]] if grid.endswith("_hw") else [[1, side, side]]
    extra = {grid: torch.tensor(rows * batch, device=dev)}
    params = inspect.signature(model.forward).parameters
    for name in ("merge_sizes", "image_merge_sizes"):  # VideoLLaMA 3's tower, its VLM
        if name in params:
            extra[name] = torch.tensor([merge] * batch, device=dev)
    shapes = [(n, ch * tp * patch * patch) for tp in dict.fromkeys((getattr(vcfg, "temporal_patch_size", None) or 1,
                                                                     2, 1))]
    for shape in (*shapes, (n, ch, patch, patch)):
        yield {pixels: torch.randn(*shape, generator=gen).to(dev, dtype), **extra}
    if not grid.endswith("_hw") and merge > 1:
        yield {pixels: torch.randn(batch * 4, merge * patch, merge * patch, ch, generator=gen).to(dev, dtype),
               grid: torch.tensor([[1, 2, 2]] * batch, device=dev)}


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
