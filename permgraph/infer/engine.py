"""The inference pass: walk an exported graph and give every tensor axis an atom.

Placeholders get atoms by kind (parameters free, buffers, constants and user
inputs fixed), every call is handled by its op rule (``permgraph.infer.rules``,
looked up by operator object in ``permgraph.infer.registry``), ops without a rule
fix every axis they touch, and graph outputs are fixed unless freed. The result
records each parameter's axis atoms and every tensor's atoms, which
``permgraph.spec`` turns into groups.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from permgraph.axes import AxisStore
from permgraph.infer.context import RuleContext, TType, atoms_in, is_ttype
from permgraph.infer.registry import Rule, RuleKey, rule_for

__all__ = ["GraphInput", "InferenceResult", "RuleContext", "TType", "run_inference"]


@dataclass
class GraphInput:
    """What a placeholder stands for."""

    kind: str  # "parameter", "buffer", "constant", "input"
    name: str


@dataclass
class InferenceResult:
    store: AxisStore
    param_axes: dict[str, TType]
    tensor_types: list[TType]
    node_types: dict[str, Any] = field(default_factory=dict)
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)


def _tensor_types(x: Any) -> Iterator[TType]:
    if is_ttype(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensor_types(y)


def run_inference(
    graph: fx.Graph,
    inputs: dict[str, GraphInput],
    rules: Mapping[RuleKey, Rule],
    fixed_outputs: set[int] | None = None,
) -> InferenceResult:
    """Type every tensor in ``graph``; ``inputs`` maps placeholder names to what they are.

    ``fixed_outputs``: positions (in the flattened outputs) whose axes are fixed;
    None fixes them all.
    """
    store = AxisStore()
    types: dict[fx.Node, Any] = {}
    cx = RuleContext(store, types)
    param_axes: dict[str, TType] = {}
    unknown: dict[str, list[str]] = {}
    for node in graph.nodes:
        cx.node = node
        if node.op == "placeholder":
            types[node] = _placeholder_type(cx, node, inputs.get(node.name), param_axes)
        elif node.op == "call_function":
            types[node] = _call_type(cx, node, rule_for(rules, node.target), unknown)
        elif node.op == "output":
            for i, out in enumerate(_flat_nodes(node.args)):
                if fixed_outputs is None or i in fixed_outputs:
                    cx.fix_all(cx.types.get(out), "model output")
        else:
            types[node] = _unknown_op(cx, node, unknown)
    used = {inputs[n.name].name for n in graph.nodes
            if n.op == "placeholder" and n.users and n.name in inputs}
    for name, ty in param_axes.items():
        if name not in used:
            cx.fix_all(ty, "unused in the traced forward")
    tensor_types = [t for ty in types.values() for t in _tensor_types(ty)]
    return InferenceResult(store, param_axes, tensor_types, {n.name: t for n, t in types.items()}, unknown)


def _call_type(cx: RuleContext, node: fx.Node, rule: Rule | None, unknown: dict[str, list[str]]) -> Any:
    """Apply the node's rule; without one, non-tensor calls pass and tensor calls are unknown ops."""
    if rule is not None:
        return rule(cx, node, cx.args(node))
    if not _touches_tensors(cx, node):
        return None  # arithmetic on sizes (SymInt) and other non-tensor calls
    return _unknown_op(cx, node, unknown)


def _flat_nodes(x: Any) -> Iterator[fx.Node]:
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat_nodes(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_nodes(y)


def _placeholder_type(cx: RuleContext, node: fx.Node, info: GraphInput | None, param_axes: dict[str, TType]) -> Any:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(int(s) for s in val.shape)
    if info is not None and info.kind == "parameter":
        ty = cx.fresh(shape)
        for a, b in zip(param_axes.setdefault(info.name, ty), ty):  # tied: one tensor, one type
            cx.unify(a, b)
        return ty
    what = {"buffer": "constant buffer", "constant": "constant tensor"}.get(info.kind if info else "", "model input")
    name = info.name if info else node.name
    return cx.fresh(shape, f"{what} '{name}'")


def _touches_tensors(cx: RuleContext, node: fx.Node) -> bool:
    val = node.meta.get("val")
    outs = val if isinstance(val, (list, tuple)) else [val]
    if any(isinstance(v, torch.Tensor) for v in outs):
        return True
    return any(list(atoms_in(cx.types.get(arg))) for arg in _flat_nodes((node.args, node.kwargs)))


def _unknown_op(cx: RuleContext, node: fx.Node, unknown: dict[str, list[str]]) -> Any:
    """No rule: every axis touched is fixed, and the op is reported."""
    name = str(node.target)
    unknown.setdefault(name, []).append(node.name)
    for arg in _flat_nodes((node.args, node.kwargs)):
        cx.fix_all(cx.types.get(arg), f"op without a rule: {name}")
    return _fresh_like(cx, node.meta.get("val"), f"output of op without a rule: {name}")


def _fresh_like(cx: RuleContext, val: Any, reason: str | None) -> Any:
    if isinstance(val, torch.Tensor):
        return cx.fresh(tuple(int(s) for s in val.shape), reason)
    if isinstance(val, (list, tuple)):
        return [_fresh_like(cx, v, reason) for v in val]
    return None
