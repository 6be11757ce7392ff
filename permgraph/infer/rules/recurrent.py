"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): each layer and direction permutes its own units."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from permgraph.infer.context import Args, RuleContext, TType
from permgraph.infer.registry import register

aten = torch.ops.aten

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@register(aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
def recurrent(cx: RuleContext, node: fx.Node, a: Args) -> list[TType]:
    """``h_t = f(W_ih x_t + W_hh h_{t-1} + b)`` per layer and direction, ``G`` gates stacked in the rows
    (LSTM 4, GRU 3, RNN 1). With ``P`` a permutation of a layer's ``H`` units, ``W_ih -> (I_G (x) P) W_ih``,
    ``W_hh -> (I_G (x) P) W_hh P^T``, ``b -> (I_G (x) P) b`` give ``h_t -> P h_t`` at every step (the
    gates and cell state are elementwise in the units), so the rows are ``Cat(units x G)`` and the
    recurrent columns the units. A layer's input columns are the previous layer's units (both
    directions side by side when bidirectional). The sequence axis is fixed (the recurrence orders
    it); the batch passes. The initial and final states stack every layer's units: where they carry
    values, every layer shares one permutation. Packed sequences and projections fix everything."""
    name = node.target.overloadpacket.__name__
    gates, params = _GATES[name], list(a["params"])
    hx = a["hx"] if isinstance(a["hx"], (list, tuple)) else [a["hx"]]
    x = a.t("input") if "input" in a else None
    layers, dirs = a["num_layers"], 2 if a["bidirectional"] else 1
    per = len(params) // (layers * dirs)
    if x is None or per != (4 if a["has_biases"] else 2) or len(params) != per * layers * dirs:
        why = f"{name} over packed sequences or with projections"
        for arg in [a.get("data"), a.get("input"), *hx, *params]:
            cx.fix_all(a.type_of(arg), why)
        return [cx.fresh(cx.out_shape(i), why) for i in range(len(node.meta["val"]))]
    batched = len(x) == 3
    time = 1 if batched and a["batch_first"] else 0
    cx.fix(x[time], f"sequence positions ({name})")
    feed, units = x[-1], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            w_ih, w_hh, *bias = (a.type_of(p) for p in params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per])
            h = cx.store.new(cx.store.size(w_hh[1]))
            rows = cx.store.make("cat", [h] * gates)
            for t in (w_ih, w_hh, *bias):
                cx.unify(t[0], rows)
            cx.unify(w_hh[1], h)
            cx.unify(w_ih[1], feed)
            outs.append(h)
        feed = outs[0] if dirs == 1 else cx.store.make("cat", outs)
        units += outs
    batch = [x[1 - time]] if batched else []
    stacked = [s for s in hx if len(cx.uniform_dims(s)) < len(a.type_of(s))]  # initial states with values
    used = {u.args[1] for u in node.users if u.target is operator.getitem} - {0}  # final states read
    shared = None
    if stacked or used:
        shared = units[0]
        for u in units[1:]:
            cx.unify(shared, u)
    for s in hx:
        t = a.type_of(s)
        cx.fix(t[0], f"layers and directions ({name})")
        if batched:
            cx.unify(t[1], batch[0])
        if shared is not None and len(cx.uniform_dims(s)) < len(t):
            cx.unify(t[-1], shared)
    seq = list(x)
    seq[time] = cx.store.new(cx.store.size(x[time]), None)
    cx.fix(seq[time], f"sequence positions ({name})")
    seq[-1] = feed
    states = []
    for i in range(1, len(node.meta["val"])):
        t = cx.fresh(cx.out_shape(i), None)
        cx.fix(t[0], f"layers and directions ({name})")
        if batched:
            cx.unify(t[1], batch[0])
        if shared is not None:
            cx.unify(t[-1], shared)
        states.append(t)
    return [seq, *states]
