"""``explain``: the report of a model's spec (compiled first) or of a spec."""
from __future__ import annotations

import torch.nn as nn

from permgraph.compiler import compile as compile_spec
from permgraph.inputs import ExampleInputs
from permgraph.report import explain_spec
from permgraph.spec import PermSpec


def explain(model_or_spec: nn.Module | PermSpec, example_inputs: ExampleInputs = None) -> str:
    """The report for a spec, or for a model (compiled first)."""
    if isinstance(model_or_spec, PermSpec):
        return explain_spec(model_or_spec)
    return explain_spec(compile_spec(model_or_spec, example_inputs))
