"""Example inputs: the user's, or derived from a transformers model's config (no tokenizer or hub).

Modules, each importing only those below it: ``resolve`` (the user's inputs, or derived) -> ``derive``
(``default_example_inputs``) -> ``text | series | audio | vision`` -> ``images | placeholders`` ->
``precomputed`` -> ``model`` (introspection and probing shared by all)."""
from __future__ import annotations

from permgraph.inputs.derive import MODALITIES, default_example_inputs
from permgraph.inputs.model import is_transformers_model, model_device, model_dtype
from permgraph.inputs.precomputed import modeling_helpers, recorded
from permgraph.inputs.resolve import ExampleInputs, resolve_inputs, split_inputs

__all__ = ["ExampleInputs", "MODALITIES", "default_example_inputs", "resolve_inputs", "split_inputs",
           "is_transformers_model", "model_dtype", "model_device", "modeling_helpers", "recorded"]
