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
from permgraph.infer.context import RuleContext, TType, atoms_in, concrete, is_ttype
from permgraph.infer.registry import VALUE_PASSING, VALUE_READING, Rule, RuleKey, rule_for

__all__ = ["GraphInput", "InferenceResult", "RuleContext", "TType", "run_inference"]


@dataclass
class GraphInput:
    """What a placeholder stands for."""

    kind: str  # "parameter", "state" (a persistent float buffer: moves like a parameter), "buffer", "constant", "input"
    name: str


@dataclass
class InferenceResult:
    store: AxisStore
    param_axes: dict[str, TType]
    tensor_types: list[TType]
    node_types: dict[str, Any] = field(default_factory=dict)
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    # ``(axis, value atom, index node)``: rows selected by index values (``RuleContext.carriers``)
    carriers: list[tuple[int, int, Any]] = field(default_factory=list)
    # per flattened output (the positions of ``fixed_outputs``), the name of its node; None where it is
    # not a node (an output that is None in one forward: a tower's ``hidden_states[0]``)
    outputs: list[str | None] = field(default_factory=list)


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
    untie: Mapping[fx.Node, int] | None = None,
) -> InferenceResult:
    """Type every tensor in ``graph``; ``inputs`` maps placeholder names to what they are.

    ``fixed_outputs``: positions (in the flattened outputs) whose axes are fixed;
    None fixes them all. ``untie``: residual additions -> the position of their
    shortcut operand, which the rule then sees with fresh axes (the sum takes the
    branch's axes only: ``permgraph.infer.residual``).
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
        elif node.op == "call_function" and untie and node in untie:
            shortcut = node.args[untie[node]]
            saved = types[shortcut]
            types[shortcut] = cx.fresh(tuple(cx.store.size(a) for a in saved))
            try:
                types[node] = _call_type(cx, node, rule_for(rules, node.target), unknown)
            finally:
                types[shortcut] = saved
        elif node.op == "call_function":
            types[node] = _call_type(cx, node, rule_for(rules, node.target), unknown)
        elif node.op == "output":
            for i, out in enumerate(_output_entries(node)):
                if not isinstance(out, fx.Node):  # None or a constant: nothing to type
                    continue
                _consume_values(cx, out, "index values returned as a model output")
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
    outs = next((_output_entries(n) for n in graph.nodes if n.op == "output"), [])
    return InferenceResult(store, param_axes, tensor_types, {n.name: t for n, t in types.items()}, unknown,
                           cx.carriers, [o.name if isinstance(o, fx.Node) else None for o in outs])


def _call_type(cx: RuleContext, node: fx.Node, rule: Rule | None, unknown: dict[str, list[str]]) -> Any:
    """Apply the node's rule; without one, non-tensor calls pass and tensor calls are unknown ops."""
    if rule is not None:
        try:
            out = rule(cx, node, cx.args(node))
        except Exception as e:  # noqa: BLE001 - only data-dependent sizes are handled here
            if "DataDependent" not in type(e).__name__ and "data-dependent" not in str(e):
                raise
            return _unknown_op(cx, node, unknown)  # sizes known only at run time: fix what it touches
        _values_after(cx, node, rule)
        _track_aliases(cx, node)
        return out
    for arg in _flat_nodes((node.args, node.kwargs)):
        _consume_values(cx, arg, f"index values used by op without a rule {node.target}")
    if not _touches_tensors(cx, node):
        return None  # arithmetic on sizes (SymInt) and other non-tensor calls
    return _unknown_op(cx, node, unknown)


def _values_after(cx: RuleContext, node: fx.Node, rule: Rule) -> None:
    """Index values flow through moves and copies; any other use fixes the axis they index."""
    if rule in VALUE_PASSING:
        first = next(iter(_flat_nodes((node.args[:1],))), None)
        v = cx.value_atom(first)
        if v is not None and node not in cx.values:
            cx.values[node] = v
        return
    if rule in VALUE_READING:
        return
    for arg in _flat_nodes((node.args, node.kwargs)):
        _consume_values(cx, arg, f"index values used by {node.target}")


def _track_aliases(cx: RuleContext, node: fx.Node) -> None:
    """Views remember their base; a write through any view makes the base no longer constant.

    A factory's result (``zeros``) is constant along every axis and so constrains nothing; once
    ``copy_``/``index_put_`` writes into it (or a view of it), later readers see the written data.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return
    rets = schema.returns
    if rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write and node.args:
        if isinstance(node.args[0], fx.Node):
            cx.view_base[node] = cx.view_base.get(node.args[0], node.args[0])
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        x = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(x, fx.Node):
            root = cx.view_base.get(x, x)
            for n in [root] + [v for v, b in cx.view_base.items() if b is root]:
                cx.uniform.pop(n, None)


def _consume_values(cx: RuleContext, x: Any, reason: str) -> None:
    v = cx.value_atom(x)
    if v is not None:
        cx.fix(v, reason)


def _output_entries(node: fx.Node) -> list[Any]:
    """The output node's entries, one per flattened output (an exported graph returns a flat tuple,
    entries that are not nodes included), so positions match the output names."""
    arg = node.args[0] if len(node.args) == 1 else node.args
    return list(arg) if isinstance(arg, (list, tuple)) else [arg]


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
    shape = tuple(concrete(s) for s in val.shape)
    if info is not None and info.kind in ("parameter", "state"):  # state: persistent float buffers
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
        return cx.fresh(tuple(concrete(s) for s in val.shape), reason)
    if isinstance(val, (list, tuple)):
        return [_fresh_like(cx, v, reason) for v in val]
    return None
