"""Axis inference over an exported graph: the engine, the op-rule registry, then attention roles."""
from __future__ import annotations

from typing import Any

from permgraph.infer.engine import GraphInput, InferenceResult, run_inference
from permgraph.infer.residual import residual_shortcuts
from permgraph.infer.roles import assign_roles
from permgraph.infer.rules import RULES


def infer(graph: Any, inputs: dict[str, GraphInput], fixed_outputs: set[int] | None = None, *,
          untied_residual: bool = False) -> InferenceResult:
    """Type every tensor axis of ``graph`` with the registered rules, then name attention roles.

    ``untied_residual``: every residual addend keeps its own axes (``permgraph.infer.residual``);
    the result is then not function-preserving for the plain architecture."""
    untie = residual_shortcuts(graph) if untied_residual else None
    result = run_inference(graph, inputs, RULES, fixed_outputs=fixed_outputs, untie=untie)
    weights = {n for n, gi in inputs.items() if gi.kind in ("parameter", "state")}
    assign_roles(graph, result.store, result.node_types, weights)
    return result


__all__ = ["infer", "GraphInput", "InferenceResult", "RULES", "residual_shortcuts"]
