"""The axis algebra on its own: unification, refinement, reconciliation."""
from permgraph.axes import AxisStore, Reason, _common_cat, _common_prod


def test_common_prod_refinement():
    assert _common_prod([4, 8], [2, 16]) == ([[2, 2], [8]], [[2], [2, 8]])
    assert _common_prod([6], [2, 3]) == ([[2, 3]], [[2], [3]])
    assert _common_prod([2, 3], [3, 2]) is None  # no common mixed radix


def test_common_cat_refinement():
    assert _common_cat([4, 4], [2, 6]) == ([[2, 2], [4]], [[2], [2, 4]])


def test_unify_propagates_structure_and_fixedness():
    s = AxisStore()
    a, b = s.new(32), s.new(32)
    heads, within = s.split(a, "prod", [4, 8], "x")
    s.unify(a, b, "y")
    assert s.kind(b) == "prod" and s.children(b) == [s.find(heads), s.find(within)]
    s.fix(b, Reason("test"))
    assert s.reasons(a) and s.reasons(a)[0].message == "test"


def test_prod_reconciliation_refines_both_sides():
    s = AxisStore()
    a, b = s.new(32), s.new(32)
    a_parts = s.split(a, "prod", [4, 8], "x")
    b_parts = s.split(b, "prod", [2, 16], "x")
    s.unify(a, b, "z")
    leaves = list(s.leaves(a))
    assert [s.size(x) for x in leaves] == [2, 2, 8]
    assert s.find(b_parts[0]) == leaves[0] and s.find(a_parts[1]) == leaves[2]


def test_incompatible_structures_fix_the_axis():
    s = AxisStore()
    a, b = s.new(6), s.new(6)
    s.split(a, "prod", [2, 3], "x")
    s.split(b, "prod", [3, 2], "x")
    s.unify(a, b, "conflict")
    assert any("conflicting" in r.message for r in s.reasons(a))


def test_segments_reshaped_by_count_share_one_permutation():
    s = AxisStore()
    a = s.new(12)
    q, k, v = s.split(a, "cat", [4, 4, 4], "split")
    b = s.new(12)
    t, rest = s.split(b, "prod", [3, 4], "reshape")
    s.unify(a, b, "same tensor")
    assert s.find(q) == s.find(k) == s.find(v) == s.find(rest)
    assert s.reasons(t)
