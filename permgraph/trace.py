"""Tracing a model into an exported graph (torch.export: non-strict, strict, then draft)."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from permgraph.errors import TraceError
from permgraph.infer.engine import GraphInput
from permgraph.inputs import ExampleInputs, is_transformers_model, resolve_inputs


@dataclass
class Traced:
    graph: Any  # torch.fx.Graph
    inputs: dict[str, GraphInput]
    param_shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    output_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    exported: Any = None  # torch.export.ExportedProgram
    example: tuple[tuple, dict] = ((), {})  # the (args, kwargs) it was traced with


def trace(model: nn.Module, example_inputs: ExampleInputs = None) -> Traced:
    """Export ``model`` (eval, no grad): a transformers MoE first with its experts switched to
    ``batched_mm`` (the same function; the eager experts loop over ``torch.where``, the grouped ones
    sort tokens by expert into an opaque grouped matmul); then non-strict, then strict, then with
    eager attention (``info["attention"]``: SDPA reads per-image chunk lengths); last
    ``draft_export``, which runs the example inputs for real to get past data-dependent guards (an
    image grid's values deciding a loop): its graph is specialised to the decisions those values
    take, so it is kept only if it reproduces the model's outputs on them (``info["draft"]``). Before the draft, a
    transformers model given no ``attention_mask`` is tried with an all-ones one (``info["inputs"]``).
    The model is left as it was (mode, cache flags, experts implementation)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = resolve_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    errors = []
    caches = _cache_off(model)
    info: dict[str, Any] = {}
    converted: list[str] = []
    try:
        ep = None
        masked = with_all_ones_mask(model, kwargs) if is_transformers_model(model) else None

        def replayed(m: nn.Module):
            return _replayed_helpers(m, args, kwargs)

        for strict, setup, kw in ((False, _batched_experts, kwargs), (False, None, kwargs), (True, None, kwargs),
                                  (False, _eager_attention, kwargs), (False, None, masked),
                                  (False, _dense_experts, kwargs), (False, _dense_experts, masked),
                                  (False, replayed, kwargs)):
            if kw is None:
                continue
            printed = io.StringIO()  # torch prints the partial graph of a failed export to stderr
            with setup(model) if setup else contextlib.nullcontext(True) as applies:
                if not applies:
                    continue
                try:
                    with torch.no_grad(), contextlib.redirect_stderr(printed), quiet_export_logs():
                        ep = _export(model, args, kw, strict, converted)
                except Exception as e:  # noqa: BLE001 - any tracing failure is reported below
                    errors.append(e)
                    continue
            if setup is replayed and not _reproduces(ep, model, args, kw):  # the model's own helpers again
                errors.append(TraceError(f"the graph with {applies} as recorded does not give the model's outputs "
                                         "on the example inputs"))
                ep = None
                continue
            sys.stderr.write(printed.getvalue())
            if setup is _eager_attention:
                info["attention"] = ("traced with eager attention, the same function as the model's "
                                     f"{applies!r} attention (whose per-image chunks have data-dependent sizes)")
            elif setup is replayed:
                info["specialised"] = (f"traced with {applies} as recorded in one eager forward on the example "
                                       "inputs (constants of the graph: the helpers compute sizes from the inputs' "
                                       "values with Python loops), and eager attention; kept because the graph gives "
                                       "the model's outputs on them: the spec holds for inputs whose helpers give the "
                                       "same results")
            elif setup is _dense_experts:
                info["experts"] = (f"traced with dense experts ({applies}): every expert on every token, weighted by "
                                   "its routing weight (zero where not routed), the same function as the eager loop "
                                   "over the experts hit (data-dependent)")
            elif setup:
                info["experts"] = ("traced with transformers' batched_mm experts, the same function as the model's "
                                   f"{model.config._experts_implementation!r} experts (whose grouped or looped "
                                   "routing has no rule or data-dependent shapes)")
            if kw is masked:
                kwargs = masked
                info["inputs"] = "traced with an all-ones attention_mask (the model builds none while exported)"
            break
        if ep is None:
            strict = False
            ep, info["draft"] = _draft_export(model, args, kwargs)
            if ep is None:
                hint = next((h for e in errors if (h := _skippable_hint(model, kwargs, e))), None) \
                    or _sdpa_only_hint(model, args, kwargs)
                raise TraceError(
                    f"torch.export could not trace {type(model).__name__} (non-strict, strict and draft all "
                    f"failed).\n  {_failure_summary(errors[0])}\n" + (hint or
                    "  what to try: check that example_inputs match forward()'s signature; remove "
                    "data-dependent Python control flow or make it static; for transformers models try "
                    "attn_implementation='sdpa' or 'eager'.")) from errors[0]
    finally:
        model.train(was_training)
        for cfg, old in caches:
            cfg.use_cache = old
    if converted:
        info["converted"] = ("converted as its forward does on every call, before tracing (a conversion of "
                             "real parameters cannot be exported): " + "; ".join(converted))
    traced = _collect(model, ep, strict)
    traced.info.update(info)
    traced.example = (args, kwargs)
    return traced


def with_all_ones_mask(model: nn.Module, kwargs: dict) -> dict | None:
    """The inputs plus an all-ones ``attention_mask``, what a transformers model assumes when it gets
    none: some build that default only outside ``torch.compile``/export (LongT5's block split then
    reads a None mask)."""
    ids = kwargs.get("input_ids")
    if (not isinstance(ids, torch.Tensor) or kwargs.get("attention_mask") is not None
            or "attention_mask" not in inspect.signature(model.forward).parameters):
        return None
    return {**kwargs, "attention_mask": torch.ones_like(ids)}


@contextlib.contextmanager
def _switched(model: nn.Module, kind: str, value: str, can: Any):
    """A transformers model's ``kind`` implementation ("attn", "experts") switched to ``value`` for
    the block (``model.set_<kind>_implementation``) when ``can(model)``; yields the one it replaced,
    or False when it does not apply. Every (sub)config is restored as it was: a composite model may
    mix implementations."""
    attr = f"_{kind}_implementation"
    old = getattr(getattr(model, "config", None), attr, None)
    switch = getattr(model, f"set{attr}", None)
    if old in (None, value) or switch is None or not can(model):
        yield False
        return
    configs = {id(c): (c, getattr(c, attr)) for m in model.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, attr + "_internal")}
    try:
        switch(value)
    except Exception:  # noqa: BLE001 - not supported by this model
        yield False
        return
    try:
        yield old if getattr(model.config, attr) == value else False
    finally:
        for c, v in configs.values():
            setattr(c, attr + "_internal", v)


def _batched_experts(model: nn.Module):
    """A transformers MoE's experts (eager, grouped_mm, ...) as ``batched_mm`` for the block."""
    can = getattr(model, "_can_set_experts_implementation", None)
    return _switched(model, "experts", "batched_mm", lambda m: callable(can) and can() and any(
        "has_gate" in vars(e) and "is_concatenated" in vars(e) for e in m.modules()))  # experts present


class _ConvertsItself(Exception):
    """Raised from ``Module.to`` inside an export when the call would convert real parameters."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        super().__init__(f"{type(module).__name__}.to{args!r} inside forward")
        self.module, self.args, self.kwargs = module, args, kwargs


def _export(model: nn.Module, args: tuple, kwargs: dict, strict: bool, converted: list[str]):
    """``torch.export.export`` under ``_unchanged_to``. A forward that converts a submodule of its own
    (Switch Transformers' router: ``self.classifier = self.classifier.to(float32)`` on every call)
    has the conversion done first, as the model's first call would (``converted`` says which); under
    export it would swap fake parameters and fail. Once converted, the call is a no-op."""
    names = {id(m): n for n, m in model.named_modules()}
    for _ in range(64):
        try:
            with _unchanged_to():
                return torch.export.export(model, args, kwargs, strict=strict)
        except _ConvertsItself as e:
            e.module.to(*e.args, **e.kwargs)
            converted.append(f"{names.get(id(e.module), type(e.module).__name__) or 'model'}.to"
                             f"({', '.join(map(str, e.args))})")
    raise TraceError("the forward converts its own modules again on every call; cannot trace it")


@contextlib.contextmanager
def _unchanged_to():
    """``Module.to`` that returns the module when nothing would change, and raises
    ``_ConvertsItself`` when something would (real parameters cannot be converted under export)."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if memory_format is None and all(
                (device is None or t.device == torch.device(device))
                and (dtype is None or t.dtype == dtype or not (t.is_floating_point() or t.is_complex()))
                for t in tensors):
            return self
        raise _ConvertsItself(self, args, kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def _looped_experts(m: nn.Module) -> str | None:
    """Which of transformers' eager expert loops ``m`` runs (``for expert in nonzero(hit): ...
    index_add_``, data-dependent sizes), by its forward's parameters and its weights: "bank" (stacked
    ``gate_up_proj (E', 2I, H)``, ``down_proj (E, H, I)``, top-k indices and weights; ids past the
    banks are zero-compute identity experts where the module declares ``zero_expert_num``), "glu"
    (DBRX: ``mlp.w1``, ``mlp.v1``, ``mlp.w2`` flat ``(E * I, H)``), "dict" (``expert_0 ... expert_{E-1}``
    modules and a ``(tokens, 1, E)`` dispatch mask); else None."""
    forward = getattr(type(m), "forward", None)
    try:
        source = inspect.getsource(forward)
        names = list(inspect.signature(forward).parameters)[1:]
    except (OSError, TypeError, ValueError):
        return None
    if "nonzero(" not in source or "index_add_" not in source or "has_gate" in vars(m):
        return None
    if names[:3] == ["hidden_states", "top_k_index", "top_k_weights"] and _glu_bank(m):
        return "glu"
    if names[:3] == ["hidden_states", "top_k_index", "top_k_weights"]:
        gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3
                and gu.shape[0] >= down.shape[0] and gu.shape[1] == 2 * down.shape[2]
                and gu.shape[2] == down.shape[1] and callable(getattr(m, "act_fn", None))):
            return None
        zero = getattr(m, "zero_expert_num", 0) or 0
        total = getattr(m, "total_experts", down.shape[0])
        return "bank" if total == down.shape[0] + zero else None
    if names[:3] == ["hidden_states", "selected_experts", "routing_weights"] and isinstance(m, nn.ModuleDict):
        n = len(m)
        return "dict" if n and all(f"expert_{i}" in m for i in range(n)) else None
    return None


def _dense_bank(self, hidden_states, top_k_index, top_k_weights):
    """The "bank" loop as transformers' batched experts (each token-slot gathers its expert's rows),
    with ids past the banks as identity experts: the same function without data-dependent sizes."""
    n = self.down_proj.shape[0]
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1, 1)
    routed = ids < n
    safe = torch.where(routed, ids, torch.zeros_like(ids))
    x = hidden_states.repeat_interleave(k, dim=0)
    gate, up = torch.bmm(self.gate_up_proj[:n][safe], x.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
    y = torch.bmm(self.down_proj[safe], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
    y = torch.where(routed.unsqueeze(-1), y, x) * weights
    return y.view(hidden_states.shape[0], k, -1).sum(dim=1).to(hidden_states.dtype)


def _glu_bank(m: nn.Module) -> bool:
    """DBRX's experts: ``m.mlp`` holds ``w1``, ``v1``, ``w2``, each ``(E * I, H)`` (expert-major), and
    ``act(x w1_e^T) * (x v1_e^T)) w2_e`` is expert ``e``."""
    mlp = getattr(m, "mlp", None)
    e, i, h = (getattr(m, k, None) for k in ("num_experts", "ffn_hidden_size", "hidden_size"))
    ws = [getattr(mlp, k, None) for k in ("w1", "v1", "w2")]
    return (all(isinstance(v, int) for v in (e, i, h)) and callable(getattr(mlp, "activation_fn", None))
            and all(isinstance(w, torch.Tensor) and tuple(w.shape) == (e * i, h) for w in ws))


def _dense_glu(self, hidden_states, top_k_index, top_k_weights):
    """The "glu" loop (DBRX) as batched experts: each token-slot gathers its expert's rows of the
    three ``(E, I, H)`` views; the same function without data-dependent sizes."""
    shape = (-1, self.ffn_hidden_size, self.hidden_size)
    x = hidden_states.reshape(-1, self.hidden_size)
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)
    w1, v1, w2 = (getattr(self.mlp, n).view(shape)[ids] for n in ("w1", "v1", "w2"))
    h = self.mlp.activation_fn(torch.bmm(w1, xs).squeeze(-1)) * torch.bmm(v1, xs).squeeze(-1)
    y = torch.bmm(h.unsqueeze(1), w2).squeeze(1) * top_k_weights.reshape(-1, 1)
    return y.view(x.shape[0], k, -1).sum(dim=1).view(hidden_states.shape[0], -1, self.hidden_size)


def _dense_dict(self, hidden_states, selected_experts, routing_weights):
    """The "dict" loop densely: every expert on every token, weighted where the mask selects it."""
    out = torch.zeros_like(hidden_states)
    for i in range(len(self)):
        picked = selected_experts[:, :, i] != 0  # (tokens, slots)
        w = torch.where(picked, routing_weights, torch.zeros_like(routing_weights)).sum(dim=1, keepdim=True)
        out = out + (self[f"expert_{i}"](hidden_states) * w).to(hidden_states.dtype)
    return out


@contextlib.contextmanager
def _dense_experts(model: nn.Module):
    """transformers' eager expert loops (``_looped_experts``) computed densely for the block; yields
    the kinds replaced, or False where the model has none."""
    found = [(m, kind) for m in model.modules() if (kind := _looped_experts(m))]
    if not found:
        yield False
        return
    for m, kind in found:
        m.forward = {"bank": _dense_bank, "glu": _dense_glu, "dict": _dense_dict}[kind].__get__(m)
    try:
        yield ", ".join(sorted({f"{type(m).__name__}: {kind}" for m, kind in found}))
    finally:
        for m, _ in found:
            del m.forward


# transformers' helpers that compute sizes from an input's values with Python loops (``cu_seqlens`` of
# Qwen3-ASR's attention windows from the frame mask) and that the forward calls with no way to pass their
# results in (``get_audio_features`` is called without the forward's keyword arguments)
_REPLAYED_HELPERS = ("get_audio_cu_seqlens",)


@contextlib.contextmanager
def _replayed_helpers(model: nn.Module, args: tuple, kwargs: dict):
    """The helpers of ``_REPLAYED_HELPERS`` that the model's modeling modules call, recorded in one eager
    forward on the example inputs and replaced by their results (in call order) for the block, with
    eager attention (SDPA decides ``is_causal`` from each window's length); yields what was replaced, or
    False where no such helper runs. The graph is specialised to those results: the caller keeps it only
    if it gives the model's outputs on the example inputs (``_reproduces``)."""
    names = {type(m).__module__ for m in model.modules()}
    spaces = [vars(mod) for name in names if (mod := sys.modules.get(name)) is not None]
    found = [(space, name, fn) for space in spaces for name in _REPLAYED_HELPERS
             if callable(fn := space.get(name)) and getattr(fn, "__module__", None) in names]
    if not found or not is_transformers_model(model):
        yield False
        return
    calls: dict[str, list] = {}

    def recorder(name: str, fn: Any) -> Any:
        def record(*a: Any, **k: Any) -> Any:
            res = fn(*a, **k)
            calls.setdefault(name, []).append(res)
            return res
        return record

    def replay(name: str) -> Any:
        results = iter(calls[name])

        def again(*_a: Any, **_k: Any) -> Any:
            res = next(results, None)
            if res is None:
                raise TraceError(f"{name} called more often than in the eager forward")
            return res
        return again

    try:
        for space, name, fn in found:
            space[name] = recorder(name, fn)
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the forward does not run on these inputs: nothing to replay
            calls.clear()
        for space, name, fn in found:
            space[name] = replay(name) if name in calls else fn
        if not calls:
            yield False
            return
        with _eager_attention(model):
            yield ", ".join(f"{name} ({len(v)} call{'s' * (len(v) > 1)})" for name, v in sorted(calls.items()))
    finally:
        for space, name, fn in found:
            space[name] = fn


def _reproduces(ep, model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether an exported program gives the model's outputs on the inputs (float tolerance: the graph
    may use another attention implementation, the same function)."""
    try:
        with torch.no_grad():
            got = [t for _, t in named_outputs(ep.module()(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            want = [t for _, t in named_outputs(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 - it does not run: not the model's function
        return False
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True) for a, b in zip(got, want))


def _eager_attention(model: nn.Module):
    """A transformers model's attention as ``eager`` for the block (the same function; SDPA decides
    ``is_causal`` from each chunk's length, data-dependent in a vision tower that attends per image)."""
    return _switched(model, "attn", "eager", is_transformers_model)


def _draft_export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, str | None]:
    """``torch.export.draft_export`` (non-strict, real tensors propagated), kept only if its graph
    gives the model's outputs on the example inputs; ``(program, what it specialised)`` or
    ``(None, None)``."""
    try:
        with torch.no_grad(), quiet_export_logs():
            ep = torch.export.draft_export(model, args, kwargs, strict=False)
            got = [t for _, t in named_outputs(ep.module()(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            want = [t for _, t in named_outputs(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 - the first error is the one to report
        return None, None
    if len(got) != len(want) or not all(
            a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
            for a, b in zip(got, want)):
        return None, None
    report = getattr(ep, "_report", None)
    n = len(getattr(report, "failures", []) or [])
    return ep, (f"traced with torch.export.draft_export: {n} data-dependent decision(s) specialised to the "
                "example inputs' values (the spec holds for inputs that take the same decisions)")


@contextlib.contextmanager
def quiet_export_logs():
    """Silence what torch logs while permgraph tries one way of exporting after another: the
    tracebacks of failed fake-tensor kernels, draft export's report banner, and the warning logged
    each time a size of a draft graph is read from the real tensors (inference reads every size).
    A failure permgraph cannot get past is reported in its own error."""
    quiet = [logging.getLogger(n) for n in ("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes",
                                            "torch._subclasses.fake_tensor")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)


def _cache_off(model: nn.Module) -> list:
    """Turn ``config.use_cache`` off (and in sub-configs and submodules' configs) while tracing: a
    returned KV cache is not a tensor output export can handle. Returns what to restore."""
    cfg = getattr(model, "config", None)
    if cfg is None or not is_transformers_model(model):
        return []
    out = []
    configs = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "use_cache") and hasattr(v, "to_dict")]
    configs += [c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")
                and hasattr(c, "to_dict")]  # a copy of its own (Switch Transformers' decoder)
    for c in {id(c): c for c in configs}.values():
        if getattr(c, "use_cache", False):
            out.append((c, c.use_cache))
            try:
                c.use_cache = False
            except Exception:  # noqa: BLE001 - frozen configs
                out.pop()
    return out


def _failure_summary(e: Exception) -> str:
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


def _skippable_hint(model: nn.Module, given: dict, e: Exception) -> str | None:
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


def _sdpa_only_hint(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
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
    with _eager_attention(model) as applies:
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
            f"({_failure_summary(failure)}): it runs only where eager SDPA skips a mask that attends everywhere; "
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


def _collect(model: nn.Module, ep, strict: bool) -> Traced:
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant"}
    inputs: dict[str, GraphInput] = {}
    state = {n: tuple(b.shape) for n, b in model.named_buffers()
             if b.is_floating_point() and n in model.state_dict(keep_vars=True)}
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        kind = kinds.get(spec.kind, "input")
        if kind == "buffer" and spec.target in state:  # in the state dict: permuted along with parameters
            kind = "state"
        inputs[name] = GraphInput(kind, spec.target if spec.target is not None else name)
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    aliases = {n: names[0] for names in by_id.values() for n in names[1:]}
    for key, inp in inputs.items():  # tied parameters may be lifted once per name
        if inp.kind == "parameter" and inp.name in aliases:
            inputs[key] = GraphInput("parameter", aliases[inp.name])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({i.name: state[i.name] for i in inputs.values() if i.kind == "state"})
    info = {"model": type(model).__name__, "torch": torch.__version__, "strict": strict}
    _drop_dead_code(ep)
    _constant_ranges_as_slices(ep)
    return Traced(ep.graph, inputs, shapes, aliases, _output_names(ep), info, ep)


def _drop_dead_code(ep) -> None:
    """Remove calls whose results nothing uses (BART's ``inputs_embeds[:, :, -1]``, read only for its
    shape): they constrain nothing, and left in they would fix what they index. Calls with side
    effects (in-place writes, asserts) stay (``torch.fx.Node.is_impure``), and so does dead work that
    reads weights (a pooler whose output a task head drops): it keeps those weights moving with
    their layer instead of leaving them fixed as unused."""
    sig = ep.graph_signature
    weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    live: set = set()
    for node in reversed(ep.graph.nodes):
        if node.op in ("placeholder", "output") or any(u in live for u in node.users):
            live.add(node)
            continue
        try:
            if node.is_impure():
                live.add(node)
        except Exception:  # noqa: BLE001 - purity unknown: keep it
            live.add(node)
    reads_weights: set = set()
    for node in reversed(ep.graph.nodes):
        if node not in live and (any(a.name in weights for a in node.all_input_nodes if a.op == "placeholder")
                                 or any(u in reads_weights for u in node.users)):
            reads_weights.add(node)
    dead = [n for n in reversed(ep.graph.nodes) if n not in live and n not in reads_weights]
    for node in dead:
        ep.graph.erase_node(node)
    if dead:
        ep.graph_module.recompile()


_VALUE_KEEPING = ("lift_fresh_copy", "clone", "_to_copy", "to", "alias", "detach")


def _constant_ranges_as_slices(ep) -> None:
    """``x[..., [k, k+1, ...], ...]`` with a constant index of consecutive positions is the slice
    ``x[..., k:k+m, ...]`` (Falcon's multi-query ``fused_qkv[..., [-2], :]``): rewritten so that the
    slice rule keeps the other positions free instead of the index rule fixing the whole axis."""
    from torch.export.graph_signature import InputKind

    consts = {}
    names = {s.arg.name: s.target for s in ep.graph_signature.input_specs
             if s.kind == InputKind.CONSTANT_TENSOR and getattr(s.arg, "name", None)}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names and names[node.name] in ep.constants:
            consts[node] = ep.constants[names[node.name]]
        elif (node.op == "call_function" and node.args and node.args[0] in consts
              and getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in _VALUE_KEEPING):
            consts[node] = consts[node.args[0]]
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.index.Tensor:
            continue
        x, idxs = node.args[0], node.args[1]
        pos = [i for i, v in enumerate(idxs) if v is not None]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if len(pos) != 1 or idxs[pos[0]] not in consts or not isinstance(val, torch.Tensor):
            continue
        dim, idx = pos[0], consts[idxs[pos[0]]]
        try:
            n = int(val.shape[dim])
        except Exception:  # noqa: BLE001 - a size known only at run time
            continue
        if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
            continue
        v = [int(i) % n for i in idx.tolist()]
        if v != list(range(v[0], v[0] + len(v))):
            continue
        with ep.graph.inserting_before(node):
            new = ep.graph.call_function(torch.ops.aten.slice.Tensor, (x, dim, v[0], v[0] + len(v), 1))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
        changed = True
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()


def _path_name(path) -> str:
    parts = []
    for k in path:
        attr = next((a for a in ("key", "idx", "name") if hasattr(k, a)), None)
        parts.append(str(getattr(k, attr)) if attr else str(k))
    return ".".join(parts) or "output"


def named_outputs(out: Any) -> list[tuple[str, Any]]:
    """A model's outputs flattened, with the names ``compile(outputs=...)`` uses."""
    from torch.utils._pytree import tree_flatten_with_path  # noqa: PLC2701 - torch's pytree API

    return [(_path_name(p), x) for p, x in tree_flatten_with_path(out)[0]]


def _output_names(ep) -> list[str]:
    """Names of the flattened outputs: 'logits', '[0]', 'encoder_last_hidden_state', ..."""
    from torch.utils._pytree import tree_unflatten  # noqa: PLC2701 - torch's pytree API

    spec = ep.call_spec.out_spec
    if spec is None:
        return []
    tree = tree_unflatten(list(range(spec.num_leaves)), spec)
    names = [""] * spec.num_leaves
    for name, leaf in named_outputs(tree):
        names[leaf] = name
    return names
