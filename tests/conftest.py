import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


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
