import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: the workers share the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4 (each builds and traces its own models)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(scope="session")
def zoo_compiled():
    """``get(name) -> (ZooModel, PermSpec)``: each zoo model built and compiled once per test run,
    shared by the soundness, completeness and solver suites (tests must not modify the model)."""
    import permgraph as pg
    from permgraph.testing import build

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            zm = build(name)
            cache[name] = (zm, pg.compile(zm.model, zm.inputs, outputs=zm.outputs))
        return cache[name]
    return get
