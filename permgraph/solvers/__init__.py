"""Solvers: find the permutation of model A that best matches model B, over a spec.

Registered by name (``get_solver``) in ``permgraph.solvers.registry``; third parties add
theirs with ``register_solver`` or the ``permgraph.solvers`` entry point group.
"""
from __future__ import annotations

from permgraph.solvers.base import SolverEntry, SolverOptions
from permgraph.solvers.common import HEAD_STRATEGIES
from permgraph.solvers.registry import PAPER_METHODS, available_solvers, get_solver, register_solver

__all__ = ["SolverEntry", "SolverOptions", "HEAD_STRATEGIES", "PAPER_METHODS", "get_solver", "register_solver",
           "available_solvers"]
