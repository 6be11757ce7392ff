"""``compile``: model + example inputs -> PermSpec."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn as nn

from permgraph.axes import Reason
from permgraph.build import build_spec
from permgraph.errors import FormatError, InputError, InternalError, PermgraphError, TraceError
from permgraph.infer import infer
from permgraph.inputs import MODALITIES, ExampleInputs, default_example_inputs, is_transformers_model
from permgraph.rewrites import residual_sites
from permgraph.spec import PermSpec, check_spec, check_tree
from permgraph.trace import check_traceable, quiet_export_logs, trace


def compile(model: nn.Module, example_inputs: ExampleInputs = None, *,
            outputs: Sequence[str] | None = None) -> PermSpec:
    """Trace ``model`` and infer its permutation spec.

    ``example_inputs``: a tuple of positional arguments or a dict of keyword
    arguments; derived from the config for transformers models when omitted.
    ``outputs``: names of the outputs that must stay unchanged (default: all; for a model with a
    task head, its task outputs such as ``logits``, hidden states and sub-models' pooled states being
    free: ``default_outputs``).
    Others may come out permuted, e.g. ``outputs=["logits"]`` lets a
    seq2seq model's ``encoder_last_hidden_state`` move with the residual
    stream; ``outputs=[]`` frees every output. Names are pytree paths such as
    ``logits`` or ``[0]``; ``spec.info["outputs"]`` lists them.
    """
    return _compile(model, example_inputs, outputs)[0]


@dataclass
class CompiledGraph:
    """A spec together with the exported program and the axis trees of its graph nodes."""

    spec: PermSpec
    exported: Any  # torch.export.ExportedProgram
    node_trees: dict[str, list]


def compile_graph(model: nn.Module, example_inputs: ExampleInputs = None, *,
                  outputs: Sequence[str] | None = None) -> CompiledGraph:
    """Like ``compile``, keeping the traced program and where each group lives in it."""
    spec, traced, node_trees = _compile(model, example_inputs, outputs, with_nodes=True)
    return CompiledGraph(spec, traced.exported, node_trees)


def default_outputs(names: Sequence[str]) -> list[str] | None:
    """For a model with a task head (``logits``...), the task outputs; hidden states (and pooled
    states: a sub-model's ``vision_model_output.pooler_output``, a VLM's projected
    ``image_pooler_output``; whatever else a tower returns, ``image_outputs.deepstack_features``)
    may come out permuted. None (all fixed) when every output is a hidden
    state or none is."""
    hidden = [n for n in names if "hidden_state" in n or n.startswith("past_key_values")
              or re.search(r"pooler_output(\.\d+)*$", n)  # one per image: ``pooler_output.0``
              or n.split(".")[0].endswith(("_outputs", "_output")) and "logits" not in n]  # a tower's
    task = [n for n in names if n not in hidden]
    return task if hidden and any("logits" in n for n in task) else None


def _compile(model: nn.Module, example_inputs: ExampleInputs, outputs: Sequence[str] | None,
             with_nodes: bool = False):
    """Trace, infer, build. Derived inputs of a vision/audio-language model that cannot be traced
    or inferred (a tower's data-dependent loop) fall back to fewer modalities, the last added
    dropped first (audio, then videos), then to text only: the towers left out stay fixed ("unused
    in the traced forward"), ``spec.info["dropped_inputs"]`` (with ``["modalities"]``, the ones kept)
    or ``spec.info["text_only_inputs"]`` says why, and ``verify`` uses the same inputs."""
    check_traceable(model)  # before the fallbacks below, which derive inputs
    try:
        return _compile_once(model, example_inputs, outputs, with_nodes)
    except (TraceError, InternalError) as e:
        if example_inputs is not None or not is_transformers_model(model):
            raise
        first = str(e).splitlines()[0]
        tried = [set(default_example_inputs(model))]
        text = set(default_example_inputs(model, modalities=False))
        for kept in _fewer_modalities():
            inputs = default_example_inputs(model, modalities=kept)
            if set(inputs) in tried:
                continue
            tried.append(set(inputs))
            kept = kept if set(inputs) != text else ()
            try:
                res = _compile_once(model, inputs, outputs, with_nodes)
            except (TraceError, InternalError):
                if kept:
                    continue
                raise
            if kept:
                res[0].info["modalities"] = list(kept)
                res[0].info["dropped_inputs"] = (
                    f"traced with the derived {'/'.join(kept)} inputs only: with the "
                    f"{'/'.join(m for m in MODALITIES if m not in kept)} inputs too, {type(e).__name__}: {first[:200]}")
            else:
                res[0].info["text_only_inputs"] = (f"traced with text-only inputs: with the derived image/audio "
                                                   f"inputs, {type(e).__name__}: {first[:200]}")
            return res
        raise


def _fewer_modalities() -> list[tuple[str, ...]]:
    """Modality sets to fall back to, the last added dropped first, ending with none (text only)."""
    return [MODALITIES[:i] for i in range(len(MODALITIES) - 1, -1, -1)]


def _compile_once(model: nn.Module, example_inputs: ExampleInputs, outputs: Sequence[str] | None,
                  with_nodes: bool = False):
    traced = trace(model, example_inputs)
    fixed = None
    if outputs is None:
        outputs = default_outputs(traced.output_names)
    if outputs is not None:
        unknown = [o for o in outputs if o not in traced.output_names]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; this model's outputs are {traced.output_names}")
        fixed = {i for i, n in enumerate(traced.output_names) if n in outputs}
    try:
        with quiet_export_logs() if "draft" in traced.info else contextlib.nullcontext():
            result = infer(traced.graph, traced.inputs, fixed_outputs=fixed)
    except PermgraphError:
        raise
    except Exception as e:  # a rule crashed: permgraph's bug, not the user's
        raise InternalError(f"inference failed on {type(model).__name__}: {type(e).__name__}: {e}",
                            getattr(e, "node", None)) from e
    named = [n for n, node in zip(traced.output_names, result.outputs) if node is not None]  # not the None ones
    traced.info["outputs"] = named
    traced.info["fixed_outputs"] = list(outputs) if outputs is not None else named
    _fix_untraced(result, traced.param_shapes)
    free = {name: node for i, (name, node) in enumerate(zip(traced.output_names, result.outputs))
            if fixed is not None and i not in fixed and node is not None}
    built = build_spec(result, traced.param_shapes, traced.aliases, traced.info, with_nodes=with_nodes,
                       outputs=free)
    spec = built[0] if with_nodes else built
    spec.outputs = {o: trees for o, trees in spec.outputs.items() if _gatherable(spec, o, trees)}
    _record_residual_sites(spec, traced, fixed)
    try:  # the spec as a reader of its JSON checks it: contexts outer, trees cover the (view) shapes
        check_spec(spec)
    except FormatError as e:
        raise InternalError(f"the spec built for {type(model).__name__} is inconsistent: {e}") from e
    return (spec, traced, built[1]) if with_nodes else (spec, traced, None)


def _gatherable(spec: PermSpec, name: str, trees: list) -> bool:
    """Whether a free output's trees can permute it on their own: a within-head group on one dim whose
    heads are on another (a ``(batch, heads, seq, head_dim)`` output) cannot, so that output is not
    compared by ``verify``."""
    try:
        for d, t in enumerate(trees):
            check_tree(t, spec, f"output '{name}' dim {d}")
    except FormatError:
        return False
    return True


def _fix_untraced(result, param_shapes) -> None:
    """Parameters not lifted into the graph: nothing is known about them, every axis fixed."""
    for name in set(param_shapes) - set(result.param_axes):
        result.param_axes[name] = [result.store.new(s) for s in param_shapes[name]]
        for a in result.param_axes[name]:
            result.store.fix(a, Reason("not in the traced graph"))


def _record_residual_sites(spec: PermSpec, traced, fixed: set[int] | None) -> None:
    """Infer once more with untied residual additions and record how the groups split
    (``spec.residual_sites``, used by ``residual="untied"``)."""
    try:
        result = infer(traced.graph, traced.inputs, fixed_outputs=fixed, untied_residual=True)
    except Exception as e:  # noqa: BLE001 - the tied spec stands; only the option is lost
        spec.info["residual_sites_missing"] = f"inference with untied residuals failed: {type(e).__name__}: {e}"
        return
    _fix_untraced(result, traced.param_shapes)
    untied = build_spec(result, traced.param_shapes, traced.aliases, traced.info)
    sites, why = residual_sites(spec, untied)
    if sites is None:
        spec.info["residual_sites_missing"] = why
    else:
        spec.residual_sites = sites
