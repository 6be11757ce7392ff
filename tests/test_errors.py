"""Bad input gets a clear error naming the problem and the fix."""
import pytest
import torch
import torch.nn as nn

import permgraph as pg
from permgraph.testing.zoo import build


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sign = {0: 1.0, 1: -1.0}

    def forward(self, x):
        # a Python dict keyed by a tensor's value: not traceable, not even by draft export (a branch
        # on the value, ``if x.sum() > 0``, is: test_trace.py)
        return self.lin(x) * self.sign[(x > 0).sum().item() % 2]


def test_untraceable_model_names_the_failure_and_what_to_try():
    with pytest.raises(pg.TraceError,
                       match="(?s)could not trace DataDependent.*draft.*failing call:.*self.sign.*what to try"):
        pg.compile(DataDependent(), (torch.randn(2, 4),))


def test_missing_inputs_for_plain_module_says_how_to_pass_them():
    with pytest.raises(pg.TraceError, match="Pass example_inputs"):
        pg.compile(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))


def test_model_without_a_forward_says_so_and_names_its_parts():
    class Pipeline(nn.Module):  # only a generate(), as transformers' Bark
        def __init__(self):
            super().__init__()
            self.semantic, self.coarse = nn.Linear(3, 3), nn.Linear(3, 3)

        def generate(self, x):
            return self.coarse(self.semantic(x))

    for inputs in ((torch.randn(2, 3),), None):  # said before any inputs are derived
        with pytest.raises(pg.TraceError, match="Pipeline defines no forward.*submodules.*semantic, coarse"):
            pg.compile(Pipeline(), inputs)


def test_bad_example_inputs_type():
    with pytest.raises(pg.TraceError, match="tuple of positional arguments or a dict"):
        pg.compile(nn.Linear(3, 3), 5)


def test_unknown_output_name():
    with pytest.raises(ValueError, match="unknown outputs.*logits"):
        pg.compile(build("gpt2").model, outputs=["nope"])


def test_invalid_spec_json():
    with pytest.raises(ValueError, match="not a permgraph spec"):
        pg.PermSpec.from_json("{}")
    with pytest.raises(ValueError, match="invalid JSON"):
        pg.PermSpec.from_json("{")


def test_compile_does_not_change_training_mode():
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).train()
    pg.compile(m, (torch.randn(2, 3),))
    assert m.training


def test_unknown_op_fixes_axes_and_is_reported():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.special.i0(self.a(x)))  # no rule for i0

    spec = pg.compile(Weird(), (torch.randn(2, 4),))
    assert any("i0" in k for k in spec.unknown_ops)
    assert not spec.groups  # hidden axis fixed: the compiler never guesses
    assert any("op without a rule" in r for f in spec.fixed for r in f.reasons)


def test_mlp_hidden_group_found():
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = pg.compile(m, (torch.randn(2, 3),))
    assert [g.size for g in spec.groups.values()] == [5]
    assert pg.verify(m, spec, (torch.randn(2, 3),), tolerance=1e-12).ok
