"""The backend interface and registry."""
from __future__ import annotations

from typing import Callable

import torch

from permgraph.errors import InputError


class LapBackend:
    """Solve ``max_p sum_i S[i, p[i]]`` for square ``S``; subclasses implement ``solve``."""

    name = "base"

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def solve_batch(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores``: (batch, n, n) -> (batch, n). Default: one by one."""
        if scores.shape[0] == 0:
            return torch.empty(0, scores.shape[-1], dtype=torch.long, device=scores.device)
        return torch.stack([self.solve(s) for s in scores])


_REGISTRY: dict[str, Callable[[], LapBackend]] = {}


def register_backend(name: str, factory: Callable[[], LapBackend]) -> None:
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    out = []
    for name, factory in _REGISTRY.items():
        try:
            factory()
            out.append(name)
        except ImportError:
            pass
    return out


def get_backend(name: str | LapBackend = "auto", device: torch.device | None = None) -> LapBackend:
    """A backend by name; ``auto`` picks torch on a GPU, else lap if installed, else scipy."""
    if isinstance(name, LapBackend):
        return name
    if name == "auto":
        if device is not None and device.type == "cuda":
            name = "torch"
        else:
            name = "lap" if "lap" in available_backends() else "scipy"
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


def _torch() -> LapBackend:
    from permgraph.backends.torch_backend import TorchAuctionBackend
    return TorchAuctionBackend()


def _pot() -> LapBackend:
    from permgraph.backends.pot_backend import PotEmdBackend
    return PotEmdBackend()


register_backend("scipy", _scipy)
register_backend("pot", _pot)
register_backend("lap", _lap)
register_backend("torch", _torch)
