"""What an op rule sees: the axis store, the types of graph values, and the call's arguments.

A *type* (``TType``) is one atom per tensor dimension; ops with several results
have a list of those. ``Args`` is the one way rules read arguments: bound by
schema name with defaults filled in (positionally as ``arg0, arg1, ...`` for
calls without a schema, such as ``operator.getitem``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch.fx as fx

from permgraph.axes import AxisStore, Reason

TType = list[int]  # one atom per tensor dimension


def is_ttype(x: Any) -> bool:
    """Whether ``x`` is the type of one tensor (a flat list of atoms)."""
    return isinstance(x, list) and all(isinstance(i, int) for i in x)


def atoms_in(x: Any) -> Iterator[int]:
    """Every atom in a (possibly nested) type."""
    if is_ttype(x):
        yield from x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from atoms_in(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from atoms_in(y)


def bind_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of a call by schema name, defaults filled in (``argN`` without a schema)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


RUN_TIME = 10 ** 9  # sentinel sizes (data-dependent sizes) are above this


def concrete(s: Any) -> int:
    """A size as an int: a data-dependent size (unbacked symbol) that the graph's own run-time
    assertions pin to one value (``asserted_size``) is that value; any other gets a sentinel size
    above ``RUN_TIME``, a hash of its symbolic expression (equal expressions, equal sentinels; no
    state kept between runs), so the axis never unifies with a known size (callers fix it)."""
    try:
        return int(s)
    except Exception:  # noqa: BLE001 - GuardOnDataDependentSymNode and friends
        pinned = asserted_size(s)
        if pinned is not None:
            return pinned
        return RUN_TIME + 1 + int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=6).digest(), "big")


def asserted_size(s: Any) -> int | None:
    """The value of a data-dependent size that an equality the exported graph asserts at run time
    pins (``Eq(u8 + u9, 32)`` from splitting 32 rows by lengths read from a tensor): for each asserted
    ``lhs = rhs`` linear in one of the size's symbols ``u`` (``a*u + b = 0``, ``a`` and ``b`` free of
    ``u``), the size with ``u = -b/a`` substituted, where that is a number (``2*u8 + 2*u9`` is 64). Sound:
    an input for which the equality fails stops the program at the assertion. None otherwise."""
    import sympy

    node = getattr(s, "node", None)
    env, expr = getattr(node, "shape_env", None), getattr(node, "expr", None)
    if env is None or not isinstance(expr, sympy.Expr):
        return None
    for asserts in getattr(env, "deferred_runtime_asserts", {}).values():
        for ra in asserts:
            eq = ra.expr
            if not isinstance(eq, sympy.Eq):
                continue
            diff = sympy.expand(eq.lhs - eq.rhs)
            for u in sorted(eq.free_symbols & expr.free_symbols, key=str):
                a = diff.coeff(u, 1)
                b = sympy.expand(diff - a * u)
                if a == 0 or u in a.free_symbols or u in b.free_symbols:
                    continue
                value = sympy.expand(expr.subs(u, -b / a))
                if value.is_number and value.is_integer:
                    return int(value)
    return None


def norm_dim(d: int, ndim: int) -> int:
    """A dim argument as a non-negative index."""
    return d + ndim if d < 0 else d


def type_of(types: Mapping[fx.Node, Any], x: Any) -> TType | None:
    """The type of a tensor-valued argument (None for non-tensors)."""
    if isinstance(x, fx.Node):
        ty = types.get(x)
        return ty if is_ttype(ty) else None
    return None


class Args(Mapping[str, Any]):
    """A call's bound arguments, with typed reads of tensor arguments and dims."""

    def __init__(self, node: fx.Node, types: Mapping[fx.Node, Any]) -> None:
        self._values = bind_args(node)
        self._types = types

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def t(self, name: str) -> TType | None:
        """The type of tensor argument ``name`` (None when absent or not a tensor)."""
        return type_of(self._types, self._values.get(name))

    def type_of(self, x: Any) -> TType | None:
        """The type of a tensor among the arguments (an element of a list argument, say)."""
        return type_of(self._types, x)

    def first(self, *names: str) -> Any:
        """The value of the first of ``names`` the schema has (ops of one family name them differently)."""
        return next((self._values[n] for n in names if n in self._values), None)


class RuleContext:
    """The axis store, the types so far, and the node being typed."""

    def __init__(self, store: AxisStore, types: dict[fx.Node, Any]) -> None:
        self.store = store
        self.types = types
        self.node: fx.Node | None = None
        # dims along which a node's value is constant (zeros, ones, broadcasts): such an
        # operand constrains nothing along them, like a size-1 broadcast
        self.uniform: dict[fx.Node, frozenset[int]] = {}
        # integer tensors whose *values* are positions along an axis (topk/argmax indices): node ->
        # that axis's atom (a list, one entry per result, for multi-result ops). Permuting the axis
        # relabels the values, so a consumer that indexes an axis with them unifies the two; any
        # other consumer fixes the axis (``permgraph.infer.engine``).
        self.values: dict[fx.Node, Any] = {}
        # axes whose positions are named by index values: ``(axis, value atom, index node)`` for a
        # 1-D index tensor of positions along ``value atom`` that selected rows of a tensor (MoE's
        # ``gate_up_proj[expert_ids]``): row ``s`` of the result belongs to ``value atom`` position
        # ``index[s]``, which is how a per-expert group is followed through the batched experts
        self.carriers: list[tuple[int, int, fx.Node]] = []
        self.view_base: dict[fx.Node, fx.Node] = {}  # a view's base tensor (writes through it)
        # ``torch.vmap`` levels open at the node being typed: level -> the atom of the axis it maps
        # (rules see the per-sample shapes inside; the mapped axis comes back at ``_remove_batch_dim``)
        self.vmapped: dict[int, int] = {}

    def args(self, node: fx.Node) -> Args:
        return Args(node, self.types)

    def uniform_dims(self, x: Any) -> frozenset[int]:
        return self.uniform.get(x, frozenset()) if isinstance(x, fx.Node) else frozenset()

    def set_uniform(self, dims: Iterable[int]) -> None:
        if dims:
            self.uniform[self.node] = frozenset(dims)

    def value_atom(self, x: Any) -> int | None:
        """The atom whose positions the values of tensor argument ``x`` are (None for ordinary tensors)."""
        v = self.values.get(x) if isinstance(x, fx.Node) else None
        return v if isinstance(v, int) else None

    def set_values(self, atom: Any) -> None:
        """The node's result holds positions along ``atom`` (a list: one per result, None for none)."""
        if atom is not None:
            self.values[self.node] = atom

    def index_with(self, idx: Any, axis: int, reason: str) -> bool:
        """Axis ``axis`` is indexed by the values of ``idx``: unified with their axis when they are
        positions along an axis of its size (True), fixed otherwise (False)."""
        v = self.value_atom(idx)
        if v is not None and self.store.size(v) == self.store.size(axis):
            self.unify(v, axis)
            return True
        self.fix(axis, reason)
        return False

    def carry(self, idx: Any, axis: int) -> None:
        """The rows of a result along ``axis`` were selected by the values of the 1-D index ``idx``."""
        v = self.value_atom(idx)
        if v is not None and isinstance(idx, fx.Node):
            self.carriers.append((axis, v, idx))

    @property
    def where(self) -> str:
        return self.node.name if self.node is not None else ""

    def t(self, x: Any) -> TType | None:
        """The type of a tensor argument (None for non-tensors)."""
        return type_of(self.types, x)

    def out_shape(self, i: int | None = None) -> tuple[int, ...]:
        val = self.node.meta["val"]
        if i is not None:
            val = val[i]
        return tuple(concrete(s) for s in val.shape)

    def fresh(self, shape: tuple[int, ...], reason: str | None = None) -> TType:
        r = Reason(reason, self.where) if reason else None
        return [self.store.new(s, r) for s in shape]

    def unify(self, a: int, b: int) -> None:
        sa, sb = self.store.size(a), self.store.size(b)
        if sa != sb and max(sa, sb) > RUN_TIME:  # sizes known only at run time that may differ
            self.fix(a, "size known only at run time")
            self.fix(b, "size known only at run time")
            return
        self.store.unify(a, b, self.where)

    def fix(self, a: int, reason: str) -> None:
        self.store.fix(a, Reason(reason, self.where))

    def fix_all(self, ty: Any, reason: str) -> None:
        for a in atoms_in(ty):
            self.fix(a, reason)
