"""The LAP backend registry: names to factories of the implementations.

``auto`` picks ``torch`` on a GPU; on CPU ``lapjv`` if installed (the fastest measured, and it
releases the GIL), else ``scipy`` (faster than ``lap`` at n = 3072 and also releases the GIL;
docs/solvers.md, "Speed").
"""
from __future__ import annotations

from typing import Callable

import torch

from permgraph.backends.base import LapBackend
from permgraph.errors import InputError

_REGISTRY: dict[str, Callable[[], LapBackend]] = {}


def register_backend(name: str, factory: Callable[[], LapBackend]) -> None:
    """Register ``factory`` (raising ImportError when its package is missing) under ``name``."""
    if name in _REGISTRY:
        raise InputError(f"a LAP backend named '{name}' is already registered")
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backends whose packages are installed."""
    out = []
    for name, factory in _REGISTRY.items():
        try:
            factory()
            out.append(name)
        except ImportError:
            pass
    return out


def get_backend(name: str | LapBackend = "auto", device: torch.device | None = None) -> LapBackend:
    """A backend by name (or the instance given)."""
    if isinstance(name, LapBackend):
        return name
    if name == "auto":
        if device is not None and device.type == "cuda":
            name = "torch"
        else:
            name = "lapjv" if "lapjv" in available_backends() else "scipy"
    if name not in _REGISTRY:
        raise InputError(f"unknown LAP backend '{name}'; available: {available_backends()}")
    try:
        return _REGISTRY[name]()
    except ImportError as e:
        raise InputError(f"backend '{name}' is not installed ({e}); pip install 'permgraph[{name}]'") from None


def _scipy() -> LapBackend:
    from permgraph.backends.scipy_backend import ScipyBackend

    return ScipyBackend()


def _lap() -> LapBackend:
    from permgraph.backends.lap_backend import LapJVBackend

    return LapJVBackend()


def _lapjv() -> LapBackend:
    from permgraph.backends.lapjv_backend import LapjvBackend

    return LapjvBackend()


def _torch() -> LapBackend:
    from permgraph.backends.torch_backend import TorchAuctionBackend

    return TorchAuctionBackend()


def _pot() -> LapBackend:
    from permgraph.backends.pot_backend import PotEmdBackend

    return PotEmdBackend()


register_backend("scipy", _scipy)
register_backend("pot", _pot)
register_backend("lap", _lap)
register_backend("lapjv", _lapjv)
register_backend("torch", _torch)
