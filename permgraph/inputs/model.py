"""What derived inputs read from a model and how they probe it: its dtype and device, its forward's
required parameters, its config's token ids, vocabulary and sub-configs; running candidate inputs
and keeping those the forward reads."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn


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
# or XLNet's memory (``use_mems``) is state for generation, not an output of the function; ``sample``
# (a flag that defaults to True) draws noise in the forward (VibeVoice's sigma-VAE latents): a random
# function has no symmetry to check
_OFF_WHILE_TRACING = ("use_cache", "use_mems", "sample")


def tracing_flags(params: Any) -> dict[str, bool]:
    """The ``_OFF_WHILE_TRACING`` flags a forward with these parameters takes, each False (``sample``
    only where it is a flag: its default is a bool)."""
    return {k: False for k in _OFF_WHILE_TRACING
            if k in params and (k != "sample" or isinstance(params[k].default, bool))}


def _required(params: Any) -> list[str]:
    """The forward's parameters that have no default (named ones: not ``*args``, ``**kwargs``)."""
    return [k for k, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def nested_configs(cfg: Any) -> list[Any]:
    """A config and its sub-configs at every depth, breadth first."""
    from transformers import PretrainedConfig

    out = [cfg]
    for c in out:  # grows while it is walked
        out += [v for v in vars(c).values() if isinstance(v, PretrainedConfig)]
    return out


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


# the sub-config of a modality's tower, where a config may keep the modality's placeholder id
_MODALITY_CONFIGS = {"image": "vision_config", "video": "vision_config", "audio": "audio_config"}


def _token_id(cfg: Any, kind: str) -> int | None:
    """The placeholder token id of a modality (``image_token_id`` / ``image_token_index``), from the
    config or else from the modality's sub-config (Phi-4 multimodal's ``vision_config.image_token_id``,
    ``audio_config.audio_token_id``)."""
    for c in (cfg, getattr(cfg, _MODALITY_CONFIGS.get(kind, ""), None)):
        for name in (f"{kind}_token_id", f"{kind}_token_index"):
            v = getattr(c, name, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _text_vocab(cfg: Any) -> int | None:
    """The vocabulary of a multimodal config's text part (``text_config.vocab_size``), if it has one."""
    v = getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _first_that_runs(model: nn.Module, candidates: Iterator[dict[str, Any]], fallback: bool = True) -> dict[str, Any]:
    """The first of ``candidates`` the forward runs on by themselves; else the first (the forward may need
    inputs derived after these, an encoder-decoder's ``decoder_input_ids``), or ``{}`` without ``fallback``;
    ``{}`` when there are none."""
    first = None
    for inputs in candidates:
        first = inputs if first is None else first
        try:
            with torch.no_grad():
                model(**inputs)
        except Exception:  # noqa: BLE001 - the next layout
            continue
        return inputs
    return (first or {}) if fallback else {}


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
