"""Testing utilities, public like ``torch.testing``: a zoo of small models of every architecture
family permgraph supports, with example inputs. Used by the tests and the benchmarks, never by
the library itself; rule and solver authors use it to check their work."""
from __future__ import annotations

from permgraph.testing.zoo import EXACT, ZOO, ZooModel, build

__all__ = ["EXACT", "ZOO", "ZooModel", "build"]
