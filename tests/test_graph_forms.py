"""Same-function rewrites of the exported graph (``permgraph.graph_forms``): the rewritten program gives the
model's outputs, and the spec inferred from it is sound (random permutations checked in float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import permgraph as pg
from permgraph.graph_forms import fused_segments_as_splits

G = torch.Generator().manual_seed(0)


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=G)


class _Timm(nn.Module):
    """timm's attention: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.h, self.qkv, self.proj, self.fc = heads, nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(x + self.proj(y))


class _Sam(_Timm):
    """SAM's attention: after the permute, batch and heads merged by a reshape that keeps the segment axis."""

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).reshape(3, b * self.h, n, -1)
        q, k, v = qkv.unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1) @ v
        y = a.view(b, self.h, n, -1).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.fc(x + self.proj(y))


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class _Rope(_Timm):
    """Qwen-VL's vision attention: ``qkv(x).reshape(N, 3, H, -1).permute(1, 0, 2, 3).unbind(0)``, RoPE on q, k."""

    def __init__(self, d=16, heads=2):
        super().__init__(d, heads)
        t = torch.arange(6, dtype=torch.float64)[:, None] * torch.rand(1, d // heads // 2, generator=G,
                                                                           dtype=torch.float64)
        self.register_buffer("cos", torch.cat((t, t), -1).cos()[:, None], persistent=False)
        self.register_buffer("sin", torch.cat((t, t), -1).sin()[:, None], persistent=False)

    def forward(self, x):
        n, d = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.h, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = (t * self.cos + _rotate_half(t) * self.sin for t in (q, k))
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return self.fc(x + self.proj(y.transpose(0, 1).reshape(n, d)))


class _Selected(_Timm):
    """Keys and values fused, picked by ``select`` without a permute; queries separate."""

    def __init__(self, d=16, heads=2):
        super().__init__(d, heads)
        self.qkv = nn.Linear(d, 2 * d)  # k | v
        self.q = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        kv = self.qkv(x).view(b, n, 2, self.h, -1)
        q = self.q(x).view(b, n, self.h, -1).transpose(1, 2)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(x + self.proj(y))


class _Interleaved(_Timm):
    """Bloom's and Persimmon's layout ``(heads, 3, head_dim)``: the segments interleave per head (the axis viewed
    as ``(heads, 3 * head_dim)`` and split along the second), picked by ``select``."""

    def forward(self, x):
        b, n, d = x.shape
        y = self.qkv(x).view(b, n, self.h, 3, d // self.h)
        q, k, v = (y[..., i, :].transpose(1, 2) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(x + self.proj(y))


class _MultiQuery(_Timm):
    """Falcon's multi-query layout ``(heads + 2, head_dim)``: queries, the one key head and the one value head are
    slices of unequal length (``[:-2]``, ``[-2:-1]``, ``[-1:]``); the key and value heads serve every query head."""

    def __init__(self, d=16, heads=2):
        super().__init__(d, heads)
        self.qkv = nn.Linear(d, d + 2 * d // heads)

    def forward(self, x):
        b, n, d = x.shape
        y = self.qkv(x).view(b, n, self.h + 2, d // self.h)
        q, k, v = (t.transpose(1, 2) for t in (y[:, :, :-2], y[:, :, -2:-1], y[:, :, -1:]))
        k, v = k.expand(b, self.h, n, -1), v.expand(b, self.h, n, -1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(x + self.proj(y))


MODELS = {"timm": (_Timm, (2, 6, 16)), "sam": (_Sam, (2, 6, 16)), "rope": (_Rope, (6, 16)),
          "selected": (_Selected, (2, 6, 16)), "interleaved": (_Interleaved, (2, 6, 16))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_segments_split_keeps_the_program_and_frees_values(name):
    cls, shape = MODELS[name]
    model, x = cls().double().eval(), _x(*shape)
    ep = torch.export.export(model, (x,), strict=False)
    assert fused_segments_as_splits(ep) == 1
    ops = {getattr(n.target, "__name__", "") for n in ep.graph.nodes}
    assert not {"unbind.int", "select.int"} & ops
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=1e-14)

    spec = pg.compile(model, (x,))
    roles = {}
    for g in spec.groups.values():
        roles.setdefault(g.role, []).append(g.size)
    assert roles["heads"] == [2] and roles["vo"] == [8]  # values' within-head order free, apart from q/k's
    assert roles.get("qk") == (None if name == "rope" else [8])  # RoPE fixes q/k's within-head order
    assert "qkvo" not in roles
    for seed in (0, 1, 2):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok


class _Summed(nn.Module):
    """The segment axis is also summed over: not a split into segments."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        y = self.qkv(x).reshape(x.shape[0], 3, 8)
        a, b, c = y.unbind(1)
        return a * b + c + y.sum(1)


def test_multi_query_slices_of_unequal_length_split_into_segments():
    """Falcon's ``(heads + 2, head_dim)``: the slices become segments of ``H*d``, ``d`` and ``d``; the value head's
    units then move with the output projection, apart from the query/key units."""
    model, x = _MultiQuery().double().eval(), _x(2, 6, 16)
    ep = torch.export.export(model, (x,), strict=False)
    assert fused_segments_as_splits(ep) == 1
    assert "slice.Tensor" not in {getattr(n.target, "__name__", "") for n in ep.graph.nodes}
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=1e-14)
    spec = pg.compile(model, (x,))
    roles = {}
    for g in spec.groups.values():
        roles.setdefault(g.role, []).append(g.size)
    assert roles["vo"] == [8] and roles["qk"] == [8] and "qkvo" not in roles, roles
    for seed in (0, 1, 2):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok


@pytest.mark.parametrize("cls", [_Summed])
def test_reshapes_that_are_not_splits_are_left(cls):
    model, x = cls().double(), _x(5, 8)
    ep = torch.export.export(model, (x,), strict=False)
    assert fused_segments_as_splits(ep) == 0
    spec = pg.compile(model, (x,), outputs=[])
    for seed in (0, 1):
        assert pg.verify(model, spec, (x,), seed=seed, tolerance=1e-12).ok


def test_activation_matching_reads_the_rewritten_program():
    """The compiled graph (what activation matching records) is the rewritten one, and runs."""
    from permgraph.compiler import compile_graph

    model, x = _Timm().double().eval(), _x(2, 6, 16)
    cg = compile_graph(model, (x,))
    names = {n.name for n in cg.exported.graph.nodes}
    assert set(cg.node_trees) <= names
    torch.testing.assert_close(cg.exported.module()(x), model(x), rtol=0, atol=1e-14)

