"""permgraph: compile a PyTorch model into its permutation spec and re-base models with it."""
from __future__ import annotations

from permgraph.adapters import transport_adapter
from permgraph.align import align, apply_alignment
from permgraph.alignment import Alignment
from permgraph.compiler import compile
from permgraph.explain import explain
from permgraph.ir import Permutation
from permgraph.permutation import apply_permutation
from permgraph.solvers import available_solvers, register_solver
from permgraph.spec import FixedAxis, Group, Member, PermSpec
from permgraph.trace import TraceError
from permgraph.transport import transport
from permgraph.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = ["compile", "explain", "verify", "apply_permutation", "align", "apply_alignment", "transport",
           "transport_adapter", "Alignment", "available_solvers", "register_solver", "PermSpec", "Permutation",
           "Group", "Member", "FixedAxis", "VerifyReport", "TraceError", "__version__"]
