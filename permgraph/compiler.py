"""``compile``: model + example inputs -> PermSpec."""
from __future__ import annotations

import torch.nn as nn

from permgraph.axes import Reason
from permgraph.infer import infer
from permgraph.spec import PermSpec, build_spec
from permgraph.trace import ExampleInputs, trace


def compile(model: nn.Module, example_inputs: ExampleInputs = None, *, free_outputs: bool = False) -> PermSpec:
    """Trace ``model`` and infer its permutation spec.

    ``example_inputs``: a tuple of positional arguments or a dict of keyword
    arguments; derived from the config for transformers models when omitted.
    ``free_outputs``: let the permutation reach the outputs (for models whose
    outputs are hidden states that a later consumer will be permuted with).
    """
    traced = trace(model, example_inputs)
    result = infer(traced.graph, traced.inputs, free_outputs=free_outputs)
    unused_params = set(traced.param_shapes) - set(result.param_axes)
    if unused_params:  # not lifted into the graph: nothing is known about them
        for name in unused_params:
            result.param_axes[name] = [result.store.new(s) for s in traced.param_shapes[name]]
            for a in result.param_axes[name]:
                result.store.fix(a, Reason("not in the traced graph"))
    return build_spec(result, traced.param_shapes, traced.aliases, traced.info)
