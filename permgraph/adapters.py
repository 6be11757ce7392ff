"""LoRA adapters carried to a new base release, as adapters.

A LoRA adapter on a base weight ``W`` adds ``dW = s * B_l @ A_l`` (``s = lora_alpha / r``,
or ``lora_alpha / sqrt(r)`` with rsLoRA). In ``nn.Linear`` layout (``W`` is out x in) the
alignment ``pi`` acts on ``W`` by gathering its axes, ``pi(W) = W[p_out][:, p_in]``, so::

    pi(dW) = s * (B_l[p_out]) @ (A_l[:, p_in])        # P_out dW P_in^T = (P_out B_l)(A_l P_in^T)

and the adapter stays an adapter of the same rank for release B: ``lora_B <- lora_B[p_out]``,
``lora_A <- lora_A[:, p_in]``. No merge, no data, no training. ``p_out`` and ``p_in`` are the
spec's gather indices of ``W``'s axes (``permutation.axis_index``), so heads, within-head
units, GQA and fused projections move exactly as they do for the full weight; an axis the
spec fixes (a vocabulary, RoPE's order) keeps its factor as it is. GPT-2's ``Conv1D`` (``W``
stored in x out, PEFT's ``fan_in_fan_out``) and embeddings (``lora_embedding_A`` is r x
vocab, ``lora_embedding_B`` is dim x r) read ``W``'s axes the other way round.

What else an adapter may hold moves with the base parameter it belongs to: DoRA magnitudes
(one per output unit: ``p_out``), ``lora_B`` biases (``lora_bias=True``: ``p_out``), trained
biases (``bias="all"``/``"lora_only"``) and ``modules_to_save`` copies (whole parameters:
permuted on every axis). These are full values, not deltas: without the bases they are
carried as ``pi(X)``; given ``base_a`` and ``base_b`` they are re-based like a task vector,
``B + alpha * pi(X - A)`` (DoRA magnitudes: ``|W_B| + pi(m - |W_A|)``, row norms). Frozen
copies of base weights that PEFT saves with embedding adapters are A's weights: they are
dropped (B's own are used) unless both bases are given.

Refused with an ``AdapterError``, before anything is written: PEFT types other than LoRA
(IA3, LoHa, LoKr, AdaLoRA, prompt/prefix tuning, ...), LoRA options whose tensors have no
rule here (trainable tokens, target_parameters, layer replication, QALoRA, ...), LoRA on
convolutions and ``nn.MultiheadAttention``, adapters that do not fit A (shape or module
mismatch), non-finite values, soft or non-function-preserving alignments, an existing output.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn as nn

from permgraph.align import ModelLike, check_compatible, state_of
from permgraph.alignment import Alignment
from permgraph.errors import FormatError, InputError
from permgraph.ir import Permutation
from permgraph.loading import untie
from permgraph.permutation import axis_index, check_permutation, permute_tensor
from permgraph.spec import PermSpec
from permgraph.transport import Alpha, alpha_for, check_alpha, wide

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

AdapterLike = Union[str, os.PathLike, tuple]  # a PEFT adapter folder, or (config, state dict)

# LoRA options whose tensors (or meaning) have no rule here; each is refused when set.
_REFUSED_OPTIONS = {
    "trainable_token_indices": "trainable token rows (trainable_token_indices)",
    "target_parameters": "LoRA on bare parameters (target_parameters, e.g. MoE experts)",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA (pooled lora_A inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron-parallel LoRA layers",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# Layouts: which axis of the base weight W the output units and the input units are on.
_AXES = {"linear": (0, 1), "conv1d": (1, 0), "embedding": (1, 0)}

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
_WRAPPERS = ("base_layer", "original_module", "modules_to_save")


class AdapterError(InputError):
    """An adapter that cannot be carried; the message names the problem and the fix."""


@dataclass
class TransportedAdapter:
    """One carried adapter.

    ``state``: the adapter's tensors in B's frame (same keys as the input, minus dropped
    base-weight copies), or with ``merge=True`` B's whole state dict with the update merged.
    ``config``: the output's ``adapter_config`` (``base_model_name_or_path`` = ``base_new``).
    ``targets``: adapted module -> the base parameter whose axes its factors follow.
    ``kept``: adapter key -> why it is carried unchanged (the spec fixes the axes it lives on).
    """

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    merged: bool = False
    out: Path | None = None
    targets: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- reading and writing -------------------------------------------------------------------

def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state dict)`` of a PEFT adapter folder (``adapter_config.json`` plus
    ``adapter_model.safetensors`` or ``adapter_model.bin``), keys as PEFT saves them."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder: pass a PEFT adapter folder "
                           f"({CONFIG_FILE} + {WEIGHTS_FILE}), as written by save_pretrained")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{cfg_path} is not valid JSON ({e}); is the file complete?") from None
    if not isinstance(config, dict):
        raise FormatError(f"{cfg_path} does not hold a JSON object")
    st, bin_ = folder / WEIGHTS_FILE, folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            state = load_file(str(st))
        elif bin_.is_file():
            state = torch.load(str(bin_), map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"{folder} has no {WEIGHTS_FILE} (or adapter_model.bin): not a PEFT adapter folder")
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or unreadable file
        raise FormatError(f"cannot read the adapter weights in {folder} ({type(e).__name__}: {e}); "
                          "is the file complete?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"the adapter weights in {folder} are not a dict of tensors")
    return config, state


def write_adapter(out: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                  force: bool = False, inputs: Sequence[str | os.PathLike] = (),
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write a PEFT adapter folder through a temporary folder next to ``out``, moved into place.

    An existing ``out`` is refused unless ``force`` (and permgraph wrote it). ``extra``:
    written as ``permgraph_adapter.json`` (provenance; PEFT ignores it).
    """
    from permgraph.outputs import OutputTarget

    with OutputTarget(out, kinds={"": "folder"}, inputs=inputs, force=force, command="transport-adapter") as target:
        _write_folder(target.tmp, config, state, extra)
        return target.commit()


def _write_folder(folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                  extra: Mapping[str, Any] | None) -> None:
    from safetensors.torch import save_file

    (folder / CONFIG_FILE).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
    save_file(untie(state), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if extra:
        (folder / "permgraph_adapter.json").write_text(json.dumps(_jsonable(extra), indent=1) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "value") and isinstance(x.value, str):  # enums (PeftType, TaskType)
        return x.value
    return x


# -- the plan: what every adapter tensor is, checked before any work -------------------------

@dataclass
class _Target:
    module: str                    # module path in the model (adapter key without PEFT's prefix)
    param: str                     # the base weight's name in the spec
    layout: str = "linear"         # linear | conv1d | embedding
    keys: dict[str, str] = field(default_factory=dict)  # role (A, B, B_bias, mag) -> adapter key

    @property
    def out_axis(self) -> int:
        return _AXES[self.layout][0]

    @property
    def in_axis(self) -> int:
        return _AXES[self.layout][1]


@dataclass
class _Plan:
    label: str
    source: str | None
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    targets: list[_Target]
    full: dict[str, str]           # adapter key -> base parameter (biases, modules_to_save, base copies)
    copies: set[str]               # keys of frozen base-weight copies (".base_layer.weight")
    outside: dict[str, str]        # adapter key -> parameter of base A the spec lacks (unused by the model)
    notes: list[str]


def _config_of(config: Any, label: str) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise AdapterError(f"{label}: the config must be a dict (adapter_config.json) or a PEFT config")
    return {k: _jsonable(v) for k, v in config.items()}


def _check_config(cfg: Mapping[str, Any], label: str, merge: bool) -> None:
    kind = str(cfg.get("peft_type") or "")
    if kind.upper() != "LORA":
        raise AdapterError(
            f"{label}: PEFT type {kind or '(none)'!r} is not supported; only LoRA adapters (peft_type LORA, "
            "with or without DoRA) can be carried as adapters. IA3, LoHa, LoKr, AdaLoRA, OFT/BOFT, VeRA, "
            "prompt/prefix/p-tuning and the other types are refused: their tensors need rules of their own. "
            "Merge such an adapter into A (PEFT's merge_and_unload) and carry the full fine-tune with "
            "pg.transport instead")
    for key, what in _REFUSED_OPTIONS.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise AdapterError(f"{label}: {what} is not supported for transport ('{key}' is set); merge the "
                               "adapter into A and carry the full fine-tune with pg.transport instead")
    if merge and cfg.get("alora_invocation_tokens"):
        raise AdapterError(f"{label}: an activated LoRA (alora_invocation_tokens) acts only after its "
                           "invocation tokens and cannot be merged into weights; carry it as an adapter")


def _classify(state: Mapping[str, torch.Tensor], label: str):
    """LoRA tensors grouped by module, and the other (full-value) keys."""
    lora: dict[str, dict[str, str]] = {}
    full: list[str] = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"{label}: '{key}' is not a tensor")
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            role = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "B_bias", "lora_embedding_A": "eA",
                    "lora_embedding_B": "eB"}.get(m["role"], "mag")
            lora.setdefault(m["mod"], {})[role] = key
        elif "lora_" in name or "trainable_tokens" in name:
            raise AdapterError(f"{label}: '{key}' is a PEFT tensor with no transport rule (only lora_A/lora_B, "
                               "lora_embedding_A/B, lora_magnitude_vector and whole parameters are carried)")
        else:
            full.append(key)
    return lora, full


def _full_candidates(key: str) -> list[str]:
    """Base parameter names a saved full tensor may stand for, most literal first."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    parts = name.split(".")
    plain = [p for p in parts if p not in _WRAPPERS]
    out = [".".join(plain)]
    if "modules_to_save" in parts:  # in-memory format: "...modules_to_save.<adapter name>.weight"
        i = parts.index("modules_to_save")
        out.append(".".join([p for p in parts[:i] if p not in _WRAPPERS] + parts[i + 2:]))
    return out


def _resolver(names: Sequence[str], known: set[str]):
    """Map adapter-side names onto the spec's: equal, or equal up to one module prefix
    (an adapter of ``LlamaForCausalLM`` on a spec compiled from ``LlamaModel``, or back)."""
    missing = [n for n in names if n not in known]
    if not missing:
        return lambda n: n
    options: list[tuple[str, str]] = [("add", "")]
    first = missing[0]
    for k in known:
        if k.endswith("." + first):
            options.append(("add", k[: -len(first)]))
        if first.endswith("." + k):
            options.append(("strip", first[: -len(k)]))

    def make(kind: str, pre: str):
        if kind == "add":
            return lambda n: pre + n
        return lambda n: n[len(pre):] if n.startswith(pre) else n

    fns = [make(*o) for o in dict.fromkeys(options)]
    return max(fns, key=lambda f: sum(f(n) in known for n in names))


def _layer_kind(modules: Sequence[nn.Module], param: str) -> str | None:
    """``linear``/``conv1d``/``embedding`` from a base model's module, when one was given."""
    path = param.rsplit(".", 1)[0]
    for model in modules:
        try:
            mod = model.get_submodule(path)
        except (AttributeError, KeyError):
            continue
        if isinstance(mod, nn.Embedding):
            return "embedding"
        if type(mod).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D, as PEFT checks it
            return "conv1d"
        if isinstance(mod, nn.Linear):
            return "linear"
        return type(mod).__name__
    return None


def _plan(spec: PermSpec, adapter: AdapterLike, index: int, count: int, sa: Mapping[str, torch.Tensor] | None,
          modules: Sequence[nn.Module], merge: bool) -> _Plan:
    label = f"adapter {index}" if count > 1 else "the adapter"
    source = None
    if isinstance(adapter, (str, os.PathLike)):
        source = str(adapter)
        config, state = read_adapter(adapter)
        label = f"{label} ({adapter})"
    elif isinstance(adapter, tuple) and len(adapter) == 2:
        config, state = adapter
        if not isinstance(state, Mapping):
            raise AdapterError(f"{label}: the state must be a dict of tensors")
        state = dict(state)
    else:
        raise AdapterError(f"{label}: pass a PEFT adapter folder or a (config, state dict) pair, "
                           f"got {type(adapter).__name__}")
    config = _config_of(config, label)
    _check_config(config, label, merge)
    if not state:
        raise AdapterError(f"{label} holds no tensors")
    lora, full_keys = _classify(state, label)
    known = set(spec.shapes) | set(spec.aliases)
    names = [m + ".weight" for m in lora] + [c for k in full_keys for c in _full_candidates(k)[:1]]
    to_spec = _resolver(names, known | set(sa or {}))
    notes: list[str] = []
    targets, problems = [], []
    fifo = bool(config.get("fan_in_fan_out"))
    ambiguous, contradicted = [], []
    for mod, roles in lora.items():
        param = to_spec(mod + ".weight")
        t = _Target(mod, param, keys=roles)
        problem = _unadaptable(spec, mod, param, bool(modules))
        if problem:
            problems.append(problem)
            continue
        problem = _fit(t, spec.shapes[spec.canonical(param)], state, _layer_kind(modules, param), fifo,
                       ambiguous, contradicted)
        if problem:
            problems.append(problem)
        else:
            targets.append(t)
    full, copies, outside = {}, set(), {}
    for key in full_keys:
        cands = [to_spec(c) for c in _full_candidates(key)]
        hit = next((c for c in cands if spec.canonical(c) in spec.shapes), None)
        if hit is not None:
            shape = spec.shapes[spec.canonical(hit)]
            if tuple(state[key].shape) != shape:
                problems.append(f"'{key}' has shape {tuple(state[key].shape)}, but A's '{hit}' has {shape}")
                continue
            full[key] = hit
            if key.endswith(".base_layer.weight"):
                copies.add(key)
            continue
        hit = next((c for c in cands if sa is not None and c in sa), None)
        if hit is not None and tuple(sa[hit].shape) == tuple(state[key].shape):
            outside[key] = hit
            continue
        problems.append(f"'{key}' is not a parameter of the spec's model (compile the spec from the model class "
                        "the adapter was trained on, e.g. the one with its task head)")
    if problems:
        raise AdapterError(f"{label} does not fit base A (is it an adapter of this architecture and size?):\n  "
                           + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))
    if ambiguous and contradicted:
        raise AdapterError(
            f"{label}: its config says fan_in_fan_out={fifo}, but {contradicted[0]} is adapted the other way, so "
            f"the orientation of the square weights {ambiguous[:3]} cannot be read from the config: pass "
            "base_a (or base_b) as a module, whose layer types decide it")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterError(f"{label}: '{bad[0]}' contains NaN or inf")
    if outside:
        notes.append(f"{len(outside)} tensors belong to parameters the model does not use (e.g. "
                     f"'{next(iter(outside))}'): carried unchanged")
    return _Plan(label, source, config, state, targets, full, copies, outside, notes)


def _unadaptable(spec: PermSpec, mod: str, param: str, have_modules: bool) -> str | None:
    """Why a LoRA of module ``mod`` (weight ``param``) cannot be carried over ``spec``, or None."""
    if spec.canonical(param) not in spec.shapes:
        return (f"it adapts '{mod}', but the model of the spec has no parameter '{param}'"
                + ("" if have_modules else " (or it is not a weight the model uses)"))
    if spec.canonical(param) in spec.layouts:
        return (f"it adapts '{mod}', a parameter bank whose units the spec permutes per expert (a layout): "
                "LoRA factors of such banks are not supported; merge the adapter into the fine-tuned weights "
                "and transport those")
    return None


def _fit(t: _Target, shape: tuple[int, ...], state, kind: str | None, fifo: bool, ambiguous: list,
         contradicted: list) -> str | None:
    """Check a target's tensors against its base weight and choose its layout; a problem or None."""
    roles = t.keys
    if "eA" in roles or "eB" in roles:
        if not {"eA", "eB"} <= roles.keys():
            return f"'{t.module}' has only one of lora_embedding_A/B"
        t.layout = "embedding"
        a, b = state[roles["eA"]], state[roles["eB"]]
        a_in, b_out = (a.shape[1] if a.dim() == 2 else None), (b.shape[0] if b.dim() == 2 else None)
    elif {"A", "B"} <= roles.keys():
        a, b = state[roles["A"]], state[roles["B"]]
        if len(shape) != 2 or a.dim() != 2 or b.dim() != 2:
            return (f"'{t.module}': LoRA on a {len(shape)}-D weight {shape} (a convolution) is not supported; "
                    "merge the adapter into A and carry the full fine-tune with pg.transport")
        if kind not in (None, "linear", "conv1d"):
            return f"'{t.module}' is a {kind}: LoRA on it is not supported (only Linear, Conv1D and Embedding)"
        r = a.shape[0]
        lin = tuple(a.shape) == (r, shape[1]) and tuple(b.shape) == (shape[0], r)
        c1d = tuple(a.shape) == (r, shape[0]) and tuple(b.shape) == (shape[1], r)
        if kind is not None:
            t.layout = kind
        elif lin and c1d:
            t.layout = "conv1d" if fifo else "linear"
            ambiguous.append(t.module)
        elif lin or c1d:
            t.layout = "linear" if lin else "conv1d"
            if (t.layout == "conv1d") != fifo:
                contradicted.append(t.module)
        a_in, b_out = a.shape[1], b.shape[0]
    else:
        return f"'{t.module}' lacks lora_A or lora_B"
    if len(shape) != 2:
        return f"'{t.module}': its base weight has shape {shape}, not a matrix"
    out_n, in_n = shape[t.out_axis], shape[t.in_axis]
    if a.dim() != 2 or b.dim() != 2 or a_in != in_n or b_out != out_n or a.shape[0] != b.shape[1]:
        return (f"'{t.module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base weight "
                f"'{t.param}' {shape} (expected (r, {in_n}) and ({out_n}, r))")
    for role in ("B_bias", "mag"):
        if role in roles and tuple(state[roles[role]].shape) != (out_n,):
            return f"'{roles[role]}' has shape {tuple(state[roles[role]].shape)}, expected ({out_n},)"
    return None


# -- moving tensors ----------------------------------------------------------------------------

class _Mover:
    """Gather indices of base-weight axes, cached, and the reasons of fixed axes."""

    def __init__(self, spec: PermSpec, perm: Permutation) -> None:
        self.spec, self.perm, self.cache = spec, perm, {}

    def index(self, param: str, axis: int) -> torch.Tensor | None:
        tree = self.spec.axes_of(param)[axis]
        if not tree.groups():
            return None
        key = repr(tree)
        if key not in self.cache:
            self.cache[key] = axis_index(tree, self.perm, self.spec.ctx, self.spec.sizes)
        return self.cache[key]

    def why_fixed(self, param: str, axis: int) -> str:
        c = self.spec.canonical(param)
        reasons = [r for f in self.spec.fixed if f.param == c and f.axis == axis for r in f.reasons]
        return "; ".join(dict.fromkeys(reasons)) or "fixed by the spec"

    def full(self, param: str, x: torch.Tensor) -> torch.Tensor:
        return permute_tensor(self.spec, self.perm, param, x)


def _take(x: torch.Tensor, axis: int, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(axis, idx.to(x.device))


def _rows(w: torch.Tensor, layout: str) -> torch.Tensor:
    """A base weight in (out, in) orientation."""
    return w if layout == "linear" else w.T


def _scaling(config: Mapping[str, Any], module: str, r: int) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with ``alpha_pattern`` matched as PEFT does."""
    lora_alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            lora_alpha = value
            break
    return lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)


@dataclass
class _Moved:
    """A target's factors in B's frame (unscaled by alpha), and its tensors' keys."""

    target: _Target
    A: torch.Tensor
    B: torch.Tensor
    B_bias: torch.Tensor | None
    mag: torch.Tensor | None


def _move_target(t: _Target, state, mv: _Mover, kept: dict[str, str]) -> _Moved:
    a_key = t.keys.get("A", t.keys.get("eA"))
    b_key = t.keys.get("B", t.keys.get("eB"))
    p_out, p_in = mv.index(t.param, t.out_axis), mv.index(t.param, t.in_axis)
    if p_out is None:
        why = mv.why_fixed(t.param, t.out_axis)
        for role in ("B", "eB", "B_bias", "mag"):
            if role in t.keys:
                kept[t.keys[role]] = f"output axis of '{t.param}' fixed: {why}"
    if p_in is None:
        kept[a_key] = f"input axis of '{t.param}' fixed: {mv.why_fixed(t.param, t.in_axis)}"
    return _Moved(t, _take(state[a_key], 1, p_in), _take(state[b_key], 0, p_out),
                  _take(state[t.keys["B_bias"]], 0, p_out) if "B_bias" in t.keys else None,
                  _take(state[t.keys["mag"]], 0, p_out) if "mag" in t.keys else None)


def _delta(m: _Moved, scale: float) -> torch.Tensor:
    """``s * B @ A`` in (out, in) orientation, in at least float32."""
    return scale * (wide(m.B) @ wide(m.A))


def _rebase_mag(m: _Moved, wa: torch.Tensor, wb: torch.Tensor, mv: _Mover) -> torch.Tensor:
    """``|W_B| + pi(m - |W_A|)``: the magnitude's change from its DoRA initialisation, carried."""
    t = m.target
    p_out = mv.index(t.param, t.out_axis)
    na = _take(torch.linalg.norm(_rows(wide(wa), t.layout), dim=1), 0, p_out)
    nb = torch.linalg.norm(_rows(wide(wb), t.layout), dim=1)
    return (wide(m.mag) - na.to(m.mag.device) + nb.to(m.mag.device)).to(m.mag.dtype)


# -- the entry point ---------------------------------------------------------------------------

def transport_adapter(alignment: Alignment | tuple[PermSpec, Permutation], adapter: AdapterLike | Sequence[AdapterLike],
                      *, out: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                      base_new: str | os.PathLike | None = None, merge: bool = False, alpha: Alpha = 1.0,
                      base_a: ModelLike | None = None, base_b: ModelLike | None = None, force: bool = False,
                      allow_non_preserving: bool = False) -> TransportedAdapter | list[TransportedAdapter]:
    """Carry LoRA adapters of release A to release B, as adapters (or merged into B).

    ``alignment``: an ``Alignment`` of A to B (``pg.align``; its own spec is used, e.g. the
    derived spec of ``transfusion``) or a ``(spec, permutation)`` pair. ``adapter``: a PEFT
    adapter folder or a ``(config, state dict)`` pair (``read_adapter``); a list of them
    shares the one alignment (align once, carry many) and gives a list of results.

    For every LoRA target ``W``: ``lora_B <- alpha * lora_B[p_out]``, ``lora_A <- lora_A[:, p_in]``
    with ``p_out``/``p_in`` the spec's gather indices of ``W``'s output and input axes, so the
    update becomes ``alpha * pi(dW)`` (module docstring). ``alpha``: a float or glob patterns
    over base parameter names (as in ``pg.transport``). Full values (biases, modules_to_save,
    DoRA magnitudes) are permuted, or re-based as ``B + alpha * pi(X - A)`` when both
    ``base_a`` and ``base_b`` are given; modules given there also decide the orientation of
    square ``Conv1D`` weights when the config cannot (otherwise ``fan_in_fan_out`` does).

    ``out``: a folder (a list of folders for several adapters) written as a PEFT adapter,
    loadable with ``PeftModel.from_pretrained(B, out)``; its ``base_model_name_or_path`` is
    ``base_new`` (None when not given, so that no one loads the adapter onto A by its name).
    ``merge=True``: B's state dict with ``B + alpha * pi(dW)`` merged (DoRA as PEFT merges it)
    instead of an adapter; needs ``base_b``; ``out`` is then a ``.safetensors`` file.
    Everything is checked before anything is written; an existing ``out`` is refused unless
    ``force`` replaces an earlier permgraph output.
    """
    spec, perm = _unpack(alignment, allow_non_preserving)
    many = isinstance(adapter, list)
    adapters = list(adapter) if many else [adapter]
    outs = _outs(out, len(adapters), many)
    if merge and base_b is None:
        raise AdapterError("merge=True needs base_b (the new release's model or state dict) to merge into")
    sa = state_of(base_a) if base_a is not None else None
    sb = state_of(base_b) if base_b is not None else None
    for label, sd in (("base A", sa), ("base B", sb)):
        if sd is not None:
            check_compatible(spec, {label: sd})
    modules = [m for m in (base_a, base_b) if isinstance(m, nn.Module)]
    plans = [_plan(spec, a, i, len(adapters), sa, modules, merge) for i, a in enumerate(adapters)]
    names = sorted({t.param for p in plans for t in p.targets} | {v for p in plans for v in p.full.values()})
    alpha = check_alpha(alpha, names or ["(none)"])
    for p in plans:
        _check_alpha_use(p, alpha, rebase=sa is not None and sb is not None, merge=merge)
    targets_out = _reserve(outs, merge, force, [p.source for p in plans if p.source])
    try:
        mv = _Mover(spec, perm)
        results = [_carry(p, mv, alpha, sa, sb, merge, base_new, alignment) for p in plans]
        for res, target in zip(results, targets_out):
            if target is not None:
                write_result(res, target.tmp)
                res.out = target.commit()
    finally:
        for target in targets_out:
            if target is not None:
                target.discard()
    return results if many else results[0]


def _unpack(alignment, allow_non_preserving: bool) -> tuple[PermSpec, Permutation]:
    if isinstance(alignment, Alignment):
        if alignment.soft:
            raise AdapterError(f"the alignment has soft transport plans (groups {sorted(alignment.soft)[:3]}): they "
                               "mix units, so the carried adapter would not be function-preserving; align with a hard "
                               "solver (weight_matching, transfusion, ot with hard plans) to carry adapters")
        if not alignment.carries_task_vectors() and not allow_non_preserving:
            raise AdapterError("this alignment is not function-preserving (flat heads ablation): pi(A) is not "
                               "equivalent to A. Pass allow_non_preserving=True to use it anyway")
        spec, perm = alignment.spec, alignment.permutation
    elif isinstance(alignment, tuple) and len(alignment) == 2 and isinstance(alignment[0], PermSpec) \
            and isinstance(alignment[1], Permutation):
        spec, perm = alignment
    else:
        raise AdapterError("alignment must be a pg.Alignment (pg.align) or a (PermSpec, Permutation) pair")
    check_permutation(spec, perm)
    return spec, perm


def _outs(out, n: int, many: bool) -> list:
    if out is None:
        return [None] * n
    if many:
        if isinstance(out, (str, os.PathLike)) or len(out) != n:
            raise AdapterError(f"several adapters need as many outputs: pass out=[...] with {n} paths")
        outs = [Path(o) for o in out]
        if len({os.path.abspath(o) for o in outs}) != n:
            raise AdapterError("the outputs of several adapters must be different paths")
        return outs
    if not isinstance(out, (str, os.PathLike)):
        raise AdapterError("out must be one path for one adapter")
    return [Path(out)]


def _check_alpha_use(p: _Plan, alpha: Alpha, rebase: bool, merge: bool) -> None:
    """alpha scales the low-rank update; DoRA adapters and unre-based full values cannot be scaled."""
    for t in p.targets:
        if "mag" in t.keys and not merge and alpha_for(alpha, t.param) != 1.0:
            raise AdapterError(f"{p.label}: alpha != 1 cannot be expressed in a DoRA adapter ('{t.module}' "
                               "normalises its weight); use merge=True, or alpha=1")
    if not rebase:
        scaled = [k for k, v in p.full.items() if k not in p.copies and alpha_for(alpha, v) != 1.0]
        if scaled:
            raise AdapterError(f"{p.label}: alpha != 1 on whole tensors the adapter carries ('{scaled[0]}') needs "
                               "base_a and base_b, to scale their change B + alpha * pi(X - A)")


def _reserve(outs: list, merge: bool, force: bool, inputs: list[str]) -> list:
    from permgraph.outputs import OutputTarget

    kinds = {".safetensors": "file"} if merge else {"": "folder"}
    reserved = []
    try:
        for o in outs:
            reserved.append(None if o is None else OutputTarget(o, kinds=kinds, inputs=inputs, force=force,
                                                                command="transport-adapter"))
    except BaseException:
        for r in reserved:
            if r is not None:
                r.discard()
        raise
    return reserved


def _carry(p: _Plan, mv: _Mover, alpha: Alpha, sa, sb, merge: bool, base_new, alignment) -> TransportedAdapter:
    rebase = sa is not None and sb is not None
    kept: dict[str, str] = {}
    moved = [_move_target(t, p.state, mv, kept) for t in p.targets]
    full = {}
    for key, param in p.full.items():
        x = p.state[key]
        if rebase:
            a, b = _base_value(sa, param, mv.spec), _base_value(sb, param, mv.spec)
            d = mv.full(param, wide(x) - wide(a).to(x.device))
            full[key] = (wide(b).to(x.device) + alpha_for(alpha, param) * d).to(x.dtype)
        elif key not in p.copies:
            full[key] = mv.full(param, x)
        if all(not t.groups() for t in mv.spec.axes_of(param)):
            kept[key] = f"'{param}' is fixed by the spec on every axis"
    notes = list(p.notes)
    if p.copies and not rebase:
        notes.append(f"dropped {len(p.copies)} frozen copies of A's base weights that PEFT saved with the adapter "
                     f"({sorted(p.copies)[0]}, ...): B's own weights are used. Pass base_a and base_b to carry "
                     "them re-based")
    if p.full and not rebase:
        n = len([k for k in p.full if k not in p.copies])
        if n:
            notes.append(f"{n} whole tensors (biases, modules_to_save, ...) are carried as A's fine-tuned values, "
                         "permuted; pass base_a and base_b to re-base them as B + pi(X - A)")
    for key, why in kept.items():
        notes.append(f"'{key}' carried unchanged: {why}")
    if merge:
        state = _merged(p, moved, full, mv, alpha, sa, sb, notes)
        config = dict(p.config)
    else:
        state = {}
        for m in moved:
            t = m.target
            a_f = alpha_for(alpha, t.param)
            state[t.keys.get("A", t.keys.get("eA"))] = m.A
            state[t.keys.get("B", t.keys.get("eB"))] = m.B if a_f == 1.0 else (a_f * wide(m.B)).to(m.B.dtype)
            if m.B_bias is not None:
                state[t.keys["B_bias"]] = m.B_bias if a_f == 1.0 else (a_f * wide(m.B_bias)).to(m.B_bias.dtype)
            if m.mag is not None:
                state[t.keys["mag"]] = _rebase_mag(m, _base_value(sa, t.param, mv.spec), _base_value(
                    sb, t.param, mv.spec), mv) if rebase else m.mag
        state.update(full)
        state.update({k: p.state[k] for k in p.outside})
        state = {k: state[k] for k in p.state if k in state}  # the input's key order
        config = dict(p.config)
        config["base_model_name_or_path"] = None if base_new is None else str(base_new)
        if base_new is not None:
            config["revision"] = None
        else:
            notes.append("base_model_name_or_path set to None: pass base_new to name release B")
    if isinstance(alignment, Alignment) and alignment.untied_residual:
        notes.append("untied residual sites: the adapter is carried like a task vector (pi(A) is not A's function)")
    elif isinstance(alignment, Alignment) and not alignment.function_preserving:
        notes.append("the alignment is not function-preserving: the carried adapter is an approximation")
    return TransportedAdapter(config, state, merge, None, {t.module: t.param for t in p.targets}, kept, notes)


def _base_value(sd: Mapping[str, torch.Tensor], param: str, spec: PermSpec) -> torch.Tensor:
    for n in [param] + spec.names_of(spec.canonical(param)):
        if n in sd:
            return sd[n]
    raise AdapterError(f"the base model lacks '{param}'")


def _base_key(sd: Mapping[str, torch.Tensor], param: str, spec: PermSpec) -> str:
    for n in [param] + spec.names_of(spec.canonical(param)):
        if n in sd:
            return n
    raise AdapterError(f"base B lacks '{param}' to merge into")


def _merged(p: _Plan, moved: list[_Moved], full, mv: _Mover, alpha: Alpha, sa, sb, notes: list[str]):
    """B's state dict with the carried update merged, as PEFT's merge_and_unload would on B."""
    spec = mv.spec
    out = dict(sb)
    for key, value in full.items():  # whole values first: PEFT loads them, then merges the LoRA update
        k = _base_key(sb, p.full[key], spec)
        out[k] = value.to(device=sb[k].device, dtype=sb[k].dtype)
    for m in moved:
        t = m.target
        k = _base_key(sb, t.param, spec)
        a_f = alpha_for(alpha, t.param)
        w = _rows(wide(out[k]), t.layout)
        s = _scaling(p.config, t.module, m.A.shape[0])
        delta = _delta(m, s).to(w.device)
        if m.mag is not None:
            mag = _rebase_mag(m, _base_value(sa, t.param, spec), sb[k], mv) if sa is not None else m.mag
            v = w + delta
            merged_w = (wide(mag).to(w.device) / torch.linalg.norm(v, dim=1))[:, None] * v
            new = w + a_f * (merged_w - w)
        else:
            new = w + a_f * delta
        out[k] = _rows(new, t.layout).to(sb[k].dtype).contiguous()
        if m.B_bias is not None:
            bk = _base_key(sb, t.param[: -len("weight")] + "bias", spec)
            out[bk] = (wide(out[bk]) + a_f * s * wide(m.B_bias).to(out[bk].device)).to(sb[bk].dtype)
        if len(spec.names_of(spec.canonical(t.param))) > 1:
            notes.append(f"'{t.param}' is tied to {spec.names_of(spec.canonical(t.param))}: only '{k}' was merged")
    return out


def write_result(res: TransportedAdapter, path: Path) -> None:
    """Write a carried adapter into ``path`` (an existing, empty folder), or a merged state
    (``res.merged``) as the ``.safetensors`` file ``path``. Use it with an ``OutputTarget``'s
    temporary path; ``transport_adapter(out=...)`` does."""
    from safetensors.torch import save_file

    from permgraph.outputs import package_version

    if res.merged:
        save_file(untie(res.state), str(path), metadata={"format": "pt", "permgraph": package_version()})
        return
    _write_folder(path, res.config, res.state, {"notes": res.notes, "kept": res.kept, "targets": res.targets})
