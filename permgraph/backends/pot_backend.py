"""Exact optimal transport (POT's network simplex) as an assignment solver.

With uniform marginals over n units on each side, the optimal plan of the
squared-distance cost is a permutation (scaled by 1/n), and since
``||b_i - a_j||^2 = ||b_i||^2 + ||a_j||^2 - 2 <b_i, a_j>`` sums to a constant plus
``-2 sum <b_i, a_p(i)>`` over any permutation, it maximizes the same score.
"""
from __future__ import annotations

import numpy as np
import torch

from permgraph.backends.base import LapBackend


class PotEmdBackend(LapBackend):
    name = "pot"

    def __init__(self) -> None:
        import ot  # noqa: F401 - ImportError tells the registry it is unavailable

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        import ot

        s = score.detach().double().cpu().numpy()
        n = s.shape[0]
        u = np.full(n, 1.0 / n)
        plan = ot.emd(u, u, s.max() - s)
        return torch.as_tensor(plan.argmax(axis=1), dtype=torch.long).to(score.device)
