"""The LAP backend interface; it knows no implementation (see ``permgraph.backends.registry``)."""
from __future__ import annotations

import torch


class LapBackend:
    """Solve ``max_p sum_i S[i, p[i]]`` for square ``S``; subclasses implement ``solve``."""

    name = "base"
    releases_gil = False  # True: independent problems may be solved concurrently on CPU threads

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def solve_batch(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores``: (batch, n, n) -> (batch, n). Default: one by one."""
        if scores.shape[0] == 0:
            return torch.empty(0, scores.shape[-1], dtype=torch.long, device=scores.device)
        return torch.stack([self.solve(s) for s in scores])
