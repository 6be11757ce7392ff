"""Linear assignment backends: scipy, lap and lapjv (Jonker-Volgenant), torch (auction, any device).

Every backend maximizes ``sum_i S[i, p[i]]`` and returns ``p`` (a LongTensor), for
one square score matrix or a batch of them.
"""
from __future__ import annotations

from permgraph.backends.base import LapBackend
from permgraph.backends.registry import available_backends, get_backend, register_backend

__all__ = ["LapBackend", "get_backend", "register_backend", "available_backends"]
