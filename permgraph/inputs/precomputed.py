"""transformers' helpers that compute sizes from the inputs' values (vision grids, audio chunks):
their results recorded in one eager forward and passed precomputed, which export can trace."""
from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.model import _same_outputs

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
