"""Tracing a model into an exported graph (torch.export: non-strict, strict, then draft)."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from permgraph.diagnose import failure_summary, sdpa_only_hint, skippable_hint
from permgraph.equivalents import (
    BoolMasksAsIndices,
    ConvertsItself,
    batched_experts,
    cache_off,
    dense_experts,
    distribution_checks_off,
    eager_attention,
    replayed_helpers,
    returned_caches_dropped,
    scalar_buffers_as_literals,
    unchanged_to,
    with_all_ones_mask,
)
from permgraph.errors import TraceError
from permgraph.graph_forms import constant_ranges_as_slices, drop_dead_code, fused_segments_as_splits
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


# the ways ``trace`` tries, in order (``Traced.info["traced_with"]`` names the one that worked)
RUNGS = ("batched experts", "non-strict", "strict", "eager attention", "all-ones mask", "dense experts",
         "dense experts, all-ones mask", "literal buffers", "replayed helpers", "draft", "draft, eager attention")


@dataclass(frozen=True)
class _Rung:
    """One export of the ladder before the draft ones: its name in ``RUNGS``; strict or not; the equivalent
    form set up around it (a context manager factory on the model that yields what it changed, falsy where
    it does not apply); the keyword inputs (None: the rung has none to try); and whether the graph is kept
    only if it gives the model's outputs on the example inputs (forms equal on those inputs only)."""
    name: str
    kwargs: dict | None
    setup: Callable[[nn.Module], Any] | None = None
    strict: bool = False
    checked: bool = False


def trace(model: nn.Module, example_inputs: ExampleInputs = None, *, first: str | None = None) -> Traced:
    """Export ``model`` (eval, no grad, ``torch.distributions``' value checks off), trying in turn
    (``permgraph.equivalents`` for the forms that compute the same function): a transformers MoE with
    ``batched_mm`` experts (``info["experts"]``); non-strict; strict; eager attention
    (``info["attention"]``: SDPA reads per-image chunk lengths); an all-ones ``attention_mask`` where
    none was given (``info["inputs"]``); transformers' looped experts computed densely; integer buffers
    of one element that the state dict does not hold read as literals (``info["constants"]``: sizes
    computed from a stride buffer); helpers that compute sizes from values replayed as recorded in one
    eager forward (``info["specialised"]``); each of the last two kept only if the graph reproduces the
    model's outputs; last ``draft_export``, which runs the example inputs for real to get past
    data-dependent guards, kept on the same condition (``info["draft"]``), then with eager attention
    (first where that changes the model's outputs in eager mode: ``_draft_either_attention``). A failure
    names the construct (``permgraph.diagnose``). The model is left as it was (mode, cache flags,
    experts implementation). ``first``: a rung of ``RUNGS`` tried before the others (``verify``
    retraces with the one ``compile`` found, ``spec.info["traced_with"]``, without the failed tries
    before it)."""
    check_traceable(model)
    args, kwargs = resolve_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    errors = []
    caches = cache_off(model)
    info: dict[str, Any] = {}
    converted: list[str] = []
    try:
        ep = None
        masked = with_all_ones_mask(model, kwargs) if is_transformers_model(model) else None

        def replayed(m: nn.Module):
            return replayed_helpers(m, args, kwargs)

        rungs = [_Rung("batched experts", kwargs, batched_experts), _Rung("non-strict", kwargs),
                 _Rung("strict", kwargs, strict=True), _Rung("eager attention", kwargs, eager_attention),
                 _Rung("all-ones mask", masked), _Rung("dense experts", kwargs, dense_experts),
                 _Rung("dense experts, all-ones mask", masked, dense_experts),
                 _Rung("literal buffers", kwargs, scalar_buffers_as_literals, checked=True),
                 _Rung("replayed helpers", kwargs, replayed, checked=True)]
        rungs.sort(key=lambda r: r.name != first)  # stable: the others keep their order
        strict = False  # what the graph was exported with (the draft exports: non-strict)
        drafted = first in RUNGS[-2:]
        if drafted:
            ep = _draft_either_attention(model, args, kwargs, info, eager_first=first == RUNGS[-1])
            rungs = [] if ep is not None else rungs
        for rung in rungs:
            if rung.kwargs is None:
                continue
            printed = io.StringIO()  # torch prints the partial graph of a failed export to stderr
            with rung.setup(model) if rung.setup else contextlib.nullcontext(True) as applies:
                if not applies:
                    continue
                try:
                    with torch.no_grad(), contextlib.redirect_stderr(printed), quiet_export_logs():
                        ep = _export(model, args, rung.kwargs, rung.strict, converted)
                except Exception as e:  # noqa: BLE001 - any tracing failure is reported below
                    errors.append(e)
                    continue
            if rung.checked and not _reproduces(ep, model, args, rung.kwargs):
                errors.append(TraceError(f"the graph traced with {applies} does not give the model's outputs "
                                         "on the example inputs"))
                ep = None
                continue
            sys.stderr.write(printed.getvalue())
            _note_rung(info, rung.name, applies, model)
            kwargs = rung.kwargs
            strict = rung.strict
            break
        if ep is None and not drafted:
            ep = _draft_either_attention(model, args, kwargs, info)
        if ep is None:
            hint = next((h for e in errors if (h := skippable_hint(model, kwargs, e))), None) \
                or sdpa_only_hint(model, args, kwargs)
            raise TraceError(
                f"torch.export could not trace {type(model).__name__} (non-strict, strict and draft all "
                f"failed).\n  {failure_summary(errors[0])}\n" + (hint or
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


def _note_rung(info: dict[str, Any], rung: str, applies: Any, model: nn.Module) -> None:
    """What ``info`` says of the rung that traced the model (``applies``: what its setup changed)."""
    if rung == "eager attention":
        info["attention"] = ("traced with eager attention, the same function as the model's "
                             f"{applies!r} attention (whose per-image chunks have data-dependent sizes)")
    elif rung == "replayed helpers":
        info["specialised"] = (f"traced with {applies} as recorded in one eager forward on the example "
                               "inputs (constants of the graph: the helpers compute sizes from the inputs' "
                               "values with Python loops), and eager attention; kept because the graph gives "
                               "the model's outputs on them: the spec holds for inputs whose helpers give the "
                               "same results")
    elif rung == "literal buffers":
        info["constants"] = (f"traced with {applies} (not in the state dict: constants of the architecture "
                             "such as a conv's stride) read as literal tensors, so the sizes computed from them "
                             "are static; kept because the graph gives the model's outputs")
    elif rung.startswith("dense experts"):
        info["experts"] = (f"traced with dense experts ({applies}): every expert on every token, weighted by "
                           "its routing weight (zero where not routed), the same function as the eager loop "
                           "over the experts hit (data-dependent)")
    elif rung == "batched experts":
        info["experts"] = ("traced with transformers' batched_mm experts, the same function as the model's "
                           f"{model.config._experts_implementation!r} experts (whose grouped or looped "
                           "routing has no rule or data-dependent shapes)")
    if rung.endswith("all-ones mask"):
        info["inputs"] = "traced with an all-ones attention_mask (the model builds none while exported)"
    info["traced_with"] = rung


def check_traceable(model: nn.Module) -> None:
    """A module with a forward of its own, else a TraceError naming the fix."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if type(model).forward is nn.Module.forward:  # a wrapper for generation (Bark) or a codec's encode/decode
        parts = ", ".join(n for n, _ in model.named_children()) or "none"
        raise TraceError(f"{type(model).__name__} defines no forward() (only methods such as generate, encode "
                         f"or decode), so it has no function to trace: compile one of its submodules that has a "
                         f"forward ({parts}), or a model class of this architecture that has one")


def _export(model: nn.Module, args: tuple, kwargs: dict, strict: bool, converted: list[str]):
    """``torch.export.export`` under ``unchanged_to`` and ``distribution_checks_off``. A forward that
    converts a submodule of its own (Switch Transformers' router: ``self.classifier =
    self.classifier.to(float32)`` on every call) has the conversion done first, as the model's first
    call would (``converted`` says which); under export it would swap fake parameters and fail. Once
    converted, the call is a no-op."""
    names = {id(m): n for n, m in model.named_modules()}
    drop_caches = False
    for _ in range(64):
        try:
            with unchanged_to(), distribution_checks_off(), \
                    returned_caches_dropped(model) if drop_caches else contextlib.nullcontext():
                return torch.export.export(model, args, kwargs, strict=strict)
        except RuntimeError as e:  # a KV cache among the outputs (which export cannot flatten): left out
            if drop_caches or not ("Cache" in str(e) and "not a known type" in str(e) and is_transformers_model(model)):
                raise
            drop_caches = True
        except ConvertsItself as e:
            e.module.to(*e.args, **e.kwargs)
            converted.append(f"{names.get(id(e.module), type(e.module).__name__) or 'model'}.to"
                             f"({', '.join(map(str, e.args))})")
    raise TraceError("the forward converts its own modules again on every call; cannot trace it")


def _reproduces(ep, model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether an exported program gives the model's outputs on the inputs (float tolerance: the graph
    may use another attention implementation, the same function)."""
    try:
        with torch.no_grad():
            got = [t for _, t in named_outputs(ep.module()(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            want = [t for _, t in named_outputs(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 - it does not run: not the model's function
        return False
    return _close(got, want)


def _draft_either_attention(model: nn.Module, args: tuple, kwargs: dict, info: dict[str, Any],
                            eager_first: bool | None = None) -> Any:
    """``_draft_export`` with the model's attention, then with eager attention; eager first where the
    model's outputs differ with it in eager mode (SDPA makes attention causal where a module says
    ``is_causal`` and the mask is None, as transformers leaves an all-ones mask outside export; under
    export it builds the mask: Phi-4 multimodal's vision tower). The program or None; ``info`` says
    which attention and what draft export specialised; ``eager_first`` decides the order when known."""
    if eager_first is None:
        eager_first = _eager_attention_differs(model, args, kwargs)
    for setup in [eager_attention, None] if eager_first else [None, eager_attention]:
        with setup(model) if setup else contextlib.nullcontext(True) as applies:
            ep, info["draft"] = _draft_export(model, args, kwargs) if applies else (None, None)
        if ep is not None:
            if setup is not None:
                info["attention"] = (f"draft-exported with eager attention: the model's {applies!r} attention "
                                     "gives other outputs in eager mode (SDPA makes attention causal where a module "
                                     "says is_causal and the mask is None, which under export it never is)")
            info["traced_with"] = RUNGS[-1] if setup is not None else RUNGS[-2]
            return ep
    return None


def _eager_attention_differs(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the model's outputs change with eager attention in eager mode (False when unknown)."""
    try:
        with torch.no_grad():
            own = [t for _, t in named_outputs(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        with eager_attention(model) as applies, torch.no_grad():
            eager = [t for _, t in named_outputs(model(*args, **kwargs)) if isinstance(t, torch.Tensor)] \
                if applies else own
        return not _close(own, eager)
    except Exception:  # noqa: BLE001 - no evidence either way: the usual order
        return False


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    """Whether two forwards' tensor outputs agree (float tolerance)."""
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True) for a, b in zip(got, want))


def _draft_export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, str | None]:
    """``torch.export.draft_export`` (non-strict, real tensors propagated; boolean masks indexed
    through ``nonzero``, the same function, whose size draft export can bind), kept only if its
    graph gives the model's outputs on the example inputs; ``(program, what it specialised)`` or
    ``(None, None)``."""
    try:
        with torch.no_grad(), quiet_export_logs(), BoolMasksAsIndices(), distribution_checks_off():
            ep = torch.export.draft_export(model, args, kwargs, strict=False)
    except Exception:  # noqa: BLE001 - the first error is the one to report
        return None, None
    if not _reproduces(ep, model, args, kwargs):
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
    drop_dead_code(ep)
    constant_ranges_as_slices(ep)
    fused_segments_as_splits(ep)
    return Traced(ep.graph, inputs, shapes, aliases, _output_names(ep), info, ep)


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
