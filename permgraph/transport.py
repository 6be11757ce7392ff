"""Task-vector transport: ``B_ft = B + alpha * pi(A_ft - A)``.

A fine-tune of release A moves onto release B through the alignment of A to B.
Inputs are never modified; the output keeps B's dtypes. Parameters that exist
only in the fine-tune (a new classification head) are carried over, permuted on
their permutable axes (found by compiling the fine-tuned model); the output then
uses the fine-tuned model's parameter names, so it loads into that class.
"""
from __future__ import annotations

import fnmatch
import math
import re
import warnings
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from permgraph.align import ModelLike, apply_alignment, check_compatible, state_of
from permgraph.alignment import Alignment
from permgraph.compiler import compile as compile_spec
from permgraph.errors import InputError, PermgraphWarning
from permgraph.ir import Permutation
from permgraph.permutation import apply_permutation
from permgraph.spec import PermSpec

Alpha = float | Mapping[str, float]


def alpha_for(alpha: Alpha, name: str) -> float:
    """``alpha`` for one parameter: a float, or the first glob pattern that matches (1.0 if none)."""
    if isinstance(alpha, (int, float)):
        return float(alpha)
    for pattern, value in alpha.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(value)
    return 1.0


def check_alpha(alpha: object, names: Sequence[str]) -> Alpha:
    """``alpha`` validated: a finite number, or glob patterns to finite numbers where every
    pattern matches at least one of ``names``; ``InputError`` otherwise."""
    def number(v: object, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"alpha{where} must be a finite number, got {v!r}")
        return float(v)

    if not isinstance(alpha, Mapping):
        return number(alpha, "")
    out = {}
    for pattern, value in alpha.items():
        if not isinstance(pattern, str) or not pattern:
            raise InputError(f"alpha patterns must be non-empty strings, got {pattern!r}")
        out[pattern] = number(value, f" for '{pattern}'")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise InputError(f"alpha pattern '{pattern}' matches no parameter (names look like '{names[0]}')")
    return out


def parse_alpha(text: str) -> Alpha:
    """``"0.5"`` or ``"glob=value,glob=value"`` (commas inside ``[...]`` belong to the glob)."""
    try:
        return float(text)
    except ValueError:
        pass
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]" and depth > 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = {}
    for part in parts:
        pattern, sep, value = part.rpartition("=")
        try:
            out[pattern.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern.strip():
            raise InputError(f"alpha must be a number or 'pattern=value,...', got '{text}' (bad part '{part}')")
    return out


def match_names(base: Sequence[str], finetuned: Sequence[str]) -> dict[str, str]:
    """Fine-tuned name -> base name: equal names, or equal up to one module prefix
    (``bert.encoder...`` vs ``encoder...`` when a task head class wraps the base model)."""
    fset, bset = set(finetuned), set(base)
    if bset <= fset:
        return {n: n for n in base}
    first = next(iter(base))
    for f in finetuned:
        if f.endswith("." + first):
            pre = f[: -len(first)]
            if all(pre + n in fset for n in base):
                return {pre + n: n for n in base}
        if first.endswith("." + f):
            pre = first[: -len(f)]
            if all(n.startswith(pre) and n[len(pre):] in fset for n in base):
                return {n[len(pre):]: n for n in base}
    missing = sorted(bset - fset)[:5]
    raise InputError(f"the fine-tuned model lacks base parameters {missing}: is it a fine-tune of this "
                     "architecture? (names must match, up to one module prefix)")


def transport(base_a: ModelLike, finetuned_a: ModelLike | Sequence[ModelLike], base_b: ModelLike,
              alignment: Alignment | Permutation, *, alpha: Alpha = 1.0, spec: PermSpec | None = None,
              combine: str = "sum", finetuned_spec: PermSpec | None = None, finetuned_inputs=None,
              allow_non_preserving: bool = False) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """``B + alpha * pi(A_ft - A)`` as a new state dict.

    ``alignment``: an ``Alignment`` from ``pg.align`` (its spec is used) or a
    ``Permutation`` together with ``spec``. Several fine-tunes: ``combine="sum"``
    adds their task vectors into one output, ``"each"`` returns one output per
    fine-tune. ``alpha``: a float, or glob patterns to floats (first match wins,
    unmatched parameters use 1.0), e.g. ``{"*.layers.0.*": 0.5, "*": 1.0}``; every
    pattern must match a parameter. An alignment that is not function-preserving
    (flat heads, soft plans) is refused unless ``allow_non_preserving=True``; one over
    untied residual sites (``residual="untied"``) is meant for this and accepted.
    Parameters only the fine-tune has (a new task head) are carried over, permuted;
    extra *layers* are refused. Warns (``PermgraphWarning``) when the fine-tune is
    closer to B than to A: then it is probably a fine-tune of B.
    """
    if isinstance(alignment, Alignment):
        spec = alignment.spec
        move = lambda sd: apply_alignment(alignment, sd, allow_non_preserving=True)  # noqa: E731
    elif isinstance(alignment, Permutation):
        if spec is None:
            raise InputError("transport with a Permutation needs spec=...")
        move = lambda sd: apply_permutation(spec, alignment, sd)  # noqa: E731
    else:
        raise InputError("alignment must be a pg.Alignment or a pg.Permutation (with spec=)")
    if isinstance(alignment, Alignment) and not alignment.carries_task_vectors() and not allow_non_preserving:
        raise InputError("this alignment is not function-preserving (flat heads or soft plans): pi(A) is not "
                         "equivalent to A. Pass allow_non_preserving=True (--allow-non-preserving) to use it anyway")
    if combine not in ("sum", "each"):
        raise InputError("combine must be 'sum' or 'each'")
    many = isinstance(finetuned_a, (list, tuple))
    fts = list(finetuned_a) if many else [finetuned_a]
    sa, sb = state_of(base_a), state_of(base_b)
    alpha = check_alpha(alpha, list(sa))
    all_names = check_transport_inputs(spec, sa, [state_of(ft) for ft in fts], sb)
    outs = []
    for ft, names in zip(fts, all_names):
        sft = state_of(ft)
        tau = {base: wide(sft[f]) - wide(sa[base]) for f, base in names.items() if sa[base].is_floating_point()}
        moved = move(tau)
        extras = {f: v for f, v in sft.items() if f not in names}
        if extras:
            extras = _move_extras(ft, sft, extras, names, spec, alignment, finetuned_spec, finetuned_inputs)
        outs.append((names, moved, extras))
    results = []
    for names, moved, extras in outs if combine == "each" else [_summed(outs)]:
        out: dict[str, torch.Tensor] = {}
        for f, base in names.items():
            b = sb[base]
            if base in moved and b.is_floating_point():
                out[f] = (wide(b) + alpha_for(alpha, base) * moved[base].to(b.device)).to(b.dtype)
            else:
                out[f] = b
        out.update(extras)
        results.append(out)
    return results if combine == "each" and many else results[0]


def wide(x: torch.Tensor) -> torch.Tensor:
    """Arithmetic in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_transport_inputs(spec: PermSpec, sa: Mapping[str, torch.Tensor], fts: Sequence[Mapping[str, torch.Tensor]],
                           sb: Mapping[str, torch.Tensor]) -> list[dict[str, str]]:
    """Every check before any work: shapes against the spec, finite values, matching fine-tunes.

    Returns each fine-tune's name map (fine-tuned name -> base name).
    """
    check_compatible(spec, {"base A": sa, "base B": sb})
    if set(sa) != set(sb):
        diff = sorted(set(sa) ^ set(sb))[:5]
        raise InputError(f"base A and base B have different entries {diff}: different architectures")
    out = []
    for i, sft in enumerate(fts):
        label = f"fine-tune {i}" if len(fts) > 1 else "fine-tune"
        names = match_names(list(sa), list(sft))
        _check_same_shapes(sa, sft, names, label)
        _check_no_extra_layers(sa, sft, names, label)
        _warn_if_closer_to_b(sa, sft, sb, names, label)
        out.append(names)
    return out


def _layer_pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _check_no_extra_layers(sa, sft, names, label) -> None:
    """Fine-tune-only parameters may form a new head, not more copies of the base's layers."""
    base = {_layer_pattern(b) for b in sa}
    extra = [f for f in sft if f not in names]
    layered = [f for f in extra if any(_layer_pattern(f) == p or _layer_pattern(f).endswith("." + p)
                                       or p.endswith("." + _layer_pattern(f)) for p in base)]
    if layered:
        raise InputError(f"{label} has parameters of layers that base A lacks ({sorted(layered)[:3]}): "
                         "a different number of layers? The fine-tune must be of A's architecture")


def _warn_if_closer_to_b(sa, sft, sb, names, label) -> None:
    """``|A_ft - B| < |A_ft - A|``: the task vector would mostly be B - A."""
    to_a = to_b = 0.0
    for f, b in names.items():
        x = sft[f]
        if not x.is_floating_point() or x.is_meta or x.shape != sb[b].shape:
            continue
        x = wide(x)
        to_a += float((x - wide(sa[b].to(x.device))).pow(2).sum())
        to_b += float((x - wide(sb[b].to(x.device))).pow(2).sum())
    if to_b < to_a:
        warnings.warn(f"{label} is closer to base B (distance {to_b ** 0.5:.4g}) than to base A "
                      f"({to_a ** 0.5:.4g}): is it a fine-tune of B rather than of A? Its task vector "
                      "A_ft - A would then be mostly B - A", PermgraphWarning, stacklevel=3)


def _summed(outs):
    names, moved, extras = outs[0]
    total = {k: v.clone() for k, v in moved.items()}
    for other_names, other, other_extras in outs[1:]:
        if other_names != names:
            raise InputError("fine-tunes to sum must share parameter names")
        for k, v in other.items():
            total[k] = total[k] + v
        extras = {**other_extras, **extras}
    return names, total, extras


def _check_same_shapes(sa, sft, names, label) -> None:
    bad = [f"'{f}' {tuple(sft[f].shape)} vs base {tuple(sa[b].shape)}" for f, b in names.items()
           if tuple(sft[f].shape) != tuple(sa[b].shape)]
    if bad:
        raise InputError(f"{label} does not match base A's shapes: " + "; ".join(bad[:5]))
    nonfinite = [f for f, b in names.items() if sft[f].is_floating_point() and not sft[f].is_meta
                 and not bool(torch.isfinite(sft[f]).all())]
    if nonfinite:
        raise InputError(f"{label}: '{nonfinite[0]}' contains NaN or inf")


def _move_extras(ft, sft, extras, names, spec, alignment, finetuned_spec, finetuned_inputs):
    """Permute parameters that only the fine-tune has, with groups matched through shared members."""
    if isinstance(alignment, Alignment) and alignment.soft:
        raise InputError("soft transport plans cannot carry fine-tune-only parameters; use a hard solver")
    if finetuned_spec is None:
        if not isinstance(ft, nn.Module):
            raise InputError(f"the fine-tune has parameters the base lacks ({sorted(extras)[:3]}); pass the "
                             "fine-tuned model as a module, or finetuned_spec=pg.compile(finetuned_model)")
        finetuned_spec = compile_spec(ft, finetuned_inputs)
    perm = alignment.permutation if isinstance(alignment, Alignment) else alignment
    base_members = {(names.get(m.param, m.param), m.axis): g for g in spec.groups for m in spec.members(g)}
    ft_perm = {}
    for g in finetuned_spec.groups:
        match = next((base_members[(names[m.param], m.axis)] for m in finetuned_spec.members(g)
                      if m.param in names and (names[m.param], m.axis) in base_members), None)
        if match is not None and spec.perm_shape(match) == finetuned_spec.perm_shape(g):
            ft_perm[g] = perm[match]
        else:  # a group only the fine-tune has: any permutation is valid; keep its order
            ft_perm[g] = finetuned_spec.identity()[g]
    return apply_permutation(finetuned_spec, Permutation(ft_perm), extras)
