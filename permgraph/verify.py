"""``verify``: a random permutation from the spec must leave the outputs unchanged."""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from permgraph.compiler import compile as compile_spec
from permgraph.errors import InputError
from permgraph.inputs import ExampleInputs, default_example_inputs, model_dtype, resolve_inputs
from permgraph.ir import Permutation
from permgraph.permutation import apply_permutation, axis_index, gather_axes
from permgraph.spec import PermSpec
from permgraph.trace import named_outputs, trace


@dataclass
class VerifyReport:
    max_abs_error: float
    max_rel_error: float
    output_scale: float
    dtype: str
    seed: int
    groups: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verify {verdict}: max relative error {self.max_rel_error:.3g} (abs {self.max_abs_error:.3g}, "
                f"tolerance {self.tolerance:g}) in {self.dtype}, seed {self.seed}, {self.groups} groups permuted")


# the seed of the random number generator for both forwards that verify compares
RNG_SEED = 0


def _outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensor outputs by name. The forward runs with torch's generators seeded alike (on a fork, so the
    caller's random state is untouched): a model that samples (VITS's noise, ViT-MAE's masking) draws
    the same values before and after the permutation, so ``f(perm(theta), x, omega) = f(theta, x, omega)``
    is checked for one draw ``omega``. The compiler fixes the axes that random draws touch."""
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(RNG_SEED)
        out = model(*args, **kwargs)
    return [(name, x) for name, x in named_outputs(out) if isinstance(x, torch.Tensor)]


def _compared(spec: PermSpec, perm: Permutation | None, outs: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The outputs ``verify`` compares: those the spec keeps fixed as they are, and the free ones it typed
    (``spec.outputs``) gathered along their trees by ``perm`` (given for the outputs before the
    permutation: ``f(perm(theta))`` must equal ``perm(f(theta))``). Other free outputs are not compared."""
    keep = set(spec.info["fixed_outputs"]) if "fixed_outputs" in spec.info else None
    out = []
    for name, x in outs:
        trees = spec.outputs.get(name)
        if keep is None or name in keep:
            out.append(x)
        elif trees is not None and tuple(x.shape) == tuple(t.size(spec.sizes) for t in trees):
            out.append(x if perm is None else gather_axes(x, [
                axis_index(t, perm, spec.ctx, spec.sizes) if t.groups() else None for t in trees]))
    return out


def _promoted(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype,
              first: str | None = None) -> tuple[nn.Module, tuple, dict]:
    """The model's exported program as a module, every ``dtype=torch.float32`` argument in its
    graph replaced by ``dtype`` (and export's dtype assertions dropped), float32 parameters and
    buffers made ``dtype`` too; parameters keep their
    names, so the spec's permutation applies to its state dict. ``first``: the way of tracing to try first."""
    if args and kwargs:  # one form for export and the calls: keywords
        kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
        args = ()
    traced = trace(model, kwargs if kwargs else args, first=first)
    args, kwargs = traced.example  # as traced (an all-ones attention_mask may have been added)
    module = traced.exported.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if "assert_tensor_metadata" in str(node.target):
            graph.erase_node(node)
            continue
        node.args = tuple(dtype if a is torch.float32 else a for a in node.args)
        node.kwargs = {k: dtype if v is torch.float32 else v for k, v in node.kwargs.items()}
        if _float32_by_default(node):  # a factory without a dtype: float32 as torch's default dtype
            node.kwargs = {**node.kwargs, "dtype": dtype}
    module.recompile()
    with torch.no_grad():  # a float32 submodule of the float64 model (converted by its own forward)
        for t in [*module.parameters(), *module.buffers()]:
            if t.dtype == torch.float32:
                t.data = t.data.to(dtype)
        for node in graph.nodes:  # tensor constants the graph reads (neither parameters nor buffers)
            if node.op == "get_attr":
                owner, _, name = node.target.rpartition(".")
                sub = module.get_submodule(owner) if owner else module
                t = getattr(sub, name, None)
                if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dtype == torch.float32:
                    setattr(sub, name, t.to(dtype))
    return module, args, kwargs


def _float32_by_default(node: torch.fx.Node) -> bool:
    """Whether ``node`` makes a float32 tensor only because torch's default dtype is float32: an op
    with a ``dtype`` argument left unset (``torch.zeros(shape)`` in a float32 model, DAB-DETR's)."""
    schema = getattr(node.target, "_schema", None)
    val = node.meta.get("val")
    if schema is None or not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return False
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dtype":
            given = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get("dtype")
            return given is None
    return False


def _runnable_experts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The copy with transformers' ``batched_mm`` experts where its ``grouped_mm`` ones have no
    kernel for ``dtype`` (float64 on any device): the same function."""
    cfg = getattr(model, "config", None)
    if (getattr(cfg, "_experts_implementation", None) == "grouped_mm"
            and dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        model.set_experts_implementation("batched_mm")
    return model


def _cast(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, tuple):
        return tuple(_cast(y, dtype) for y in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def output_error(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |before - after|, max |before|)`` over the outputs. Entries at half the dtype's (at most
    float32's) largest magnitude or beyond are fill values (a mask's ``finfo.min``: Chameleon's logits of
    image tokens), not measurements: they must come out identical (else the error is infinite) and are
    left out of both figures, so that they neither set the scale nor hide an error in the real values."""
    abs_err, scale = 0.0, None
    for a, b in zip(before, after):
        if not a.numel():
            continue
        real = torch.ones(a.shape, dtype=torch.bool, device=a.device)
        floating = a.is_floating_point()  # float32's limit in float64 too (a float32 mask's fill, promoted)
        big = min(torch.finfo(a.dtype).max, torch.finfo(torch.float32).max) / 2 if floating else 0.0
        a, b = a.double(), b.double()
        if floating:
            fill = a.abs() >= big
            if not torch.equal(fill, b.abs() >= big) or not torch.equal(a[fill], b[fill]):
                return math.inf, 1.0
            real = ~fill
            if real.any():
                scale = max(scale or 0.0, float(a[real].abs().max()))
        if real.any():
            abs_err = max(abs_err, float((a[real] - b[real]).abs().max()))
    return abs_err, 1.0 if scale is None else scale


def verify(model: nn.Module, spec: PermSpec | None = None, example_inputs: ExampleInputs = None, *,
           seed: int = 0, dtype: torch.dtype = torch.float64, tolerance: float | None = None,
           permutation: Permutation | None = None, promote_float32: bool = False) -> VerifyReport:
    """Compare ``f(perm(theta))`` with ``f(theta)`` on the example inputs.

    The outputs the spec keeps fixed are compared as they are (all, unless it was compiled with
    ``outputs=``); the free ones it typed (``spec.outputs``) are compared permuted:
    ``f(perm(theta)) = perm(f(theta))``.
    Runs on a copy of the model cast to ``dtype`` (float64 by default); the model
    passed in is not modified. ``tolerance`` defaults to 1e-6 in float64 (transformers
    computes RMSNorm in float32 even in a float64 model) and 1e-4
    otherwise (relative to the largest output magnitude).

    ``promote_float32``: run the model's exported graph instead, with every cast to float32
    made a cast to ``dtype`` (float64). Models that compute norms or softmax in float32 inside
    a float64 model then compare to ~1e-13, so a symmetry that the 1e-6 tolerance would let
    through shows; the tolerance defaults to 1e-10 there.
    """
    if spec is None:
        spec = compile_spec(model, example_inputs)
    if example_inputs is None and spec.info.get("text_only_inputs"):  # the inputs it was compiled with
        example_inputs = default_example_inputs(model, modalities=False)
    elif example_inputs is None and spec.info.get("modalities") is not None:
        example_inputs = default_example_inputs(model, modalities=spec.info["modalities"])
    if any(p.is_meta for p in model.parameters()):
        raise InputError("verify needs real weights; this model is on the meta device")
    args, kwargs = resolve_inputs(model, example_inputs)
    traced_with = spec.info.get("traced_with")  # how compile traced it: verify's trace tries that first
    if promote_float32 and model_dtype(model) == torch.float32:  # traced as it runs (a float32-only model's
        ref_model = _runnable_experts(copy.deepcopy(model).eval(), dtype)  # forward may not trace in float64:
        ref_model, args, kwargs = _promoted(ref_model, args, kwargs, dtype, traced_with)  # OneFormer's), promoted
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    else:
        ref_model = _runnable_experts(copy.deepcopy(model).eval().to(dtype), dtype)
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        if promote_float32:
            ref_model, args, kwargs = _promoted(ref_model, args, kwargs, dtype, traced_with)
    perm = permutation if permutation is not None else spec.random_permutation(seed)
    before = _compared(spec, perm, _outputs(ref_model, args, kwargs))
    sd = ref_model.state_dict(keep_vars=False)
    permuted = apply_permutation(spec, perm, sd)
    ref_model.load_state_dict(permuted)
    if not all(bool(torch.isfinite(a).all()) for a in before if a.is_floating_point()):
        raise InputError("the model's outputs are not finite (NaN or inf) before any permutation, so a "
                         "permutation cannot be checked: check its weights and inputs")
    after = _compared(spec, None, _outputs(ref_model, args, kwargs))
    abs_err, scale = output_error(before, after)
    rel = abs_err / max(scale, 1e-30)
    tol = tolerance if tolerance is not None else (
        1e-4 if dtype != torch.float64 else 1e-10 if promote_float32 else 1e-6)
    return VerifyReport(abs_err, rel, scale, str(dtype).replace("torch.", ""), seed, len(spec.groups), tol)
