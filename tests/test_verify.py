"""pg.verify itself: its float32-promoted mode, and what it refuses."""
import pytest
import torch
import torch.nn as nn

import permgraph as pg
from permgraph.errors import InputError


class Float32Norm(nn.Module):
    """RMSNorm as transformers writes it: the variance in float32 whatever the model's dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, d: int = 96, h: int = 40, mix=None) -> None:
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(7, d), nn.Linear(d, h), nn.Linear(h, d)
        self.norm, self.head = Float32Norm(d), nn.Linear(d, 3)
        self.mix = mix

    def forward(self, x):
        x = self.inp(x)
        hidden = torch.relu(self.up(x))
        if self.mix is not None:
            hidden = self.mix(hidden)
        return self.head(self.norm(x + self.down(hidden)))


def test_float32_inside_limits_the_plain_check_not_the_promoted_one():
    torch.manual_seed(0)
    model, x = Block(), (torch.randn(64, 7),)
    spec = pg.compile(model, x)
    plain = pg.verify(model, spec, x, seed=1)
    promoted = pg.verify(model, spec, x, seed=1, promote_float32=True)
    assert 1e-12 < plain.max_rel_error < 1e-6  # float32 rounding of the reordered variance sum
    assert promoted.max_rel_error < 1e-14 and promoted.ok
    assert next(model.parameters()).dtype == torch.float32  # the model passed in is not modified


def test_promoted_check_still_fails_a_wrong_spec():
    """A spec compiled for a model whose hidden units are interchangeable, verified on one where
    they are not (a cumulative sum over them): both checks fail, the promoted one too."""
    torch.manual_seed(0)
    x = (torch.randn(64, 7),)
    spec = pg.compile(Block(), x)
    torch.manual_seed(0)
    mixed = Block(mix=lambda h: h.cumsum(-1))
    for promote in (False, True):
        rep = pg.verify(mixed, spec, x, seed=1, promote_float32=promote)
        assert not rep.ok and rep.max_rel_error > 1e-3


def test_non_finite_outputs_are_refused():
    torch.manual_seed(0)
    model, x = Block(), (torch.randn(64, 7),)
    spec = pg.compile(model, x)
    with torch.no_grad():
        model.down.bias[0] = float("nan")
    with pytest.raises(InputError, match="not finite"):
        pg.verify(model, spec, x)
