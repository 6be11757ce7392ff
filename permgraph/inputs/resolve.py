"""Example inputs as the tracer takes them: the user's (positional or keyword) or derived."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from permgraph.errors import TraceError
from permgraph.inputs.derive import default_example_inputs
from permgraph.inputs.model import is_transformers_model, tracing_flags

ExampleInputs = tuple | dict | torch.Tensor | None


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional arguments or a dict of keyword "
                     f"arguments, not {type(example_inputs).__name__}")


def resolve_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return split_inputs(default_example_inputs(model))
    args, kwargs = split_inputs(example_inputs)
    if is_transformers_model(model):
        params = inspect.signature(model.forward).parameters
        for flag, value in tracing_flags(params).items():
            kwargs.setdefault(flag, value)
    return args, kwargs
