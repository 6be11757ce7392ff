"""Op rules: how each aten op constrains the axes of its inputs and outputs.

A rule gets the context, the node and its bound arguments (``Args``), and
returns the output's type (one atom per dimension, or a list of those for ops
with several outputs). Rules only unify, fix and refine axes; attention roles
are named afterwards (``permgraph.infer.roles``). Each module holds one family;
importing this package registers them all in ``RULES``. An op missing here
fixes every axis it touches.
"""
from __future__ import annotations

from permgraph.infer.registry import RULES
from permgraph.infer.rules import (  # noqa: F401  (imported to register their rules)
    attention,
    bookkeeping,
    elementwise,
    factories,
    indexing,
    linalg,
    norm,
    recurrent,
    reductions,
    shape,
)

__all__ = ["RULES"]
