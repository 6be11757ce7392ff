"""Tensor factories: constants are free, position-dependent values are fixed."""
from __future__ import annotations

import torch
import torch.fx as fx

from permgraph.infer.context import RUN_TIME, Args, RuleContext, TType
from permgraph.infer.registry import family, reads_values, register

aten = torch.ops.aten


@reads_values  # a ``_like`` factory reads its argument's shape, never its values (index values stay free)
def constant_factory(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """A constant tensor is invariant under every permutation: fresh, free axes."""
    out = cx.out_shape()
    cx.set_uniform(range(len(out)))
    return cx.fresh(out)


@reads_values
def varying_factory(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """Values that vary along every axis (ranges, random draws): fixed."""
    return cx.fresh(cx.out_shape(), f"values vary along the axis ({node.target})")


def_constant_factory = family(constant_factory)
def_varying_factory = family(varying_factory)

def_constant_factory(
    aten.full, aten.zeros, aten.ones, aten.empty, aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty,
    aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.scalar_tensor, aten.empty_strided,
)
def_varying_factory(
    aten.arange, aten.rand, aten.randn, aten.randint, aten.rand_like, aten.randn_like, aten.linspace,
    aten.tril_indices, aten.triu_indices,
)


@register(aten.eye)
def eye(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``eye(n, m)``: ``out[i, j] = (i == j)``. Permuting rows and columns alike leaves it unchanged
    (``P I P^T = I``), so both axes are one atom; a rectangular one is ``[a, cat(a, b)]`` (or
    ``[cat(a, b), a]``), its extra columns (rows) zero and free. Sizes known only at run time: fixed."""
    n, m = cx.out_shape()
    if max(n, m) > RUN_TIME and n != m:
        return cx.fresh((n, m), f"values vary along the axis ({node.target})")
    diag = cx.store.new(min(n, m))
    if n == m:
        return [diag, diag]
    rest = cx.store.make("cat", [diag, cx.store.new(abs(n - m))])
    return [diag, rest] if n < m else [rest, diag]
