"""scipy.optimize.linear_sum_assignment."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from permgraph.backends.base import LapBackend


class ScipyBackend(LapBackend):
    name = "scipy"
    releases_gil = True

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        rows, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
        out = torch.empty(len(rows), dtype=torch.long)
        out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return out.to(score.device)
