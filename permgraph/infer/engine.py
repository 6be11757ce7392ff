"""The inference pass: walk an exported graph and give every tensor axis an atom.

Placeholders get atoms by kind (parameters free, buffers, constants and user
inputs fixed), every call is handled by its op rule (``permgraph.infer.rules``),
ops without a rule fix every axis they touch, and graph outputs are fixed unless
freed. The result records each parameter's axis atoms and every tensor's atoms,
which ``permgraph.spec`` turns into groups.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from permgraph.axes import AxisStore, Reason

TType = list[int]  # one atom per tensor dimension


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


class RuleContext:
    """What an op rule sees: types and shapes of arguments, and the axis store."""

    def __init__(self, store: AxisStore, types: dict[fx.Node, Any]) -> None:
        self.store = store
        self.types = types
        self.node: fx.Node | None = None
        # dims along which a node's value is constant (zeros, ones, broadcasts): such an
        # operand constrains nothing along them, like a size-1 broadcast
        self.uniform: dict[fx.Node, frozenset[int]] = {}

    def uniform_dims(self, x: Any) -> frozenset[int]:
        return self.uniform.get(x, frozenset()) if isinstance(x, fx.Node) else frozenset()

    def set_uniform(self, dims) -> None:
        if dims:
            self.uniform[self.node] = frozenset(dims)

    @property
    def where(self) -> str:
        return self.node.name if self.node is not None else ""

    def t(self, x: Any) -> TType | None:
        """The type of a tensor argument (None for non-tensors)."""
        if isinstance(x, fx.Node):
            ty = self.types.get(x)
            return ty if _is_ttype(ty) else None
        return None

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in x.meta["val"].shape)

    def out_shape(self, i: int | None = None) -> tuple[int, ...]:
        val = self.node.meta["val"]
        if i is not None:
            val = val[i]
        return tuple(int(s) for s in val.shape)

    def fresh(self, shape: tuple[int, ...], reason: str | None = None) -> TType:
        r = Reason(reason, self.where) if reason else None
        return [self.store.new(s, r) for s in shape]

    def unify(self, a: int, b: int) -> None:
        self.store.unify(a, b, self.where)

    def fix(self, a: int, reason: str) -> None:
        self.store.fix(a, Reason(reason, self.where))

    def fix_all(self, ty: Any, reason: str) -> None:
        for a in _atoms_in(ty):
            self.fix(a, reason)


def _is_ttype(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) for i in x)


def _atoms_in(x: Any):
    if _is_ttype(x):
        yield from x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _atoms_in(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _atoms_in(y)


def _tensor_types(x: Any):
    if _is_ttype(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensor_types(y)


def op_key(target: Any) -> str | None:
    """Rule key of a call target: the aten overload packet name, in-place ``_`` dropped."""
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    if packet is None:
        return None
    name = packet.__name__
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def bind_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def run_inference(
    graph: fx.Graph,
    inputs: dict[str, GraphInput],
    rules: dict[str, Callable[[RuleContext, fx.Node, dict[str, Any]], Any]],
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
            key = op_key(node.target)
            rule = rules.get(key) if key else None
            if rule is None and not _touches_tensors(cx, node):
                types[node] = None  # arithmetic on sizes (SymInt) and other non-tensor calls
            elif rule is None:
                types[node] = _unknown_op(cx, node, unknown)
            else:
                types[node] = rule(cx, node, bind_args(node) if key != "getitem" else {})
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


def _flat_nodes(x: Any):
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
    return any(list(_atoms_in(cx.types.get(arg))) for arg in _flat_nodes((node.args, node.kwargs)))


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
