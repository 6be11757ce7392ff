"""Resolving a model reference from the command line: a folder, a factory, or a spec file."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn


class ModelLoadError(ValueError):
    """A model reference could not be resolved; the message says why and what to pass."""


def load_model(ref: str) -> tuple[nn.Module, Any]:
    """``(model, example_inputs)`` from a transformers folder or a ``module:function`` factory.

    A factory returns a model or ``(model, example_inputs)``; example inputs are
    None for transformers models (derived from the config).
    """
    path = Path(ref)
    if path.is_dir():
        return load_transformers_folder(path), None
    if ":" in ref and not path.exists():
        mod_name, _, fn_name = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot import factory '{ref}': {e}. Expected 'package.module:function' "
                                 "importable from the current directory or PYTHONPATH.") from None
        out = fn()
        if isinstance(out, tuple):
            return out[0], (out[1] if len(out) > 1 else None)
        return out, None
    if path.exists():
        raise ModelLoadError(f"'{ref}' is a file; pass a transformers model folder (with config.json) "
                             "or a factory 'module:function'")
    raise ModelLoadError(f"'{ref}' does not exist; pass a transformers model folder (with config.json) "
                         "or a factory 'module:function'")


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
    arch = (cfg_dict.get("architectures") or [None])[0]
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights:
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or mismatched weights
        raise ModelLoadError(f"cannot load weights from {path}: {type(e).__name__}: {e}") from None


def load_spec_file(path: str):
    from permgraph.spec import PermSpec

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"spec file {path} does not exist")
    return PermSpec.from_json(p.read_text())


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
            if not isinstance(obj, dict):
                raise ModelLoadError(f"{path} does not hold a state dict")
            return obj
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or unreadable file
        raise ModelLoadError(f"cannot read weights from {path} ({type(e).__name__}: {e}); is the file complete?") from None
    raise ModelLoadError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt)")


def save_output(state: dict, out: Path, base_new: Source, finetuned: Source, force: bool) -> None:
    """Write a transformers folder (config/tokenizer from B's folder) or a .safetensors file,
    through a temporary path moved into place at the end."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        fd, tmp = tempfile.mkstemp(dir=parent, suffix=".tmp")
        import os
        os.close(fd)
        save_file(_untie(tensors), tmp)
        if out.exists() and force:
            out.unlink()
        Path(tmp).replace(out)
        return
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp"))
    try:
        if base_new.folder is not None:
            for f in base_new.folder.iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and not f.name.endswith(".index.json"):
                    shutil.copy2(f, tmp / f.name)
            cfg_path = tmp / "config.json"
            if cfg_path.exists() and finetuned.folder is not None and (finetuned.folder / "config.json").exists():
                cfg = json.loads(cfg_path.read_text())
                ft_cfg = json.loads((finetuned.folder / "config.json").read_text())
                for key in ("architectures", "num_labels", "id2label", "label2id", "problem_type"):
                    if key in ft_cfg:
                        cfg[key] = ft_cfg[key]
                cfg_path.write_text(json.dumps(cfg, indent=2))
        save_file(_untie(tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} exists; pass --force to overwrite")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _untie(tensors: dict) -> dict:
    """safetensors refuses shared storage: give every name its own tensor."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        key = v.untyped_storage().data_ptr()
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out
