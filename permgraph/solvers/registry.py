"""The solver registry: built-in solvers, presets (configured instances), and plug-ins.

Like mergekit's merge-method registry: the base module knows no implementation; this
module imports them and registers each with its options type. A preset is an entry
with fixed options and a label (the methods tables of the demo and the benchmarks
come from here). Third parties register with ``register_solver`` or the
``permgraph.solvers`` entry point group (a plain function ``fn(spec, a, b, **options)``).
"""
from __future__ import annotations

from typing import Any, Callable

from permgraph.alignment import Alignment
from permgraph.errors import InputError
from permgraph.solvers.activation_matching import ActivationMatchingOptions, activation_matching
from permgraph.solvers.base import SolverEntry, SolverOptions
from permgraph.solvers.ot import OTOptions, ot_solver
from permgraph.solvers.weight_matching import TransfusionOptions, WeightMatchingOptions, transfusion, weight_matching

_REGISTRY: dict[str, SolverEntry] = {}


def register(entry: SolverEntry) -> SolverEntry:
    if entry.name in _REGISTRY:
        raise InputError(f"a solver named '{entry.name}' is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def register_solver(name: str, fn: Callable[..., Alignment] | None = None, *,
                    options: type[SolverOptions] | None = None, needs_data: bool = False, label: str = ""):
    """Register ``fn`` under ``name`` (usable as a decorator). With ``options``, ``fn`` gets an
    instance of that dataclass; without, the keyword arguments as given."""
    def deco(f: Callable[..., Alignment]) -> Callable[..., Alignment]:
        register(SolverEntry(name, f, options, needs_data, {}, label or name))
        return f
    return deco(fn) if fn is not None else deco


def preset(name: str, base: str, label: str, **fixed: Any) -> SolverEntry:
    """Register a configured instance of solver ``base``."""
    b = _REGISTRY[base]
    return register(SolverEntry(name, b.fn, b.options, b.needs_data, fixed, label))


def get_solver(name: str) -> SolverEntry:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise InputError(f"unknown solver '{name}'; available: {available_solvers()}")
    return _REGISTRY[name]


def available_solvers() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="permgraph.solvers"):
        if ep.name not in _REGISTRY:
            register(SolverEntry(ep.name, ep.load(), label=ep.name))


register_solver("weight_matching", weight_matching, options=WeightMatchingOptions,
                label="weight matching (spectral, Q/K and V/O separate)")
register_solver("transfusion", transfusion, options=TransfusionOptions,
                label="transfusion (spectral, shared QKVO)")
register_solver("ot", ot_solver, options=OTOptions, label="optimal transport (exact)")
register_solver("activation_matching", activation_matching, options=ActivationMatchingOptions, needs_data=True,
                label="activation matching")
preset("tf_official", "transfusion", "transfusion, official head distance (+O)", head_distance="official")
preset("wm_natural", "weight_matching", "natural heads", heads="natural")
preset("wm_brute", "weight_matching", "brute-force heads", heads="brute")
preset("wm_lap", "weight_matching", "heads as a descent coordinate", heads="lap")
preset("wm_flat", "weight_matching", "flat heads (ablation)", heads="flat")
preset("ot_sinkhorn", "ot", "optimal transport (Sinkhorn 0.05, soft)", reg=0.05)

# the head-alignment comparison of the paper (Fig. 5, Tables 1 and 3), in table order
PAPER_METHODS = ("wm_flat", "wm_natural", "wm_brute", "transfusion", "weight_matching", "ot", "activation_matching")
