"""Resolving a model reference from the command line: a folder, a factory, or a spec file."""
from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from permgraph.errors import ModelLoadError
from permgraph.outputs import MANIFEST, package_version

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

def load_model(ref: str) -> tuple[nn.Module, Any]:
    """``(model, example_inputs)`` from a transformers folder or a ``module:function`` factory.

    A factory returns a model or ``(model, example_inputs)``; example inputs are
    None for transformers models (derived from the config).
    """
    path = Path(ref)
    if path.is_dir():
        return load_transformers_folder(path), None
    if ":" in ref and not path.exists():
        return run_factory(ref)
    if path.exists():
        raise ModelLoadError(f"'{ref}' is a file; pass a transformers model folder (with config.json) "
                             "or a factory 'module:function'")
    raise ModelLoadError(f"'{ref}' does not exist; pass a transformers model folder (with config.json) "
                         "or a factory 'module:function'")


def run_factory(ref: str) -> tuple[nn.Module, Any]:
    """Import ``package.module`` and call ``function()``: this runs the user's code.

    The module is looked up in the current directory first, then on ``PYTHONPATH``
    and in installed packages (as ``python -m`` does).
    """
    import sys

    mod_name, _, fn_name = ref.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import factory '{ref}': {e}. Expected 'package.module:function' "
                             "importable from the current directory, PYTHONPATH or an installed package.") from None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the user's code failed
        raise ModelLoadError(f"the factory '{ref}' raised {type(e).__name__}: {e}") from None
    model, inputs = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, tuple) else (out, None)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"the factory '{ref}' returned {type(model).__name__}; expected an nn.Module "
                             "or (module, example_inputs)")
    return model, inputs


def load_transformers_folder(path: Path) -> nn.Module:
    """Build the architecture named in ``config.json`` and load its weights, all offline."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading model folders needs transformers: pip install 'permgraph[hf]'") from None
    try:
        cfg_dict = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg_dict, dict):
        raise ModelLoadError(f"{cfg_file} does not hold a JSON object")
    arch = (cfg_dict.get("architectures") or [None])[0]
    try:
        transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)  # a usable config
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad fields
        raise ModelLoadError(f"{cfg_file} is not a usable transformers config: {type(e).__name__}: {e}") from None
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has config.json but no weights (model.safetensors, pytorch_model.bin or "
                             "a sharded index): permgraph never uses randomly initialised weights")
    try:
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - corrupt or mismatched weights
        raise ModelLoadError(f"cannot load weights from {path}: {type(e).__name__}: {e}") from None
    problems = [f"{what} {sorted(map(str, info.get(key) or ()))[:5]}"
                for key, what in (("missing_keys", "missing tensors"), ("unexpected_keys", "unexpected tensors"),
                                  ("mismatched_keys", "tensors of the wrong shape"))
                if info.get(key)]
    if problems:
        raise ModelLoadError(f"{path} does not match its config.json ({cls.__name__}): " + "; ".join(problems)
                             + ". Is the checkpoint complete and of this architecture?")
    return model


def load_spec_file(path: str):
    from permgraph.spec import PermSpec

    return PermSpec.from_json(read_text(path, "spec file"))


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents, or an input error naming it."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{what} {path} does not exist")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {what} {path}: {e}") from None


@dataclass
class Source:
    """A model reference resolved: a module when one can be built, always a state dict."""

    ref: str
    state: dict
    module: nn.Module | None = None
    inputs: Any = None
    folder: Path | None = None


def load_source(ref: str) -> Source:
    """A transformers folder, a factory, or a weights file (.safetensors, .bin, .pt)."""
    path = Path(ref)
    if path.is_file():
        return Source(ref, load_weights_file(path))
    module, inputs = load_model(ref)
    return Source(ref, dict(module.state_dict()), module, inputs, path if path.is_dir() else None)


def load_weights_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".bin", ".pt", ".pth"):
            import torch

            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise ModelLoadError(f"{path} does not hold a state dict (names to tensors)")
            return obj
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or unreadable file
        raise ModelLoadError(f"cannot read weights from {path} ({type(e).__name__}: {e}); "
                             "is the file complete?") from None
    raise ModelLoadError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt)")


def write_state(state: dict, tmp: Path, kind: str, base_new: Source, finetuned: Source) -> None:
    """Write a transported state into ``tmp``: a transformers folder (config and tokenizer files
    from B's folder, the task head's config keys from the fine-tune's) or one .safetensors file."""
    from safetensors.torch import save_file

    tensors = untie(state)
    meta = {"format": "pt", "permgraph": package_version()}
    if kind == "file":
        save_file(tensors, str(tmp), metadata=meta)
        return
    if base_new.module is not None and _converted_on_load(base_new.module):
        # written as transformers writes this model type (a Mixtral's per-expert w1/w2/w3), like B
        base_new.module.load_state_dict(state)
        base_new.module.save_pretrained(str(tmp), max_shard_size="1000GB")
        for f in tmp.iterdir():
            if not f.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
                f.unlink()
    else:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
    copy_model_files(tmp, base_new.folder, finetuned.folder)


def copy_model_files(tmp: Path, base_new: Path | None, finetuned: Path | None) -> None:
    """B's non-weight files (config, tokenizer, generation config) into ``tmp``; the config takes
    the fine-tune's task-head keys (architectures, labels) when the fine-tune is a folder."""
    if base_new is None:
        return
    for f in base_new.iterdir():
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
            shutil.copyfile(f, tmp / f.name)
    cfg_path = tmp / "config.json"
    if cfg_path.exists() and finetuned is not None and (finetuned / "config.json").exists():
        cfg = json.loads(cfg_path.read_text())
        ft_cfg = json.loads((finetuned / "config.json").read_text())
        for key in ("architectures", "num_labels", "id2label", "label2id", "problem_type"):
            if key in ft_cfg:
                cfg[key] = ft_cfg[key]
        cfg_path.write_text(json.dumps(cfg, indent=2))


def meta_model(path: Path) -> nn.Module:
    """The class named in a folder's config.json, built from the config on the meta device:
    names, shapes and the graph, no weights (``pg.compile`` traces it as it traces a loaded model).
    Built once per distinct config.json (A, A_ft and B usually share one)."""
    cfg_file = path / "config.json"
    try:
        text = cfg_file.read_text()
    except OSError as e:
        raise ModelLoadError(f"cannot read {cfg_file}: {e}") from None
    model = _META.get(text)
    if model is None:
        cls, config = _config_class(path)
        try:
            with torch.device("meta"):
                model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        except Exception as e:  # noqa: BLE001 - an unusable config
            raise ModelLoadError(f"cannot build {cls.__name__} from {cfg_file}: {type(e).__name__}: {e}") from None
        model.eval()
        _META.clear()  # one at a time: a meta model holds no weights, but the cache need not grow
        _META[text] = model
    return model


_META: dict[str, nn.Module] = {}


def check_folder_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The tensors a folder's checkpoint holds (``shapes``) are those its config.json's class has,
    as ``from_pretrained`` would check, without loading any weight: the class is built on the
    meta device (and returned). A tied name (``lm_head.weight``) may be absent when its partner is present."""
    model = meta_model(path)
    params = model.state_dict(keep_vars=True)
    present = {id(params[n]) for n in shapes if n in params}
    problems = [f"{what} {sorted(names)[:5]}" for what, names in (
        ("missing tensors", [n for n in params if n not in shapes and id(params[n]) not in present]),
        ("unexpected tensors", [n for n in shapes if n not in params]),
        ("tensors of the wrong shape", [n for n in shapes if n in params and tuple(params[n].shape) != shapes[n]]),
    ) if names]
    if problems and _converted_on_load(model):
        raise ConvertedCheckpoint(
            f"{path} stores its weights under other names than {type(model).__name__}'s parameters, which "
            f"transformers converts when loading ({model.config.model_type}: e.g. per-expert tensors merged "
            "into one bank): it is read with from_pretrained and written back in its own layout, in memory")
    if problems:
        raise ModelLoadError(f"{path} does not match its config.json ({type(model).__name__}): "
                             + "; ".join(problems) + ". Is the checkpoint complete and of this architecture?")
    return model


class ConvertedCheckpoint(ModelLoadError):
    """A folder whose tensors transformers renames or merges on load (``check_folder_tensors``)."""


def _converted_on_load(model: nn.Module) -> bool:
    """Whether transformers converts checkpoints of this model type on load (a legacy Mixtral
    checkpoint's ``experts.N.w1`` into ``experts.gate_up_proj``)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return bool(get_checkpoint_conversion_mapping(getattr(getattr(model, "config", None), "model_type", None)))


def _config_class(path: Path):
    """The model class named in a folder's config.json and the config, validated as in loading."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad fields
        raise ModelLoadError(f"{path / 'config.json'} is not a usable transformers config: "
                             f"{type(e).__name__}: {e}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    return (getattr(transformers, arch, None) if arch else None) or transformers.AutoModel, config


def untie(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors ready for safetensors, which refuses shared storage: every name gets its own
    contiguous CPU tensor (tied weights are copied)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
