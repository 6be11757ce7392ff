"""Resolving a model reference from the command line: a folder, a factory, or a spec file."""
from __future__ import annotations

import importlib
import json
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
