"""A batched auction algorithm in torch: runs on the scores' device (GPU when present).

Exact on integer-scaled scores: scores are scaled so that the final epsilon is
below ``1/n`` of their integer resolution (Bertsekas' bound), with epsilon
scaling for speed. Ties in real-valued scores may resolve differently from
scipy, with the same optimal value.
"""
from __future__ import annotations

import torch

from permgraph.backends.base import LapBackend
from permgraph.errors import InternalError


class TorchAuctionBackend(LapBackend):
    name = "torch"

    def __init__(self, resolution: float = 1e-7, max_rounds: int = 1_000_000) -> None:
        self.resolution = resolution
        self.max_rounds = max_rounds

    def solve(self, score: torch.Tensor) -> torch.Tensor:
        return self.solve_batch(score[None])[0]

    def solve_batch(self, scores: torch.Tensor) -> torch.Tensor:
        b, n, _ = scores.shape
        if n == 0 or b == 0:
            return torch.empty(b, n, dtype=torch.long, device=scores.device)
        s = scores.detach().double()
        span = (s.amax(dim=(1, 2), keepdim=True) - s.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-30)
        # integer scores on a grid of `resolution * span`; exact when eps < 1/n in those units
        s = torch.round((s - s.amin(dim=(1, 2), keepdim=True)) / (span * self.resolution))
        eps_final = 1.0 / (n + 1)
        eps = torch.full((b,), max(float(s.max()) / 4, eps_final), dtype=s.dtype, device=s.device)
        prices = torch.zeros(b, n, dtype=s.dtype, device=s.device)
        while True:
            owner, assign = self._auction(s, prices, eps)
            if bool((eps <= eps_final).all()):
                return assign
            eps = torch.clamp(eps / 7, min=eps_final)

    def _auction(self, s: torch.Tensor, prices: torch.Tensor, eps: torch.Tensor):
        b, n, _ = s.shape
        dev = s.device
        assign = torch.full((b, n), -1, dtype=torch.long, device=dev)   # row -> col
        owner = torch.full((b, n), -1, dtype=torch.long, device=dev)    # col -> row
        for _ in range(self.max_rounds):
            free = assign < 0
            if not bool(free.any()):
                return owner, assign
            bi, ri = free.nonzero(as_tuple=True)
            value = s[bi, ri] - prices[bi]
            top2 = value.topk(2, dim=1) if n > 1 else (value.max(dim=1, keepdim=True))
            if n > 1:
                best, second = top2.values[:, 0], top2.values[:, 1]
                col = top2.indices[:, 0]
            else:
                best, col = top2.values[:, 0], top2.indices[:, 0]
                second = best
            bid = prices[bi, col] + best - second + eps[bi]
            # resolve competing bids: highest bid per (batch, col) wins
            key = bi * n + col
            win_bid = torch.full((b * n,), float("-inf"), dtype=s.dtype, device=dev)
            win_bid.scatter_reduce_(0, key, bid, reduce="amax")
            is_win = bid >= win_bid[key]
            # one winner per key even with equal bids: the lowest row index
            cand_row = torch.where(is_win, ri, torch.full_like(ri, n))
            win_row = torch.full((b * n,), n, dtype=torch.long, device=dev)
            win_row.scatter_reduce_(0, key, cand_row, reduce="amin")
            won = is_win & (ri == win_row[key])
            wb, wr, wc, wbid = bi[won], ri[won], col[won], bid[won]
            prev = owner[wb, wc]
            had = prev >= 0
            assign[wb[had], prev[had]] = -1
            owner[wb, wc] = wr
            assign[wb, wr] = wc
            prices[wb, wc] = wbid
        raise InternalError("the auction LAP solver did not converge")
