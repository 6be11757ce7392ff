"""The ``lapjv`` package's Jonker-Volgenant solver (optional dependency): AVX2 code in float32.

On CPU the fastest exact solver measured here (docs/solvers.md, "Speed"): about 2x scipy
at n = 3072. It works in float32, the precision the scores are computed in; it releases
the GIL, so independent problems run concurrently on threads. Two assignments whose values
differ by less than float32's resolution may resolve differently from scipy's float64.
"""
from __future__ import annotations

import numpy as np
import torch

from permgraph.backends.base import LapBackend


class LapjvBackend(LapBackend):
    name = "lapjv"
    releases_gil = True

    def __init__(self) -> None:
        import lapjv  # noqa: F401 - ImportError tells the registry it is unavailable

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        from lapjv import lapjv

        if score.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=score.device)
        s = np.ascontiguousarray((-score.detach()).float().cpu().numpy())  # lapjv minimizes
        rows, _, _ = lapjv(s)
        return torch.as_tensor(rows.astype(np.int64)).to(score.device)
