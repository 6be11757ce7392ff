"""The package's import structure: no cycles, and the library never imports its test utilities.
(The layer order itself is import-linter's contract in pyproject.toml, run by ``make lint``.)"""
import grimp
import networkx as nx


def _graph() -> nx.DiGraph:
    g = grimp.build_graph("permgraph", exclude_type_checking_imports=True)
    out = nx.DiGraph()
    for m in g.modules:
        out.add_node(m)
        for d in g.find_modules_directly_imported_by(m):
            out.add_edge(m, d)
    return out


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, cycles[:5]


def test_library_never_imports_testing_or_examples():
    g = _graph()
    users = [m for m in g if not m.startswith("permgraph.testing")
             and any(d.startswith("permgraph.testing") for d in g.successors(m))]
    assert not users
    assert not any(m.startswith(("permgraph.demo", "permgraph.experiments", "permgraph.zoo")) for m in g)
