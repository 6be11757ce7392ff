"""Axis inference over an exported graph: the engine, the op-rule registry, then attention roles."""
from __future__ import annotations

from typing import Any

from permgraph.infer.engine import GraphInput, InferenceResult, run_inference
from permgraph.infer.roles import assign_roles
from permgraph.infer.rules import RULES


def infer(graph: Any, inputs: dict[str, GraphInput], fixed_outputs: set[int] | None = None) -> InferenceResult:
    """Type every tensor axis of ``graph`` with the registered rules, then name attention roles."""
    result = run_inference(graph, inputs, RULES, fixed_outputs=fixed_outputs)
    weights = {n for n, gi in inputs.items() if gi.kind in ("parameter", "state")}
    assign_roles(graph, result.store, result.node_types, weights)
    return result


__all__ = ["infer", "GraphInput", "InferenceResult", "RULES"]
