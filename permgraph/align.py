"""``align``: find the permutation of model A that best matches model B."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn as nn

from permgraph.alignment import Alignment
from permgraph.compiler import compile as compile_spec
from permgraph.errors import InputError
from permgraph.inputs import ExampleInputs
from permgraph.ir import G, Permutation
from permgraph.permutation import apply_permutation
from permgraph.rewrites import group_map
from permgraph.solvers import get_solver
from permgraph.solvers.residual_step import untied_descent
from permgraph.spec import PermSpec

ModelLike = nn.Module | Mapping[str, torch.Tensor]


def state_of(model: ModelLike) -> dict[str, torch.Tensor]:
    """Parameters (and buffers) of a module, or a state dict as given."""
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    if isinstance(model, Mapping):
        return dict(model)
    raise InputError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def check_compatible(spec: PermSpec, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Every model has every spec parameter with the spec's shape, and finite values."""
    problems = []
    for label, sd in states.items():
        for name, shape in spec.shapes.items():
            hit = next((n for n in spec.names_of(name) if n in sd), None)
            if hit is None:
                problems.append(f"{label}: missing '{name}'")
            elif tuple(sd[hit].shape) != shape:
                problems.append(f"{label}: '{name}' has shape {tuple(sd[hit].shape)}, expected {shape}")
            elif sd[hit].is_floating_point() and not sd[hit].is_meta and not bool(torch.isfinite(sd[hit]).all()):
                problems.append(f"{label}: '{name}' contains NaN or inf")
        if len(problems) >= 10:
            break
    if problems:
        raise InputError("models do not match the spec (same architecture and shapes needed):\n  "
                         + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))


def canonical_params(spec: PermSpec, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in spec.shapes:
        out[name] = next(sd[n] for n in spec.names_of(name) if n in sd)
    return out


def align(model_a: ModelLike, model_b: ModelLike, spec: PermSpec | None = None, *, solver: str = "weight_matching",
          backend: str = "auto", seed: int = 0, max_iter: int = 100, progress: bool = False,
          example_inputs: ExampleInputs = None, residual: str = "tied", **options: Any) -> Alignment:
    """The permutation ``pi`` with ``pi(A)`` closest to B, over ``spec``:
    ``apply_permutation(spec, al.permutation, A)``.

    Models are modules or state dicts; with state dicts pass ``spec``. The spec is
    compiled from ``model_a`` when not given. ``solver``: a registered solver or preset
    (``pg.available_solvers()``); the default, ``weight_matching`` with spectral heads and
    separate Q/K and V/O within-head groups, measures as well as or better than
    ``transfusion`` on every benchmark in docs/ (README, "Solvers").

    ``residual="untied"``: TransFusion's Step 3, every residual addend with its own permutation
    (``rewrites.untied_residual``); a larger space, meant for task vectors (``pg.transport``):
    pi(A) is then NOT function-preserving in the plain architecture, and the alignment stays
    over the untied spec (``al.spec``).
    """
    if residual not in ("tied", "untied"):
        raise InputError(f"residual must be 'tied' or 'untied', got {residual!r}")
    entry = get_solver(solver)
    if spec is None:
        if not isinstance(model_a, nn.Module):
            raise InputError("align got state dicts without a spec: pass spec=pg.compile(model) "
                             "or PermSpec.from_json(...)")
        spec = compile_spec(model_a, example_inputs)
    sa, sb = state_of(model_a), state_of(model_b)
    check_compatible(spec, {"model A": sa, "model B": sb})
    if entry.needs_data and isinstance(model_a, nn.Module):
        options.setdefault("module", model_a)  # data-based solvers run the model
    pa, pb = canonical_params(spec, sa), canonical_params(spec, sb)
    kw = dict(backend=backend, seed=seed, max_iter=max_iter, progress=progress, **options)
    al = expressed_on(entry(spec, pa, pb, **kw), spec)
    if residual == "tied":
        return al
    return untied_descent(al, spec, pa, pb, lambda sp, x, y: expressed_on(entry(sp, x, y, **kw), sp), backend)


def expressed_on(al: Alignment, spec: PermSpec) -> Alignment:
    """The alignment over ``spec`` when the solver worked on a derived spec with merged groups
    (transfusion's shared within-head groups): each group takes its merged group's permutation.
    A flattened-heads alignment cannot be expressed on ``spec``: it keeps its own spec, and
    ``settings["spec"]`` says so."""
    if al.spec is spec:
        return al
    try:
        mapping = group_map(spec, al.spec)
    except InputError:
        al.settings["spec"] = "derived (not expressible on the given spec: use al.spec)"
        return al
    perm = Permutation({g: al.permutation[mapping[g]] for g in spec.groups})
    soft = {g: al.soft[mapping[g]] for g in spec.groups if mapping[g] in al.soft}
    return dataclasses.replace(al, permutation=perm, spec=spec, soft=soft)


def apply_alignment(alignment: Alignment, state: ModelLike, *,
                    allow_non_preserving: bool = False) -> dict[str, torch.Tensor]:
    """A's parameters moved into B's frame: the permutation, then any soft transport matrices.

    An alignment over untied residual sites is refused unless ``allow_non_preserving``: the
    permuted model computes another function (its shortcuts would need ``P_out P_in^T``)."""
    if alignment.untied_residual and not allow_non_preserving:
        raise InputError("this alignment is over untied residual sites: pi(A) is not function-preserving in "
                         "the plain architecture (use it with pg.transport, or pass allow_non_preserving=True)")
    sd = state_of(state)
    spec = alignment.spec
    if not alignment.soft:
        return apply_permutation(spec, alignment.permutation, sd)
    ident = spec.identity()
    hard = Permutation({**alignment.permutation.perms, **{g: ident[g] for g in alignment.soft}})
    out = apply_permutation(spec, hard, sd)
    for name, x in out.items():
        trees = spec.axes_of(name)
        if trees is None:
            continue
        for dim, tree in enumerate(trees):
            if isinstance(tree, G) and tree.name in alignment.soft:
                dtype = x.dtype if x.is_floating_point() else torch.float32
                t = alignment.soft[tree.name].to(device=x.device, dtype=dtype)
                x = torch.tensordot(t, x.movedim(dim, 0), dims=1).movedim(0, dim)
        out[name] = x
    return out
