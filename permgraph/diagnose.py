"""Why a model could not be traced: the failing call, and what to do about it."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from permgraph.equivalents import eager_attention
from permgraph.inputs import is_transformers_model


def failure_summary(e: Exception) -> str:
    """The error's first line and the user's call that raised it: the one torch names, else the
    innermost frame of the traceback outside torch and permgraph."""
    import traceback

    lines = [ln for ln in str(e).splitlines()]
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    out = f"{type(e).__name__}: {first[:300]}"
    for i, ln in enumerate(lines):
        if "The following call raised this error" in ln:
            call = " | ".join(x.strip() for x in lines[i + 1:i + 3] if x.strip())
            return out + f"\n  failing call: {call}"
    ours = ("/torch/", "/permgraph/", "<frozen", "/contextlib.py")
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if not any(m in fr.filename for m in ours):
            return out + f"\n  failing call: File \"{fr.filename}\", line {fr.lineno}, in {fr.name} | {fr.line}"
    return out


_SAMPLING = ("torch.multinomial(", "torch.randperm(", "torch.randint(", "torch.rand(", "torch.randn(")


def skippable_hint(model: nn.Module, given: dict, e: Exception) -> str | None:
    """For a data-dependent failure inside code that the forward runs only because an optional input
    is missing (ViLT: ``if image_embeds is None: ... self.visual_embed(pixel_values, pixel_mask)``,
    whose position-table sizes come from ``pixel_mask``'s values): the construct, and that input as
    the thing to pass. None where the failure is not of that kind."""
    import linecache
    import re
    import traceback

    if "data-dependent" not in str(e) and "DataDependent" not in type(e).__name__:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    ours = ("/torch/", "/permgraph/", "<frozen", "/contextlib.py")
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not any(m in f.filename for m in ours)]
    inner = next((f for f in reversed(frames) if not f.name.startswith("<")), None)
    for fr in frames:
        lines = linecache.getlines(fr.filename)
        if not lines or not fr.lineno:
            continue
        depth = len(lines[fr.lineno - 1]) - len(lines[fr.lineno - 1].lstrip())
        for ln in reversed(lines[:fr.lineno - 1]):
            if not ln.strip() or len(ln) - len(ln.lstrip()) >= depth:
                continue
            depth = len(ln) - len(ln.lstrip())
            m = re.match(r"\s*if (\w+) is None:", ln)
            if m and m.group(1) in params and given.get(m.group(1)) is None:
                name = m.group(1)
                break
            if ln.lstrip().startswith("def "):
                name = None
                break
        else:
            name = None
        if name is None or inner is None:
            continue
        fn = _enclosing_function(linecache.getlines(inner.filename), inner.lineno)
        samples = [c.rstrip("(") for c in _SAMPLING if c in fn]
        where = f"{inner.filename.rsplit('/', 1)[-1]}:{inner.lineno}"
        return (f"  why: `{inner.name}` ({where}) takes sizes or a loop from the values of its inputs (a "
                "data-dependent shape: torch.export cannot trace it for all inputs)"
                + (f" and samples with {', '.join(samples)} (its outputs differ between calls, so draft "
                   "export cannot reproduce them)" if samples else "")
                + f"; the forward runs it only because `{name}` is not given.\n"
                f"  what to do: pass `{name}` in example_inputs (computed once eagerly, e.g. with the model's "
                f"own `{inner.name}`); the layers that compute it are then left fixed as unused.")
    return None


def sdpa_only_hint(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """For a transformers model whose eager forward runs with SDPA but fails with eager attention: the
    forward runs only on eager SDPA's path that skips a mask attending everywhere, which transformers
    never takes under export (it builds the mask there). Nemotron3's audio encoders with fewer key/value
    heads than query heads: ``v_proj`` has a head per query head, and only SDPA's ``enable_gqa`` (no mask)
    broadcasts key and value heads separately; ``repeat_kv`` repeats both by one factor. None otherwise."""
    if not is_transformers_model(model):
        return None
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the forward fails as it is: not this kind of failure
        return None
    failure = None
    with eager_attention(model) as applies:
        if not applies:
            return None
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - what is reported
            failure = e
    if failure is None:
        return None
    return ("  why: the forward runs eagerly with SDPA attention but fails with transformers' eager attention "
            f"({failure_summary(failure)}): it runs only where eager SDPA skips a mask that attends everywhere; "
            "under torch.export transformers always builds the mask, and attention with a mask takes the path "
            "that fails. The config's attention is one transformers supports on that one path only (e.g. key and "
            "value projections of different head counts: Nemotron3's audio encoders with fewer key/value heads).\n"
            "  what to do: use a config that its eager attention runs (as the checkpoints' do).")


def _enclosing_function(lines: list[str], lineno: int) -> str:
    """The source of the ``def`` around line ``lineno`` (1-based) of ``lines``."""
    start = next((i for i in range(lineno - 1, -1, -1) if lines[i].lstrip().startswith("def ")), 0)
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip()
                and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    return "".join(lines[start:end])
