"""The result of aligning model A to model B: a permutation over a spec, and how it was found."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph.errors import FormatError
from permgraph.ir import Permutation
from permgraph.permutation import check_permutation
from permgraph.spec import PermSpec


@dataclass
class Alignment:
    """The permutation mapping A onto B, and how it was found.

    ``spec`` is the spec the permutation belongs to (the ``flat`` heads ablation
    uses a modified spec); ``function_preserving`` is False for such ablations.
    ``history``: objective ``sum_p <B_p, pi(A)_p>`` before solving and after each sweep.
    ``soft``: transport matrices that replace the permutation of some groups (soft
    OT plans): row i of B's frame is ``sum_j T[i, j]`` times A's unit j.
    """

    permutation: Permutation
    spec: PermSpec
    history: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    function_preserving: bool = True
    soft: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (n, n) transport matrix

    @property
    def untied_residual(self) -> bool:
        """Found over untied residual sites (``residual="untied"``): for task vectors, not for pi(A)."""
        return self.settings.get("residual") == "untied"

    def carries_task_vectors(self) -> bool:
        """Whether ``pi(tau)`` is an intended use without acknowledgement: a function-preserving
        alignment, or untied residual sites that preserve the function once the shortcuts
        become ``P_out P_in^T`` (TransFusion's Step 3)."""
        return self.function_preserving or (
            self.untied_residual and self.settings.get("preserving_with_shortcut_permutations") is True)

    @property
    def sweeps(self) -> int:
        return max(len(self.history) - 1, 0)

    def to_json(self) -> str:
        return json.dumps({
            "format": "permgraph-alignment", "version": 1,
            "spec": json.loads(self.spec.to_json()),
            "permutation": self.permutation.to_json(),
            "soft": {g: t.tolist() for g, t in self.soft.items()},
            "history": self.history, "timings": self.timings, "settings": self.settings,
            "function_preserving": self.function_preserving,
        })

    @classmethod
    def from_json(cls, text: str) -> "Alignment":
        """Parse and validate an alignment file: its spec, a bijection per group, soft plans."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"not a permgraph alignment (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != "permgraph-alignment":
            raise FormatError("not a permgraph alignment file (write one with 'permgraph align --out')")
        if d.get("version") != 1:
            raise FormatError(f"permgraph alignment of version {d.get('version')!r}; this permgraph reads version 1")
        spec = PermSpec.from_dict(d.get("spec"))
        perm = Permutation.from_json(d.get("permutation"))
        check_permutation(spec, perm)
        soft = {}
        for g, v in (d.get("soft") or {}).items():
            n = spec.groups[g].size if g in spec.groups else None
            try:
                t = torch.tensor(v, dtype=torch.float64)
            except (ValueError, TypeError, RuntimeError):
                t = None
            if n is None or t is None or tuple(t.shape) != (n, n) or not bool(torch.isfinite(t).all()) \
                    or bool((t < 0).any()):
                raise FormatError(f"soft transport plan of group '{g}' is not a finite, non-negative "
                                  f"{n} x {n} matrix of a group of the spec")
            soft[g] = t
        preserving = d.get("function_preserving", True)
        history = d.get("history", [])
        if not isinstance(preserving, bool) or not isinstance(history, list):
            raise FormatError("malformed alignment: 'function_preserving' must be true/false and 'history' a list")
        return cls(perm, spec, history, dict(d.get("timings", {})), dict(d.get("settings", {})), preserving, soft)

    def summary(self) -> str:
        obj = f"objective {self.history[0]:.4g} -> {self.history[-1]:.4g}" if self.history else ""
        warn = "" if self.function_preserving else (
            "  [NOT function-preserving: soft transport plans]" if self.soft
            else "  [untied residual sites: for task vectors; pi(A) is NOT function-preserving]"
            if self.carries_task_vectors() else "  [NOT function-preserving: ablation]")
        t = sum(v for k, v in self.timings.items() if k == "total")
        if self.history and self.history[-1] < self.history[0]:
            warn += ("  [objective decreased: the head matching disagrees with weight matching; "
                     "head_guard=True compares natural heads]")
        if "head_guard" in self.settings:
            warn += f"  [{self.settings['head_guard']}]"
        return (f"{self.settings.get('solver', '?')}: {len(self.spec.groups)} groups, {self.sweeps} sweeps, "
                f"{obj}, {t:.2f} s{warn}")
