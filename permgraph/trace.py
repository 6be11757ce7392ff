"""Tracing a model into an exported graph, with example inputs derived when possible."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from permgraph.errors import TraceError
from permgraph.infer.engine import GraphInput

ExampleInputs = tuple | dict | torch.Tensor | None


@dataclass
class Traced:
    graph: Any  # torch.fx.Graph
    inputs: dict[str, GraphInput]
    param_shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    output_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    exported: Any = None  # torch.export.ExportedProgram


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (derived float inputs use it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# keyword flags of transformers models set False while tracing: a returned KV cache (``use_cache``)
# or XLNet's memory (``use_mems``) is state for generation, not an output of the function
_OFF_WHILE_TRACING = ("use_cache", "use_mems")


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs derived from a transformers model's config (no tokenizer or hub needed)."""
    if not is_transformers_model(model):
        raise TraceError(
            f"{type(model).__name__} is not a transformers model, so permgraph cannot guess its inputs. "
            "Pass example_inputs: a tuple of positional arguments or a dict of keyword arguments, "
            "e.g. pg.compile(model, (torch.randn(2, 16, 64),)) or, on the command line, a factory "
            "'module:function' that returns (model, example_inputs).")
    cfg = model.config
    dev = model_device(model)
    dtype = model_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    out: dict[str, torch.Tensor] = {}

    def sub(name: str):
        return getattr(cfg, name, None) or cfg

    if "input_ids" in params and model.main_input_name != "pixel_values":
        tcfg = sub("text_config")
        vocab = getattr(tcfg, "vocab_size", None) or getattr(cfg, "vocab_size", 100)
        out["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    if "pixel_values" in params:
        vcfg = sub("vision_config")
        size = getattr(vcfg, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(vcfg, "num_channels", 3)
        out["pixel_values"] = torch.randn(batch, ch, size, size, generator=gen).to(dev, dtype)
        if "input_ids" in out and _token_id(cfg, "image") is not None:
            _with_image_tokens(model, out, batch, gen)
    if ("input_features" in params and model.main_input_name != "input_features" and "input_ids" in out
            and _token_id(cfg, "audio") is not None):  # audio-language models: the audio tower in the forward
        _with_modality_tokens(model, out, batch, "audio", getattr(model, "get_audio_features", None),
                              _audio_inputs(model, batch, gen), check_forward=True)
    if "input_values" in params and model.main_input_name == "input_values":  # raw audio
        out["input_values"] = torch.randn(batch, 1024, generator=gen).to(dev, dtype)
    if "input_features" in params and model.main_input_name == "input_features":  # spectrogram frames
        mels = getattr(cfg, "num_mel_bins", None) or getattr(cfg, "feature_size", None) or 80
        frames = 2 * getattr(cfg, "max_source_positions", 0) or 64
        out["input_features"] = torch.randn(batch, mels, frames, generator=gen).to(dev, dtype)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        out["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (batch, seq // 2), generator=gen).to(dev)
    for flag in _OFF_WHILE_TRACING:
        if flag in params:
            out[flag] = False
    if not out:
        raise TraceError(f"cannot derive example inputs for {type(model).__name__}: pass example_inputs")
    return out


def _token_id(cfg: Any, kind: str) -> int | None:
    """The placeholder token id of a modality (``image_token_id`` / ``image_token_index``)."""
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _image_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate image inputs of a vision-language model, most common layout first: one image per
    sample ``(batch, C, S, S)``; anyres tiles with ``image_sizes`` (LLaVA-NeXT); flattened patches with
    ``image_grid_thw`` (Qwen-VL)."""
    cfg = model.config
    vcfg = getattr(cfg, "vision_config", None) or cfg
    dev, dtype = model_device(model), model_dtype(model)
    params = inspect.signature(model.forward).parameters
    ch = getattr(vcfg, "num_channels", None) or getattr(vcfg, "in_channels", None) or 3
    size = getattr(vcfg, "image_size", None)
    size = size if isinstance(size, int) or size is None else size[0]
    patch = getattr(vcfg, "patch_size", None)
    patch = patch if isinstance(patch, int) or patch is None else patch[0]
    if "image_grid_thw" in params and patch:
        merge = getattr(vcfg, "spatial_merge_size", 1) or 1
        tp = getattr(vcfg, "temporal_patch_size", 1) or 1
        side = 2 * merge
        yield {"pixel_values": torch.randn(batch * side * side, ch * tp * patch * patch, generator=gen).to(dev, dtype),
               "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=dev)}
        return
    if size is None:
        return
    if "image_sizes" in params:
        num_patches = getattr(inspect.getmodule(type(model)), "image_size_to_num_patches", None)
        pinpoints = getattr(cfg, "image_grid_pinpoints", None)
        if num_patches is not None and pinpoints:
            n = num_patches((size, size), pinpoints, size)
            # a list, not a tensor: the number of tiles is computed from it in Python, which export
            # cannot do from tensor values
            yield {"pixel_values": torch.randn(batch, n, ch, size, size, generator=gen).to(dev, dtype),
                   "image_sizes": [[size, size]] * batch}
    yield {"pixel_values": torch.randn(batch, ch, size, size, generator=gen).to(dev, dtype)}


def _feature_count(feats: Any) -> int:
    """How many embedding vectors ``get_image_features``/``get_audio_features`` returned (a tensor,
    a list of tensors, or a model output whose ``pooler_output`` holds them)."""
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    elif hasattr(feats, "last_hidden_state") and not isinstance(feats, torch.Tensor):
        feats = feats.last_hidden_state
    if isinstance(feats, torch.Tensor):
        return feats.numel() // feats.shape[-1]
    if isinstance(feats, (list, tuple)):
        return sum(_feature_count(f) for f in feats)
    raise TypeError(f"features of type {type(feats).__name__}")


def _with_image_tokens(model: nn.Module, out: dict[str, Any], batch: int, gen: torch.Generator) -> None:
    """Image inputs for a vision-language model, with as many image tokens in ``input_ids`` as the
    vision tower yields features, so that the vision tower is in the traced forward. Leaves ``out``
    as it is when no candidate layout works."""
    tok = _token_id(model.config, "image")
    if (_with_modality_tokens(model, out, batch, "image", getattr(model, "get_image_features", None),
                              _image_inputs(model, batch, gen))
            and "mm_token_type_ids" in inspect.signature(model.forward).parameters):
        out["mm_token_type_ids"] = (out["input_ids"] == tok).long()  # Qwen-VL's M-RoPE: 1 = image


def _audio_inputs(model: nn.Module, batch: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """Candidate audio inputs of an audio-language model: log-mel frames ``(batch, mels, frames)``
    (Whisper-style towers want ``2 * max_source_positions`` frames) and an all-ones frame mask."""
    cfg = model.config
    acfg = getattr(cfg, "audio_config", None) or getattr(cfg, "encoder_config", None) or cfg
    mels = getattr(acfg, "num_mel_bins", None) or getattr(acfg, "feature_size", None) or 128
    params = inspect.signature(model.forward).parameters
    mask = next((m for m in ("input_features_mask", "feature_attention_mask") if m in params), None)
    dtype = model_dtype(model)
    for frames in dict.fromkeys([2 * (getattr(acfg, "max_source_positions", 0) or 0), 3000, 400, 64]):
        if not frames:
            continue
        cand: dict[str, Any] = {"input_features": torch.randn(batch, mels, frames, generator=gen).to(
            model_device(model), dtype)}
        if mask is not None:
            cand[mask] = torch.ones(batch, frames, dtype=torch.long, device=model_device(model))
        yield cand


def _with_modality_tokens(model: nn.Module, out: dict[str, Any], batch: int, kind: str, get: Any,
                          candidates: Iterator[dict[str, Any]], check_forward: bool = False) -> bool:
    """The first candidate input whose features ``get`` computes, with that many ``kind`` tokens
    per sample spliced into ``input_ids`` (other special tokens in the random text replaced);
    with ``check_forward``, only if the model's forward accepts the result. Whether ``out`` changed."""
    if get is None:
        return False
    cfg = model.config
    tok = _token_id(cfg, kind)
    accepts = inspect.signature(get).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
    for cand in candidates:
        try:
            with torch.no_grad():
                n = _feature_count(get(**{k: v for k, v in cand.items() if takes_all or k in accepts}))
        except Exception:  # noqa: BLE001 - this layout does not fit the model: try the next
            continue
        if n % batch:
            continue
        text = out["input_ids"]
        special = {v for k, v in vars(cfg).items() if isinstance(v, int) and not isinstance(v, bool)
                   and (k.endswith("token_id") or k.endswith("token_index")) and k != "pad_token_id"}
        safe = next(i for i in range(int(text.max()) + len(special) + 2) if i not in special)
        text = torch.where(torch.isin(text, torch.tensor(sorted(special), device=text.device)), safe, text)
        placeholders = torch.full((batch, n // batch), tok, dtype=text.dtype, device=text.device)
        trial = {**out, "input_ids": torch.cat([text[:, :1], placeholders, text[:, 1:]], dim=1), **cand}
        if check_forward:  # audio towers differ in how they count tokens: keep what the forward accepts
            try:
                with torch.no_grad():
                    model(**trial)
            except Exception:  # noqa: BLE001 - text-only inputs then, as before
                return False
        out.update(trial)
        return True
    return False


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional arguments or a dict of keyword "
                     f"arguments, not {type(example_inputs).__name__}")


def resolve_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return split_inputs(default_example_inputs(model))
    args, kwargs = split_inputs(example_inputs)
    if is_transformers_model(model):
        params = inspect.signature(model.forward).parameters
        for flag in _OFF_WHILE_TRACING:
            if flag in params:
                kwargs.setdefault(flag, False)
    return args, kwargs


def trace(model: nn.Module, example_inputs: ExampleInputs = None) -> Traced:
    """Export ``model`` (eval, no grad; non-strict first, strict as fallback)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = resolve_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    errors = []
    caches = _cache_off(model)
    try:
        for strict in (False, True):
            try:
                with torch.no_grad():
                    ep = torch.export.export(model, args, kwargs, strict=strict)
                break
            except Exception as e:  # noqa: BLE001 - any tracing failure is reported below
                errors.append((strict, e))
        else:
            strict, e = errors[0]
            raise TraceError(
                f"torch.export could not trace {type(model).__name__} (non-strict and strict both failed).\n"
                f"  {_failure_summary(e)}\n"
                "  what to try: check that example_inputs match forward()'s signature; remove "
                "data-dependent Python control flow or make it static; for transformers models try "
                "attn_implementation='sdpa' or 'eager'.") from e
    finally:
        model.train(was_training)
        for cfg, old in caches:
            cfg.use_cache = old
    return _collect(model, ep, strict)


def _cache_off(model: nn.Module) -> list:
    """Turn ``config.use_cache`` off (and in sub-configs) while tracing: a returned KV cache is not a
    tensor output export can handle. Returns what to restore."""
    cfg = getattr(model, "config", None)
    if cfg is None or not is_transformers_model(model):
        return []
    out = []
    for c in [cfg] + [v for v in vars(cfg).values() if hasattr(v, "use_cache") and hasattr(v, "to_dict")]:
        if getattr(c, "use_cache", False):
            out.append((c, c.use_cache))
            try:
                c.use_cache = False
            except Exception:  # noqa: BLE001 - frozen configs
                out.pop()
    return out


def _failure_summary(e: Exception) -> str:
    """The error's first line and the user's call that raised it, when torch names it."""
    lines = [ln for ln in str(e).splitlines()]
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    out = f"{type(e).__name__}: {first[:300]}"
    for i, ln in enumerate(lines):
        if "The following call raised this error" in ln:
            call = " | ".join(x.strip() for x in lines[i + 1:i + 3] if x.strip())
            out += f"\n  failing call: {call}"
            break
    return out


def _collect(model: nn.Module, ep, strict: bool) -> Traced:
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant"}
    inputs: dict[str, GraphInput] = {}
    state = {n: tuple(b.shape) for n, b in model.named_buffers()
             if b.is_floating_point() and n in model.state_dict(keep_vars=True)}
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        kind = kinds.get(spec.kind, "input")
        if kind == "buffer" and spec.target in state:  # in the state dict: permuted along with parameters
            kind = "state"
        inputs[name] = GraphInput(kind, spec.target if spec.target is not None else name)
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    aliases = {n: names[0] for names in by_id.values() for n in names[1:]}
    for key, inp in inputs.items():  # tied parameters may be lifted once per name
        if inp.kind == "parameter" and inp.name in aliases:
            inputs[key] = GraphInput("parameter", aliases[inp.name])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({i.name: state[i.name] for i in inputs.values() if i.kind == "state"})
    info = {"model": type(model).__name__, "torch": torch.__version__, "strict": strict}
    _drop_dead_code(ep)
    _constant_ranges_as_slices(ep)
    return Traced(ep.graph, inputs, shapes, aliases, _output_names(ep), info, ep)


def _drop_dead_code(ep) -> None:
    """Remove calls whose results nothing uses (BART's ``inputs_embeds[:, :, -1]``, read only for its
    shape): they constrain nothing, and left in they would fix what they index. Calls with side
    effects (in-place writes, asserts) stay (``torch.fx.Node.is_impure``), and so does dead work that
    reads weights (a pooler whose output a task head drops): it keeps those weights moving with
    their layer instead of leaving them fixed as unused."""
    sig = ep.graph_signature
    weights = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    live: set = set()
    for node in reversed(ep.graph.nodes):
        if node.op in ("placeholder", "output") or any(u in live for u in node.users):
            live.add(node)
            continue
        try:
            if node.is_impure():
                live.add(node)
        except Exception:  # noqa: BLE001 - purity unknown: keep it
            live.add(node)
    reads_weights: set = set()
    for node in reversed(ep.graph.nodes):
        if node not in live and (any(a.name in weights for a in node.all_input_nodes if a.op == "placeholder")
                                 or any(u in reads_weights for u in node.users)):
            reads_weights.add(node)
    dead = [n for n in reversed(ep.graph.nodes) if n not in live and n not in reads_weights]
    for node in dead:
        ep.graph.erase_node(node)
    if dead:
        ep.graph_module.recompile()


_VALUE_KEEPING = ("lift_fresh_copy", "clone", "_to_copy", "to", "alias", "detach")


def _constant_ranges_as_slices(ep) -> None:
    """``x[..., [k, k+1, ...], ...]`` with a constant index of consecutive positions is the slice
    ``x[..., k:k+m, ...]`` (Falcon's multi-query ``fused_qkv[..., [-2], :]``): rewritten so that the
    slice rule keeps the other positions free instead of the index rule fixing the whole axis."""
    from torch.export.graph_signature import InputKind

    consts = {}
    names = {s.arg.name: s.target for s in ep.graph_signature.input_specs
             if s.kind == InputKind.CONSTANT_TENSOR and getattr(s.arg, "name", None)}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names and names[node.name] in ep.constants:
            consts[node] = ep.constants[names[node.name]]
        elif (node.op == "call_function" and node.args and node.args[0] in consts
              and getattr(getattr(node.target, "overloadpacket", None), "__name__", "") in _VALUE_KEEPING):
            consts[node] = consts[node.args[0]]
    changed = False
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.index.Tensor:
            continue
        x, idxs = node.args[0], node.args[1]
        pos = [i for i, v in enumerate(idxs) if v is not None]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if len(pos) != 1 or idxs[pos[0]] not in consts or not isinstance(val, torch.Tensor):
            continue
        dim, idx = pos[0], consts[idxs[pos[0]]]
        try:
            n = int(val.shape[dim])
        except Exception:  # noqa: BLE001 - a size known only at run time
            continue
        if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
            continue
        v = [int(i) % n for i in idx.tolist()]
        if v != list(range(v[0], v[0] + len(v))):
            continue
        with ep.graph.inserting_before(node):
            new = ep.graph.call_function(torch.ops.aten.slice.Tensor, (x, dim, v[0], v[0] + len(v), 1))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
        changed = True
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()


def _path_name(path) -> str:
    parts = []
    for k in path:
        attr = next((a for a in ("key", "idx", "name") if hasattr(k, a)), None)
        parts.append(str(getattr(k, attr)) if attr else str(k))
    return ".".join(parts) or "output"


def named_outputs(out: Any) -> list[tuple[str, Any]]:
    """A model's outputs flattened, with the names ``compile(outputs=...)`` uses."""
    from torch.utils._pytree import tree_flatten_with_path  # noqa: PLC2701 - torch's pytree API

    return [(_path_name(p), x) for p, x in tree_flatten_with_path(out)[0]]


def _output_names(ep) -> list[str]:
    """Names of the flattened outputs: 'logits', '[0]', 'encoder_last_hidden_state', ..."""
    from torch.utils._pytree import tree_unflatten  # noqa: PLC2701 - torch's pytree API

    spec = ep.call_spec.out_spec
    if spec is None:
        return []
    tree = tree_unflatten(list(range(spec.num_leaves)), spec)
    names = [""] * spec.num_leaves
    for name, leaf in named_outputs(tree):
        names[leaf] = name
    return names
