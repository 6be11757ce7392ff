"""The ``lap`` package's Jonker-Volgenant solver (optional dependency)."""
from __future__ import annotations

import torch

from permgraph.backends.base import LapBackend


class LapJVBackend(LapBackend):
    name = "lap"

    def __init__(self) -> None:
        import lap  # noqa: F401 - ImportError tells the registry it is unavailable

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        import lap

        s = score.detach().double().cpu().numpy()
        _, x, _ = lap.lapjv(-s, extend_cost=False)  # lapjv minimizes
        return torch.as_tensor(x, dtype=torch.long).to(score.device)
