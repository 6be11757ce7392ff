"""Solvers: find the permutation of model A that best matches model B, over a spec.

Registered by name (``get_solver``); third parties add theirs with
``register_solver`` or the ``permgraph.solvers`` entry point group.
"""
from __future__ import annotations

from permgraph.solvers.base import Alignment, Solver, available_solvers, get_solver, register_solver

__all__ = ["Alignment", "Solver", "get_solver", "register_solver", "available_solvers"]
