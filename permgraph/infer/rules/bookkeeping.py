"""Calls without tensor math: tuple indexing, runtime checks, symbolic sizes."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, is_ttype
from permgraph.infer.registry import reads_values, register

aten = torch.ops.aten


@reads_values  # a check reads metadata, never values: index values it sees stay free
@register(aten._assert_tensor_metadata, aten._assert_scalar, aten._assert_async, aten.sym_size, aten.sym_numel,
          aten.sym_stride, aten.sym_constrain_range, aten.sym_constrain_range_for_size)
def no_op(cx: RuleContext, node: fx.Node, a: Args) -> None:
    """Checks and symbolic sizes: no tensor result, no constraint."""
    return None


@reads_values
@register(operator.getitem)
def getitem(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """One result of a multi-output op (no schema: arguments are ``arg0, arg1``)."""
    vals = cx.values.get(a["arg0"])
    if isinstance(vals, (list, tuple)) and isinstance(a["arg1"], int) and a["arg1"] < len(vals):
        cx.set_values(vals[a["arg1"]])
    ty = cx.types.get(a["arg0"])
    return ty[a["arg1"]] if isinstance(ty, (list, tuple)) and not is_ttype(ty) else None
