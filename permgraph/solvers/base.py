"""The solver interface: options, and what a registry entry declares. Knows no implementation.

A solver is ``fn(spec, params_a, params_b, options) -> Alignment`` with ``options`` an
instance of its options dataclass (a subclass of ``SolverOptions``). An entry declares
the options type, whether the solver needs data (then ``options`` carries ``module`` and
``data``), and fixed option values for presets (configured instances of a solver).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from permgraph.alignment import Alignment
from permgraph.backends import LapBackend
from permgraph.errors import InputError
from permgraph.spec import PermSpec


@dataclass
class SolverOptions:
    """Options every solver takes."""

    backend: str | LapBackend = "auto"
    seed: int = 0
    max_iter: int = 100
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise InputError(f"max_iter must be a positive integer, got {self.max_iter!r}")


Params = Mapping[str, torch.Tensor]
SolverFn = Callable[[PermSpec, Params, Params, Any], Alignment]


@dataclass(frozen=True)
class SolverEntry:
    """A registered solver or preset.

    ``options``: the options dataclass; ``None`` for plain functions taking keyword
    arguments (third-party solvers registered without one). ``fixed``: option values a
    preset sets. ``label``: a human-readable name for tables.
    """

    name: str
    fn: Callable[..., Alignment]
    options: type[SolverOptions] | None = None
    needs_data: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def make_options(self, **given: Any) -> SolverOptions | dict[str, Any]:
        """The options instance; unknown names and values a preset fixes are input errors."""
        clash = sorted(k for k in given if k in self.fixed and given[k] != self.fixed[k])
        if clash:
            raise InputError(f"solver '{self.name}' fixes {', '.join(f'{k}={self.fixed[k]!r}' for k in clash)}; "
                             f"use its base solver to choose {clash}")
        values = {**given, **self.fixed}
        if self.options is None:
            return values
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"solver '{self.name}' has no option {unknown}; its options: {sorted(names)}")
        return self.options(**values)

    def __call__(self, spec: PermSpec, params_a: Params, params_b: Params, **given: Any) -> Alignment:
        opts = self.make_options(**given)
        if isinstance(opts, dict):
            return self.fn(spec, params_a, params_b, **opts)
        return self.fn(spec, params_a, params_b, opts)
