"""The op-rule registry: ``torch.ops.aten`` overload packets (and a few Python callables) to rules.

Keyed by operator objects, like torch's ``_decomp`` table: naming an op that
does not exist fails at import (``torch.ops.aten.<name>`` raises), and a second
rule for one op raises. Families of ops that share one rule are registered in
the JAX ``defvectorized`` style, by a registrar made with ``family``::

    def_elementwise = family(elementwise)
    def_elementwise(aten.add, aten.mul, aten.relu)

An in-place call (``aten.add_``) uses the rule of its out-of-place packet.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Union

import torch
import torch.fx as fx
from torch._ops import OpOverload, OpOverloadPacket  # noqa: PLC2701 - the types of torch.ops.aten.*

from permgraph.infer.context import Args, RuleContext

Rule = Callable[[RuleContext, fx.Node, Args], Any]
RuleKey = Union[OpOverloadPacket, Callable[..., Any]]  # a packet, or a non-aten call target

RULES: dict[RuleKey, Rule] = {}
# Index values (integer tensors naming positions along an axis, e.g. topk indices): rules in
# VALUE_PASSING carry their first argument's values to the result (moves, copies, reshapes);
# rules in VALUE_READING handle them (``RuleContext.index_with``). Any other rule fixes the axis
# the values name (``permgraph.infer.engine``).
VALUE_PASSING: set[Rule] = set()
VALUE_READING: set[Rule] = set()


def passes_values(fn: Rule) -> Rule:
    """Decorator: the rule's result holds the same index values as its first argument."""
    VALUE_PASSING.add(fn)
    return fn


def reads_values(fn: Rule) -> Rule:
    """Decorator: the rule itself handles index values among its arguments."""
    VALUE_READING.add(fn)
    return fn


def _check_key(op: Any) -> None:
    if isinstance(op, OpOverload):
        raise TypeError(f"register the overload packet {op.overloadpacket}, not the overload {op}")
    if isinstance(op, str) or not callable(op):
        raise TypeError(f"op rules are keyed by operator objects (torch.ops.aten.<name>), got {op!r}")


def add_rule(table: MutableMapping[RuleKey, Rule], ops: tuple[RuleKey, ...], fn: Rule) -> None:
    """Give ``ops`` the rule ``fn`` in ``table``; nothing is added if any op already has a rule."""
    for op in ops:
        _check_key(op)
        if op in table or ops.count(op) > 1:
            raise RuntimeError(f"duplicate rule for {op}")
    for op in ops:
        table[op] = fn


def register(*ops: RuleKey, table: MutableMapping[RuleKey, Rule] = RULES) -> Callable[[Rule], Rule]:
    """Decorator: the decorated function is the rule of every op in ``ops``."""
    def deco(fn: Rule) -> Rule:
        add_rule(table, ops, fn)
        return fn
    return deco


def family(fn: Rule, table: MutableMapping[RuleKey, Rule] = RULES) -> Callable[..., None]:
    """A registrar that gives each op passed to it the same rule ``fn``."""
    def define(*ops: RuleKey) -> None:
        add_rule(table, ops, fn)
    define.__doc__ = f"Register ops whose rule is ``{fn.__name__}``."
    return define


def rule_key(target: Any) -> RuleKey:
    """Registry key of a call target: an OpOverload's packet, else the target itself."""
    return target.overloadpacket if isinstance(target, OpOverload) else target


def out_of_place(packet: OpOverloadPacket) -> OpOverloadPacket | None:
    """``aten.add`` for ``aten.add_``; None for ops that are not in-place variants."""
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_") or getattr(torch.ops.aten, name, None) is not packet:
        return None
    return getattr(torch.ops.aten, name[:-1], None)


def rule_for(table: MutableMapping[RuleKey, Rule], target: Any) -> Rule | None:
    """The rule for a call target, in-place ops falling back to their out-of-place rule."""
    key = rule_key(target)
    fn = table.get(key)
    if fn is None and isinstance(key, OpOverloadPacket):
        base = out_of_place(key)
        fn = table.get(base) if base is not None else None
    return fn
