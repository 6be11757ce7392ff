"""Axis inference over an exported graph: the engine plus the op rules."""
from __future__ import annotations

from typing import Any

from permgraph.infer.engine import GraphInput, InferenceResult, run_inference
from permgraph.infer.rules import RULES


def infer(graph: Any, inputs: dict[str, GraphInput], fixed_outputs: set[int] | None = None) -> InferenceResult:
    return run_inference(graph, inputs, RULES, fixed_outputs=fixed_outputs)


__all__ = ["infer", "GraphInput", "InferenceResult", "RULES"]
