"""permgraph: compile a PyTorch model into its permutation spec and re-base models with it."""
from __future__ import annotations

from permgraph.compiler import compile
from permgraph.explain import explain
from permgraph.permutation import Permutation, apply_permutation
from permgraph.spec import FixedAxis, Group, Member, PermSpec
from permgraph.trace import TraceError
from permgraph.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = ["compile", "explain", "verify", "apply_permutation", "PermSpec", "Permutation",
           "Group", "Member", "FixedAxis", "VerifyReport", "TraceError", "__version__"]
