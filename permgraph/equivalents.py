"""Same-function forms of a transformers model for tracing.

Each is a context manager that swaps, for the block, a part torch.export cannot trace (a loop over
the experts hit, SDPA's per-chunk ``is_causal``, helpers that compute sizes from values with Python
loops) for one that computes the same function, and yields what it replaced (False where it does
not apply); everything is restored afterwards. ``permgraph.trace`` tries them in turn.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.errors import TraceError
from permgraph.inputs import is_transformers_model, modeling_helpers, recorded


def with_all_ones_mask(model: nn.Module, kwargs: dict) -> dict | None:
    """The inputs plus an all-ones ``attention_mask``, what a transformers model assumes when it gets
    none: some build that default only outside ``torch.compile``/export (LongT5's block split then
    reads a None mask)."""
    ids = kwargs.get("input_ids")
    if (not isinstance(ids, torch.Tensor) or kwargs.get("attention_mask") is not None
            or "attention_mask" not in inspect.signature(model.forward).parameters):
        return None
    return {**kwargs, "attention_mask": torch.ones_like(ids)}


@contextlib.contextmanager
def switched(model: nn.Module, kind: str, value: str, can: Any):
    """A transformers model's ``kind`` implementation ("attn", "experts") switched to ``value`` for
    the block (``model.set_<kind>_implementation``) when ``can(model)``; yields the one it replaced,
    or False when it does not apply. Every (sub)config is restored as it was: a composite model may
    mix implementations."""
    attr = f"_{kind}_implementation"
    old = getattr(getattr(model, "config", None), attr, None)
    switch = getattr(model, f"set{attr}", None)
    if old in (None, value) or switch is None or not can(model):
        yield False
        return
    configs = {id(c): (c, getattr(c, attr)) for m in model.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, attr + "_internal")}
    try:
        switch(value)
    except Exception:  # noqa: BLE001 - not supported by this model
        yield False
        return
    try:
        yield old if getattr(model.config, attr) == value else False
    finally:
        for c, v in configs.values():
            setattr(c, attr + "_internal", v)


def batched_experts(model: nn.Module):
    """A transformers MoE's experts (eager, grouped_mm, ...) as ``batched_mm`` for the block."""
    can = getattr(model, "_can_set_experts_implementation", None)
    return switched(model, "experts", "batched_mm", lambda m: callable(can) and can() and any(
        "has_gate" in vars(e) and "is_concatenated" in vars(e) for e in m.modules()))  # experts present


class ConvertsItself(Exception):
    """Raised from ``Module.to`` inside an export when the call would convert real parameters."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        super().__init__(f"{type(module).__name__}.to{args!r} inside forward")
        self.module, self.args, self.kwargs = module, args, kwargs


@contextlib.contextmanager
def unchanged_to():
    """``Module.to`` that returns the module when nothing would change, and raises
    ``ConvertsItself`` when something would (real parameters cannot be converted under export)."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if memory_format is None and all(
                (device is None or t.device == torch.device(device))
                and (dtype is None or t.dtype == dtype or not (t.is_floating_point() or t.is_complex()))
                for t in tensors):
            return self
        raise ConvertsItself(self, args, kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def _looped_experts(m: nn.Module) -> str | None:
    """Which of transformers' eager expert loops ``m`` runs (``for expert in nonzero(hit): ...
    index_add_``, data-dependent sizes), by its forward's parameters and its weights: "bank" (stacked
    ``gate_up_proj (E', 2I, H)``, ``down_proj (E, H, I)``, top-k indices and weights; ids past the
    banks are zero-compute identity experts where the module declares ``zero_expert_num``), "glu"
    (DBRX: ``mlp.w1``, ``mlp.v1``, ``mlp.w2`` flat ``(E * I, H)``), "dict" (``expert_0 ... expert_{E-1}``
    modules and a ``(tokens, 1, E)`` dispatch mask); else None."""
    forward = getattr(type(m), "forward", None)
    try:
        source = inspect.getsource(forward)
        names = list(inspect.signature(forward).parameters)[1:]
    except (OSError, TypeError, ValueError):
        return None
    if "nonzero(" not in source or "index_add_" not in source or "has_gate" in vars(m):
        return None
    if names[:3] == ["hidden_states", "top_k_index", "top_k_weights"] and _glu_bank(m):
        return "glu"
    if names[:3] == ["hidden_states", "top_k_index", "top_k_weights"]:
        gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3
                and gu.shape[0] >= down.shape[0] and gu.shape[1] == 2 * down.shape[2]
                and gu.shape[2] == down.shape[1] and callable(getattr(m, "act_fn", None))):
            return None
        zero = getattr(m, "zero_expert_num", 0) or 0
        total = getattr(m, "total_experts", down.shape[0])
        return "bank" if total == down.shape[0] + zero else None
    if names[:3] == ["hidden_states", "selected_experts", "routing_weights"] and isinstance(m, nn.ModuleDict):
        n = len(m)
        return "dict" if n and all(f"expert_{i}" in m for i in range(n)) else None
    return None


def _dense_bank(self, hidden_states, top_k_index, top_k_weights):
    """The "bank" loop as transformers' batched experts (each token-slot gathers its expert's rows),
    with ids past the banks as identity experts: the same function without data-dependent sizes."""
    n = self.down_proj.shape[0]
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1, 1)
    routed = ids < n
    safe = torch.where(routed, ids, torch.zeros_like(ids))
    x = hidden_states.repeat_interleave(k, dim=0)
    gate, up = torch.bmm(self.gate_up_proj[:n][safe], x.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
    y = torch.bmm(self.down_proj[safe], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
    y = torch.where(routed.unsqueeze(-1), y, x) * weights
    return y.view(hidden_states.shape[0], k, -1).sum(dim=1).to(hidden_states.dtype)


def _glu_bank(m: nn.Module) -> bool:
    """DBRX's experts: ``m.mlp`` holds ``w1``, ``v1``, ``w2``, each ``(E * I, H)`` (expert-major), and
    ``act(x w1_e^T) * (x v1_e^T)) w2_e`` is expert ``e``."""
    mlp = getattr(m, "mlp", None)
    e, i, h = (getattr(m, k, None) for k in ("num_experts", "ffn_hidden_size", "hidden_size"))
    ws = [getattr(mlp, k, None) for k in ("w1", "v1", "w2")]
    return (all(isinstance(v, int) for v in (e, i, h)) and callable(getattr(mlp, "activation_fn", None))
            and all(isinstance(w, torch.Tensor) and tuple(w.shape) == (e * i, h) for w in ws))


def _dense_glu(self, hidden_states, top_k_index, top_k_weights):
    """The "glu" loop (DBRX) as batched experts: each token-slot gathers its expert's rows of the
    three ``(E, I, H)`` views; the same function without data-dependent sizes."""
    shape = (-1, self.ffn_hidden_size, self.hidden_size)
    x = hidden_states.reshape(-1, self.hidden_size)
    k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)
    w1, v1, w2 = (getattr(self.mlp, n).view(shape)[ids] for n in ("w1", "v1", "w2"))
    h = self.mlp.activation_fn(torch.bmm(w1, xs).squeeze(-1)) * torch.bmm(v1, xs).squeeze(-1)
    y = torch.bmm(h.unsqueeze(1), w2).squeeze(1) * top_k_weights.reshape(-1, 1)
    return y.view(x.shape[0], k, -1).sum(dim=1).view(hidden_states.shape[0], -1, self.hidden_size)


def _dense_dict(self, hidden_states, selected_experts, routing_weights):
    """The "dict" loop densely: every expert on every token, weighted where the mask selects it."""
    out = torch.zeros_like(hidden_states)
    for i in range(len(self)):
        picked = selected_experts[:, :, i] != 0  # (tokens, slots)
        w = torch.where(picked, routing_weights, torch.zeros_like(routing_weights)).sum(dim=1, keepdim=True)
        out = out + (self[f"expert_{i}"](hidden_states) * w).to(hidden_states.dtype)
    return out


@contextlib.contextmanager
def dense_experts(model: nn.Module):
    """transformers' eager expert loops (``_looped_experts``) computed densely for the block; yields
    the kinds replaced, or False where the model has none."""
    found = [(m, kind) for m in model.modules() if (kind := _looped_experts(m))]
    if not found:
        yield False
        return
    for m, kind in found:
        m.forward = {"bank": _dense_bank, "glu": _dense_glu, "dict": _dense_dict}[kind].__get__(m)
    try:
        yield ", ".join(sorted({f"{type(m).__name__}: {kind}" for m, kind in found}))
    finally:
        for m, _ in found:
            del m.forward


@contextlib.contextmanager
def distribution_checks_off() -> Iterator[None]:
    """``torch.distributions``' argument checks off for the block (``Distribution._validate_args``,
    torch's default on): a check tests values (``if not constraint.check(logits).all(): raise``), a
    data-dependent branch export cannot take, and it raises or not without changing any value (BLT's
    ``Categorical(logits=...).entropy()``). A distribution built with ``validate_args=True`` keeps its own."""
    from torch.distributions import Distribution

    old = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(old)


def _scalar_constants(m: nn.Module) -> dict[str, torch.Tensor]:
    """``m``'s own integer or boolean buffers of one element that its state dict does not hold
    (non-persistent): constants of the architecture set at construction (a conv's stride and padding)."""
    return {k: b for k, b in m._buffers.items()
            if b is not None and k in m._non_persistent_buffers_set and b.numel() == 1
            and not (b.is_floating_point() or b.is_complex())}


@contextlib.contextmanager
def scalar_buffers_as_literals(model: nn.Module):
    """``_scalar_constants`` read as literal tensors (``torch.tensor(value)``) for the block: export
    knows a literal's value, so padding computed from a stride buffer (EnCodec, Mimi, WavTokenizer:
    ``ceil((length - kernel + total) / stride)``) stays a static size; a lifted buffer's value is a
    data-dependent unknown. The same function while the forward does not write them (the caller keeps
    the graph only if it gives the model's outputs, ``trace._reproduces``). Each module holding some
    gets, for the block, a subclass of its class whose properties of those names make the literals;
    yields how many buffers, or False where there are none."""
    swapped: list[tuple[nn.Module, type]] = []
    n = 0
    try:
        for m in model.modules():
            found = _scalar_constants(m)
            if not found:
                continue
            n += len(found)
            cls = type(m)
            literals: dict[str, Any] = {
                k: property(lambda _self, v=b.tolist(), d=b.dtype, dev=b.device: torch.tensor(v, dtype=d, device=dev))
                for k, b in found.items()}
            m.__class__ = type(cls.__name__, (cls,), {**literals, "__module__": cls.__module__,
                                                        "__qualname__": cls.__qualname__})
            swapped.append((m, cls))
        yield f"{n} integer buffer{'s' * (n > 1)} of one element" if n else False
    finally:
        for m, cls in swapped:
            m.__class__ = cls


# transformers' helpers that compute sizes from an input's values with Python loops (``cu_seqlens`` of
# Qwen3-ASR's attention windows from the frame mask; ``transformers.vision_utils``' windows, positions and
# merged shapes from the image grid, MiniCPM-V's) and that the forward calls with no way to pass their
# results in (``get_audio_features``/``get_image_features`` are called without the forward's keyword arguments)
_REPLAYED_HELPERS = ("get_audio_cu_seqlens", *(f"get_vision_{h}" for h in (
    "window_index", "merged_shape", "nearest_position_ids", "cu_seqlens", "attention_seqlens", "position_ids")))


@contextlib.contextmanager
def replayed_helpers(model: nn.Module, args: tuple, kwargs: dict):
    """The helpers of ``_REPLAYED_HELPERS`` that the model's modeling modules call, recorded in one eager
    forward on the example inputs and replaced by their results (in call order) for the block, with
    eager attention (SDPA decides ``is_causal`` from each window's length); yields what was replaced, or
    False where no such helper runs. The graph is specialised to those results: the caller keeps it only
    if it gives the model's outputs on the example inputs (``_reproduces``)."""
    found = modeling_helpers(model, _REPLAYED_HELPERS,
                             {type(m).__module__ for m in model.modules()} | {"transformers.vision_utils"})
    if not found or not is_transformers_model(model):
        yield False
        return
    calls: dict[str, list] = {}

    def replay(name: str) -> Any:
        results = iter(calls[name])

        def again(*_a: Any, **_k: Any) -> Any:
            res = next(results, None)
            if res is None:
                raise TraceError(f"{name} called more often than in the eager forward")
            return res
        return again

    try:
        try:
            with recorded(found) as calls, torch.no_grad():
                model(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the forward does not run on these inputs: nothing to replay
            calls = {}
        for space, name, fn in found:
            space[name] = replay(name) if name in calls else fn
        if not calls:
            yield False
            return
        with eager_attention(model):
            yield ", ".join(f"{name} ({len(v)} call{'s' * (len(v) > 1)})" for name, v in sorted(calls.items()))
    finally:
        for space, name, fn in found:
            space[name] = fn


def eager_attention(model: nn.Module):
    """A transformers model's attention as ``eager`` for the block (the same function; SDPA decides
    ``is_causal`` from each chunk's length, data-dependent in a vision tower that attends per image)."""
    return switched(model, "attn", "eager", is_transformers_model)


@contextlib.contextmanager
def returned_caches_dropped(model: nn.Module) -> Iterator[None]:
    """The forward's returned KV caches (transformers ``Cache`` objects in its ``ModelOutput``) left out
    for the block: state that export cannot flatten, not an output of the function (a forward whose
    encoder hands its decoder a cache returns it whatever ``use_cache`` says: ``cache_off``)."""
    from transformers.cache_utils import Cache
    from transformers.utils import ModelOutput

    forward = model.forward

    @functools.wraps(forward)
    def without_caches(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        if isinstance(out, ModelOutput) and any(isinstance(v, Cache) for v in out.values()):
            return type(out)(**{k: v for k, v in out.items() if not isinstance(v, Cache)})
        return out

    had = "forward" in vars(model)
    model.forward = without_caches
    try:
        yield
    finally:
        if had:
            model.forward = forward
        else:
            del model.forward


class BoolMasksAsIndices(torch.overrides.TorchFunctionMode):
    """``x[mask]`` (and ``x[mask] = v``) with a boolean tensor among the indices computed as
    ``x[nz[:, 0], ..., nz[:, k-1]]`` with ``nz = mask.nonzero()``, PyTorch's own definition of boolean
    indexing, and ``mask.nonzero(as_tuple=True)`` (``torch.where(mask)``) as those columns, for the
    block. ``draft_export`` (torch 2.13) cannot bind the size of a boolean mask's result or of the
    tuple's tensors (``PendingUnbackedSymbolNotFound``) but can that of ``nonzero``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) >= 2:
            items = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() for i in items):
                return func(args[0], tuple(_as_integer_indices(items)), *args[2:], **kwargs)
        if ((func in (torch.nonzero, torch.Tensor.nonzero) and kwargs.get("as_tuple") and len(args) == 1
             or func is torch.where and len(args) == 1 and not kwargs)
                and isinstance(args[0], torch.Tensor) and args[0].dim()):
            return _nonzero_columns(args[0])
        return func(*args, **kwargs)


def _nonzero_columns(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``mask.nonzero(as_tuple=True)``, computed as the columns of ``mask.nonzero()``."""
    nz = torch.nonzero(mask)
    return tuple(nz[:, k] for k in range(mask.dim()))


def _as_integer_indices(items: tuple) -> Iterator[Any]:
    for i in items:
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim():
            yield from _nonzero_columns(i)
        else:
            yield i


def cache_off(model: nn.Module) -> list:
    """Turn ``config.use_cache`` off (and in sub-configs and submodules' configs) while tracing: a
    returned KV cache is not a tensor output export can handle. Returns what to restore."""
    cfg = getattr(model, "config", None)
    if cfg is None or not is_transformers_model(model):
        return []
    out = []
    configs = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "use_cache") and hasattr(v, "to_dict")]
    configs += [c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")
                and hasattr(c, "to_dict")]  # a copy of its own (Switch Transformers' decoder)
    for c in {id(c): c for c in configs}.values():
        if getattr(c, "use_cache", False):
            out.append((c, c.use_cache))
            try:
                c.use_cache = False
            except Exception:  # noqa: BLE001 - frozen configs
                out.pop()
    return out
