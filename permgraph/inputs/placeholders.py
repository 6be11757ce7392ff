"""A modality's placeholder tokens spliced into ``input_ids``, as many as its features take."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from permgraph.inputs.model import _MODALITY_CONFIGS, _required, _token_id


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


# a candidate input's marker (popped before use): all its placeholders go in the first sample's text, the
# other samples get plain text instead (one NaViT-packed image for the whole batch)
_FIRST_SAMPLE_ONLY = "__first_sample_only__"


_FORWARD_TRIALS = 4  # candidate audio inputs run through the whole forward before giving up


def _named_for(params: Any, kind: str, cand: dict[str, Any]) -> dict[str, Any]:
    """Candidate inputs under the names the forward takes them by: ``<kind>_<name>`` where it takes an
    input only with the modality's prefix (Phi-4 multimodal's ``image_pixel_values``,
    ``audio_input_features``)."""
    return {f"{kind}_{k}" if k not in params and f"{kind}_{k}" in params else k: v for k, v in cand.items()}


class _Counted(Exception):  # noqa: N818 - not an error: how the merge probe stops the forward
    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


# merges of features into embeddings: the names of their positions and features arguments
_MERGES = {"index_put": ("indices", "values"), "index_put_": ("indices", "values"),
           "masked_scatter": ("mask", "source"), "masked_scatter_": ("mask", "source"),
           "__setitem__": ("key", "value")}


def _merge_rows(func: Any, args: tuple, kwargs: dict) -> int | None:
    """The feature rows of a merge into embeddings (``index_put``, ``masked_scatter``, a masked
    assignment) whose features do not match the positions it fills, else None."""
    names = _MERGES.get(getattr(func, "__name__", ""))
    if names is None or not args:
        return None
    dest = args[0]
    index, values = (args[i] if len(args) > i else kwargs.get(k) for i, k in enumerate(names, 1))
    index = index[0] if isinstance(index, (list, tuple)) and index else index  # index_put's first index
    if not (isinstance(dest, torch.Tensor) and isinstance(values, torch.Tensor) and isinstance(index, torch.Tensor)
            and dest.is_floating_point() and dest.dim() >= 2 and values.dim() >= 2
            and values.shape[-1] == dest.shape[-1]):
        return None
    width = dest.shape[-1]
    if index.dtype == torch.bool:  # a mask of the positions (of each entry where it is as wide as ``dest``)
        filled = int(index.sum()) // (width if index.dim() == dest.dim() and index.shape[-1] == width else 1)
    else:  # the positions' indices
        filled = index.numel()
    rows = values.numel() // width
    return rows if rows not in (filled, 1) else None


class _MergeProbe(TorchFunctionMode):
    """Stops the forward at the first merge whose features do not match the positions it fills
    (``_Counted`` with their rows)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rows = _merge_rows(func, args, kwargs)
        if rows is not None:
            raise _Counted(rows)
        return func(*args, **kwargs)


def _merged_count(model: nn.Module, out: dict[str, Any], kind: str) -> Any:
    """How many ``kind`` features the forward merges into the text embeddings for candidate inputs,
    where no helper counts them (Phi-4 multimodal's towers): the forward runs eagerly on ``out`` with
    one ``kind`` placeholder per sample, and the count is the feature rows of the first merge
    (``index_put``, ``masked_scatter``, a masked assignment) that do not match the placeholders it
    fills, or the placeholders where every merge matches. None without a placeholder id or text."""
    tok = _token_id(model.config, kind)
    if tok is None or not isinstance(out.get("input_ids"), torch.Tensor):
        return None

    def count(**cand: Any) -> int:
        text = out["input_ids"]
        text = text.masked_fill(text == tok, 1 if tok == 0 else 0)
        one = torch.full((text.shape[0], 1), tok, dtype=text.dtype, device=text.device)
        ids = torch.cat([text[:, :1], one, text[:, 1:]], dim=1)
        try:
            with torch.no_grad(), _MergeProbe():
                model(**{**out, **cand, "input_ids": ids})
        except _Counted as c:
            return c.rows
        return int((ids == tok).sum())

    return count


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
    # what ``get`` requires beside the modality's own inputs, from the inputs derived so far (InstructBLIP's
    # Q-Former prompt, which its image and video features read)
    given = {k: out[k] for k in _required(accepts) if k in out}
    tried = 0
    for cand in candidates:
        first_only = bool(cand.pop(_FIRST_SAMPLE_ONLY, False))
        try:
            with torch.no_grad():
                n = _feature_count(get(**{**given, **{k: v for k, v in cand.items() if takes_all or k in accepts}}))
        except Exception:  # noqa: BLE001 - this layout does not fit the model: try the next
            continue
        if n % batch and not first_only:
            continue
        text = out["input_ids"]
        special = ({v for k, v in vars(cfg).items() if isinstance(v, int) and not isinstance(v, bool)
                    and (k.endswith("token_id") or k.endswith("token_index")) and k != "pad_token_id"}
                   | {t for k in _MODALITY_CONFIGS if (t := _token_id(cfg, k)) is not None}) - set(keep)
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
